// Shared by the CPU and CUDA kernels of max_pool2x2 (nn.MaxPool2d(2, 2): 2x2 windows, stride
// 2, floor mode): which element of a window is its maximum, by ATen's rule, so that values and
// gradients match max_pool2d_with_indices and its backward exactly; and the argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fasthg {

// The position (0..3, row-major) of a 2x2 window's maximum as ATen's max-pool picks it: the
// window is scanned in row-major order from -inf and position 0, and an element is taken when
// it is greater than the best so far or NaN: the first of equal maxima, the last NaN. Values
// are compared as read (exact in every float type).
template <typename T>
C10_HOST_DEVICE inline int window_argmax(T v0, T v1, T v2, T v3) {
  int k = 0;
  T best = v0;  // v0 beats -inf unless it is -inf itself, and then position 0 stands anyway
  if (v1 > best || v1 != v1) k = 1, best = v1;
  if (v2 > best || v2 != v2) k = 2, best = v2;
  if (v3 > best || v3 != v3) k = 3;
  return k;
}

inline void check_max_pool2x2_args(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "max_pool2x2: `x` must be a 4-D [N, C, H, W] tensor, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "max_pool2x2: `x` must have a floating-point dtype, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) >= 2 && x.size(3) >= 2,
              "max_pool2x2: `x` must have N, C >= 1 and H, W >= 2, got shape ", x.sizes());
}

// grad_skip (may be null): max_pool2x2_backward_skip's, like x.
inline void check_max_pool2x2_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor* grad_skip = nullptr) {
  check_max_pool2x2_args(x);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) &&
                  grad_out.size(2) == x.size(2) / 2 && grad_out.size(3) == x.size(3) / 2,
              "max_pool2x2_backward: `grad_out` must have shape [N, C, H / 2, W / 2] of `x` ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
              "max_pool2x2_backward: `grad_out` and `x` must have the same dtype, got ", grad_out.scalar_type(),
              " and ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "max_pool2x2_backward: `grad_out` and `x` must be on the same device, got ",
              grad_out.device(), " and ", x.device());
  if (grad_skip)
    TORCH_CHECK(grad_skip->sizes() == x.sizes() && grad_skip->scalar_type() == x.scalar_type() &&
                    grad_skip->device() == x.device(),
                "max_pool2x2_backward_skip: `grad_skip` must match `x` (", x.sizes(), ", ", x.scalar_type(), ", ",
                x.device(), "), got ", grad_skip->sizes(), ", ", grad_skip->scalar_type(), ", ", grad_skip->device());
}

}  // namespace fasthg
