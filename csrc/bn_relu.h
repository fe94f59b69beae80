// Shared by the CPU and CUDA kernels of the fused BatchNorm+ReLU ops: the per-element math
// (so both devices compute exactly the same expressions) and the argument checks.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>

// The activation dtypes every BN-ReLU kernel takes (float64 for gradcheck).
#define FASTHG_BN_RELU_DISPATCH(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

namespace fasthg {

// y = max(0, (x - mean) * invstd * weight + bias); subtracting the mean first keeps large
// offsets (x ~ 1e4, small variance) exact to float32 rounding. As torch.relu, a NaN stays
// NaN (so a diverged input shows in the loss rather than as zeros) and -0 stays -0.
// T is the math type: float (for float/half/bfloat16 x) or double (for double x).
template <typename T>
C10_HOST_DEVICE inline T bn_relu_value(T x, T mean, T invstd, T weight, T bias) {
  const T y = (x - mean) * (invstd * weight) + bias;
  return y < T(0) ? T(0) : y;
}

// The upstream gradient with the ReLU mask recomputed from the input (not stored): zero
// where the forward output was clamped, y <= 0; a NaN passes dy, as relu's backward
// (threshold_backward) does.
template <typename T>
C10_HOST_DEVICE inline T bn_relu_masked_grad(T dy, T x, T mean, T invstd, T weight, T bias) {
  return (x - mean) * (invstd * weight) + bias <= T(0) ? T(0) : dy;
}

// grad_x of training-mode BN given the masked gradient g and the channel means of g and of
// g * xhat (zero in eval mode, where the statistics are constants).
template <typename T>
C10_HOST_DEVICE inline T bn_relu_grad_input(T g, T x, T mean, T invstd, T weight, T mean_g,
                                            T mean_g_xhat) {
  const T xhat = (x - mean) * invstd;
  return weight * invstd * (g - mean_g - xhat * mean_g_xhat);
}

// invstd of training: 1 / sqrt(var + eps), division and square root each correctly rounded
// in T (nvcc's defaults), so both devices give the same bits.
template <typename T>
C10_HOST_DEVICE inline T bn_relu_invstd(T var, T eps) {
  return T(1) / std::sqrt(var + eps);
}

inline void check_bn_relu_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": `x` must be a 4-D [N, C, H, W] tensor, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": `x` must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": `x` must not be empty, got ", x.sizes());
}

// Statistics and parameters are float32, or float64 when x is (for gradcheck).
inline at::ScalarType bn_relu_param_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bn_relu_channel(const char* op, const char* name, const at::Tensor& t,
                                  const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": `", name,
              "` must be a 1-D tensor of ", x.size(1), " (the channels of `x`), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == bn_relu_param_dtype(x), op, ": `", name, "` must be ",
              bn_relu_param_dtype(x), " for ", x.scalar_type(), " `x`, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": `", name, "` must be on ", x.device(),
              " like `x`, got ", t.device());
}

inline void check_bn_relu_params(const char* op, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& invstd, const at::Tensor& weight,
                                 const at::Tensor& bias) {
  check_bn_relu_input(op, x);
  check_bn_relu_channel(op, "mean", mean, x);
  check_bn_relu_channel(op, "invstd", invstd, x);
  check_bn_relu_channel(op, "weight", weight, x);
  check_bn_relu_channel(op, "bias", bias, x);
}

// The one-call training forward: x, weight and bias, and (as nn.BatchNorm2d requires in
// training) more than one value per channel.
inline void check_bn_relu_train_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bias) {
  check_bn_relu_input(op, x);
  check_bn_relu_channel(op, "weight", weight, x);
  check_bn_relu_channel(op, "bias", bias, x);
  TORCH_CHECK(x.numel() > x.size(1), op, ": expected more than 1 value per channel, got `x` of shape ",
              x.sizes());
}

inline void check_same_as_x(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              op, ": `", name, "` must match `x` (", x.sizes(), ", ", x.scalar_type(), ", ",
              x.device(), "), got ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
}

// An output the caller gives (bn_relu_forward_into): like x, dense in x's memory format (the
// layout the kernels write), and not overlapping x (the kernels' pointers are __restrict__).
inline void check_bn_relu_out(const char* op, const at::Tensor& out, const at::Tensor& x) {
  check_same_as_x(op, "out", out, x);
  TORCH_CHECK(out.is_contiguous(x.suggest_memory_format()), op, ": `out` must be dense in `x`'s memory format (",
              x.suggest_memory_format(), "), got strides ", out.strides());
  const auto overlap = at::get_overlap_status(out, x);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Partial && overlap != at::MemOverlapStatus::Full, op,
              ": `out` must not overlap `x` in memory");
}

// The backward passes take grad_out like x, and the elementwise pass the two channel means.
inline void check_bn_relu_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                        const at::Tensor& mean, const at::Tensor& invstd,
                                        const at::Tensor& weight, const at::Tensor& bias,
                                        const at::Tensor* mean_g = nullptr,
                                        const at::Tensor* mean_g_xhat = nullptr) {
  check_bn_relu_params(op, x, mean, invstd, weight, bias);
  check_same_as_x(op, "grad_out", grad_out, x);
  if (mean_g) check_bn_relu_channel(op, "mean_g", *mean_g, x);
  if (mean_g_xhat) check_bn_relu_channel(op, "mean_g_xhat", *mean_g_xhat, x);
}

}  // namespace fasthg
