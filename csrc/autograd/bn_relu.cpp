// Autograd kernels of fasthg::bn_relu_train and bn_relu_train_sums (training forward and
// backward of the fused BatchNorm+ReLU, each one op: bn_relu_train_forward(_sums) and
// bn_relu_train_backward). In C++ rather than a Python autograd.Function, whose Python and
// dispatch around two fast kernels cost as much as the CPU kernels at the hourglass's 4x4 and
// 8x8 levels.
#include <torch/library.h>

#include <tuple>

#include "op.h"

namespace fasthg {
namespace {

// grad_x, and the weight and bias gradients: sum(g * xhat) and sum(g), g the masked grad_out;
// from the saved x, weight, bias, mean and invstd (both training Functions below).
variable_list train_backward(AutogradContext* ctx, const at::Tensor& grad_y) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
  using Args = const at::Tensor&;
  if (!grad_y.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
  if (!ctx->needs_input_grad(0)) {  // the sums alone
    static const auto reduce = typed_op<std::tuple<at::Tensor, at::Tensor>(Args, Args, Args, Args, Args, Args)>(
        "fasthg::bn_relu_backward_reduce");
    auto [sum_g, sum_gx] = reduce.call(grad_y, x, mean, invstd, weight, bias);
    return {at::Tensor(), sum_gx, sum_g};
  }
  static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(Args, Args, Args, Args, Args, Args)>(
      "fasthg::bn_relu_train_backward");
  auto [grad_x, sum_g, sum_gx] = op.call(grad_y, x, mean, invstd, weight, bias);
  return {grad_x, sum_gx, sum_g};
}

// What both forwards keep: x, weight, bias and the statistics for the backward; mean and var
// are outputs that running statistics read and nothing differentiates.
variable_list train_outputs(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out) {
  auto& [y, mean, var, invstd] = out;
  ctx->save_for_backward({x, weight, bias, mean, invstd});
  ctx->mark_non_differentiable({mean, var});
  ctx->set_materialize_grads(false);  // so autograd does not fill zero grads for them
  return {y, mean, var};
}

class BNReLUTrain : public torch::autograd::Function<BNReLUTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("fasthg::bn_relu_train_forward");
    return train_outputs(ctx, x, weight, bias, op.call(x, weight, bias, eps));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = train_backward(ctx, grads[0]);
    return {g[0], g[1], g[2], at::Tensor()};
  }
};

// The statistics from x's sums (fasthg::bn_relu_train_sums): the BN's backward takes the whole
// gradient through them (its mean terms), so the sums get none.
class BNReLUTrainSums : public torch::autograd::Function<BNReLUTrainSums> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& sum,
                               const at::Tensor& sum_sq, const at::Tensor& weight, const at::Tensor& bias,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    using Args = const at::Tensor&;
    static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        Args, Args, Args, Args, Args, double)>("fasthg::bn_relu_train_forward_sums");
    return train_outputs(ctx, x, weight, bias, op.call(x, sum, sum_sq, weight, bias, eps));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = train_backward(ctx, grads[0]);
    return {g[0], at::Tensor(), at::Tensor(), g[1], g[2], at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  auto out = BNReLUTrain::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_sums_autograd(const at::Tensor& x, const at::Tensor& sum,
                                                                           const at::Tensor& sum_sq,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias, double eps) {
  auto out = BNReLUTrainSums::apply(x, sum, sum_sq, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, Autograd, m) {
  m.impl("bn_relu_train", &bn_relu_train_autograd);
  m.impl("bn_relu_train_sums", &bn_relu_train_sums_autograd);
}

}  // namespace fasthg
