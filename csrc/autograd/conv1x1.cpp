// Autograd kernel of fasthg::bn_relu_conv1x1_forward, the CPU unit (csrc/cpu/conv1x1.cpp): its
// backward is fasthg::bn_relu_conv1x1_backward from x (the activation recomputed). In C++
// rather than torch.library's Python autograd, whose wrapper (argument defaults, redispatch,
// the Python backward) cost more than the kernels at the hourglass's 4x4 and 8x8 levels.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "op.h"

namespace fasthg {
namespace {

using Args = const at::Tensor&;

class Conv1x1Unit : public torch::autograd::Function<Conv1x1Unit> {
 public:
  static variable_list forward(AutogradContext* ctx, Args x, Args mean, Args invstd, Args bn_weight, Args bn_bias,
                               Args conv_weight, Args conv_bias, bool training, bool out_stats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(Args, Args, Args, Args, Args, Args,
                                                                                    Args, bool, bool)>(
        "fasthg::bn_relu_conv1x1_forward");
    auto [y, sum, sum_sq] = op.call(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training, out_stats);
    ctx->save_for_backward({x, mean, invstd, bn_weight, bn_bias, conv_weight});
    ctx->saved_data["training"] = training;
    // The statistics carry no gradient: a training BN that uses them differentiates through
    // its statistics itself (its backward's mean terms), from y.
    ctx->mark_non_differentiable({sum, sum_sq});
    ctx->set_materialize_grads(false);
    return {y, sum, sum_sq};
  }

  // x, bn_weight, bn_bias, conv_weight and conv_bias; none for the statistics and flags.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    if (!grads[0].defined()) return {none, none, none, none, none, none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    static const auto op =
        typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            Args, Args, Args, Args, Args, Args, Args, bool, const std::optional<at::Tensor>&)>(
            "fasthg::bn_relu_conv1x1_backward");
    auto [dx, dbn_w, dbn_b, dconv_w, dconv_b] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                                        saved[5], ctx->saved_data["training"].toBool(), std::nullopt);
    return {dx, none, none, dbn_w, dbn_b, dconv_w, dconv_b, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv1x1_autograd(Args x, Args mean, Args invstd, Args bn_weight,
                                                                Args bn_bias, Args conv_weight, Args conv_bias,
                                                                bool training, bool out_stats) {
  auto out = Conv1x1Unit::apply(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training, out_stats);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, Autograd, m) {
  m.impl("bn_relu_conv1x1_forward", &conv1x1_autograd);
}

}  // namespace fasthg
