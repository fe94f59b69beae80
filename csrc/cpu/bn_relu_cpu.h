// What other CPU kernels call of bn_relu.cpp's directly (not through the dispatcher).
#pragma once

#include <ATen/core/Tensor.h>

namespace fasthg {

// fasthg::bn_relu_backward_elemt's CPU kernel, with grad_skip (like x; null: none) added to
// grad_x in the same pass, before the one rounding: the fused 1x1 unit's (conv1x1.cpp)
// elementwise backward, whose input may also have fed a residual branch.
at::Tensor bn_relu_backward_elemt_skip_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                           const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                           const at::Tensor& mean_g, const at::Tensor& mean_gx,
                                           const at::Tensor* grad_skip);

}  // namespace fasthg
