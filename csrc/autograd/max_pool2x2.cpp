// Autograd kernel of fasthg::max_pool2x2, for every device with a kernel: it saves x alone
// (the hourglass saves the pool's input anyway, for the up branch's first BN), no indices; the
// backward finds each window's maximum again (fasthg::max_pool2x2_backward).
#include <torch/library.h>

#include "op.h"

namespace fasthg {
namespace {

class MaxPool2x2 : public torch::autograd::Function<MaxPool2x2> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<at::Tensor(const at::Tensor&)>("fasthg::max_pool2x2");
    auto y = op.call(x);
    ctx->save_for_backward({x});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fasthg::max_pool2x2_backward");
    return {op.call(grads[0], ctx->get_saved_variables()[0])};
  }
};

at::Tensor max_pool2x2_autograd(const at::Tensor& x) { return MaxPool2x2::apply(x); }

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, Autograd, m) {
  m.impl("max_pool2x2", &max_pool2x2_autograd);
}

}  // namespace fasthg
