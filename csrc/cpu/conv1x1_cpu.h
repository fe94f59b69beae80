// The BN-ReLU-conv1x1 unit's float32 backward kernel (conv1x1.cpp) without its BN-ReLU: a
// plain 1x1 convolution's gradients in one pass over the output gradient, per tile of rows
// (gemm_panels.h), for fasthg::conv2d_backward (conv2d.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace fasthg {

// grad_x (undefined: none), grad_w [cout][c][1][1] contiguous and grad_b [cout] from float32
// channels_last grad_y and x and weight [cout][c][1][1].
void conv1x1_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& grad_x,
                      const at::Tensor& grad_w, const at::Tensor& grad_b);

}  // namespace fasthg
