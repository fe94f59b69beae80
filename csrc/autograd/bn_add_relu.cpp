// Autograd kernel of fasthg::bn_add_relu_train: the training forward (bn_relu_stats, invstd,
// bn_add_relu_forward) and backward (bn_add_relu_backward_reduce, then _elemt) of the fused
// BatchNorm+add+ReLU, each direction one C++ call. A Python autograd.Function around the
// same kernels cost 1.2 of the 6.7 ms that a ResNet-18 bf16 step spent in its BNs (CPU).
// The kernels are the device's (CPU or CUDA), dispatched below autograd.
#include <torch/library.h>

#include <tuple>

#include "op.h"

namespace fasthg {
namespace {

using Args = const at::Tensor&;

// mean, biased var and invstd = rsqrt(var + eps) (as fasthg.ops.bn_add_relu's Python path), and y.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_forward(Args x, Args residual, Args weight,
                                                                         Args bias, double eps) {
  static const auto stats = typed_op<std::tuple<at::Tensor, at::Tensor>(Args)>("fasthg::bn_relu_stats");
  static const auto forward =
      typed_op<at::Tensor(Args, Args, Args, Args, Args, Args)>("fasthg::bn_add_relu_forward");
  auto [mean, var] = stats.call(x);
  auto invstd = var.add(eps).rsqrt();
  return {forward.call(x, residual, mean, invstd, weight, bias), mean, var, invstd};
}

class BNAddReLUTrain : public torch::autograd::Function<BNAddReLUTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, Args x, Args residual, Args weight, Args bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var, invstd] = train_forward(x, residual, weight, bias, eps);
    ctx->save_for_backward({x, y, weight, mean, invstd});  // y: the ReLU mask, once the residual is added
    ctx->mark_non_differentiable({mean, var});               // running statistics read them only
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  // grad_x, grad_residual (= g, grad_out masked by y > 0), and the weight and bias
  // gradients: sum(g * xhat) and sum(g).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &y = saved[1], &weight = saved[2], &mean = saved[3], &invstd = saved[4];
    static const auto reduce = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(Args, Args, Args, Args, Args)>(
        "fasthg::bn_add_relu_backward_reduce");
    static const auto elemt = typed_op<at::Tensor(Args, Args, Args, Args, Args, Args, Args)>(
        "fasthg::bn_add_relu_backward_elemt");
    auto [g, sum_g, sum_gx] = reduce.call(grads[0], y, x, mean, invstd);
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const c10::Scalar count(x.sym_numel() / x.sym_size(1));  // symbolic under torch.compile
      grad_x = elemt.call(g, x, mean, invstd, weight, sum_g.div(count), sum_gx.div(count));
    }
    return {grad_x, g, sum_gx, sum_g, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_autograd(Args x, Args residual, Args weight,
                                                                          Args bias, double eps) {
  auto out = BNAddReLUTrain::apply(x, residual, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

// Without autograd (torch.inference_mode): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_forward_only(Args x, Args residual, Args weight,
                                                                              Args bias, double eps) {
  auto [y, mean, var, invstd] = train_forward(x, residual, weight, bias, eps);
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, Autograd, m) {
  m.impl("bn_add_relu_train", &bn_add_relu_train_autograd);
}

TORCH_LIBRARY_IMPL(fasthg, CompositeExplicitAutograd, m) {
  m.impl("bn_add_relu_train", &bn_add_relu_train_forward_only);
}

}  // namespace fasthg
