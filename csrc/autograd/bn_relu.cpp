// Autograd kernel of fasthg::bn_relu_train (training forward and backward of the fused
// BatchNorm+ReLU, each one op: bn_relu_train_forward / _backward). In C++ rather than a
// Python autograd.Function, whose Python and dispatch around two fast kernels cost as much
// as the CPU kernels at the hourglass's 4x4 and 8x8 levels.
#include <torch/library.h>

#include <tuple>

#include "op.h"

namespace fasthg {
namespace {

class BNReLUTrain : public torch::autograd::Function<BNReLUTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("fasthg::bn_relu_train_forward");
    auto [y, mean, var, invstd] = op.call(x, weight, bias, eps);
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    ctx->mark_non_differentiable({mean, var});  // running statistics read them, nothing differentiates them
    ctx->set_materialize_grads(false);           // so autograd does not fill zero grads for them
    return {y, mean, var};
  }

  // grad_x, and the weight and bias gradients: sum(g * xhat) and sum(g), g the masked grad_out.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    using Args = const at::Tensor&;
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    if (!ctx->needs_input_grad(0)) {  // the sums alone
      static const auto reduce = typed_op<std::tuple<at::Tensor, at::Tensor>(Args, Args, Args, Args, Args, Args)>(
          "fasthg::bn_relu_backward_reduce");
      auto [sum_g, sum_gx] = reduce.call(grads[0], x, mean, invstd, weight, bias);
      return {at::Tensor(), sum_gx, sum_g, at::Tensor()};
    }
    static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(Args, Args, Args, Args, Args, Args)>(
        "fasthg::bn_relu_train_backward");
    auto [grad_x, sum_g, sum_gx] = op.call(grads[0], x, mean, invstd, weight, bias);
    return {grad_x, sum_gx, sum_g, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  auto out = BNReLUTrain::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, Autograd, m) {
  m.impl("bn_relu_train", &bn_relu_train_autograd);
}

}  // namespace fasthg
