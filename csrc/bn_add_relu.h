// Shared by the CPU and CUDA kernels of the fused BatchNorm+add+ReLU ops (a residual block's
// end: relu(bn(x) + residual)): the per-element math and the argument checks. The statistics
// are bn_relu's (bn_relu_stats); the BN parameter and channel checks are bn_relu.h's.
#pragma once

#include "bn_relu.h"

namespace fasthg {

// y = max(0, (x - mean) * invstd * weight + bias + residual), the BN value computed as
// bn_relu_value computes it before the clamp; a NaN stays NaN, as in torch.relu.
template <typename T>
C10_HOST_DEVICE inline T bn_add_relu_value(T x, T residual, T mean, T invstd, T weight, T bias) {
  const T y = (x - mean) * (invstd * weight) + bias + residual;
  return y < T(0) ? T(0) : y;
}

// The gradient past the ReLU, from the saved output: zero where y <= 0 (as relu's backward,
// threshold_backward, decides it; a NaN y passes dy). It is grad_residual, and the gradient
// the BN's backward takes.
template <typename T>
C10_HOST_DEVICE inline T bn_add_relu_masked_grad(T dy, T y) {
  return y <= T(0) ? T(0) : dy;
}

// grad_x of BN given g (the masked gradient) and the channel means of g and g * xhat (zero
// in eval mode): bn_relu_grad_input's math, g already masked.
template <typename T>
C10_HOST_DEVICE inline T bn_add_relu_grad_input(T g, T x, T mean, T invstd, T weight, T mean_g, T mean_g_xhat) {
  return bn_relu_grad_input(g, x, mean, invstd, weight, mean_g, mean_g_xhat);
}

// forward: x, the residual like x, and the BN's channel tensors.
inline void check_bn_add_relu_forward_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                                           const at::Tensor& mean, const at::Tensor& invstd,
                                           const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_params(op, x, mean, invstd, weight, bias);
  check_same_as_x(op, "residual", residual, x);
}

// backward_reduce: grad_out and y like x, the statistics.
inline void check_bn_add_relu_reduce_args(const char* op, const at::Tensor& grad_out, const at::Tensor& y,
                                          const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd) {
  check_bn_relu_input(op, x);
  check_same_as_x(op, "grad_out", grad_out, x);
  check_same_as_x(op, "y", y, x);
  check_bn_relu_channel(op, "mean", mean, x);
  check_bn_relu_channel(op, "invstd", invstd, x);
}

// backward_elemt: g like x, the statistics, weight and the two channel means.
inline void check_bn_add_relu_elemt_args(const char* op, const at::Tensor& g, const at::Tensor& x,
                                         const at::Tensor& mean, const at::Tensor& invstd,
                                         const at::Tensor& weight, const at::Tensor& mean_g,
                                         const at::Tensor& mean_g_xhat) {
  check_bn_relu_input(op, x);
  check_same_as_x(op, "g", g, x);
  check_bn_relu_channel(op, "mean", mean, x);
  check_bn_relu_channel(op, "invstd", invstd, x);
  check_bn_relu_channel(op, "weight", weight, x);
  check_bn_relu_channel(op, "mean_g", mean_g, x);
  check_bn_relu_channel(op, "mean_g_xhat", mean_g_xhat, x);
}

}  // namespace fasthg
