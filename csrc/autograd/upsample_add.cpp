// Autograd kernel of fasthg::upsample_add, for every device with a kernel: grad_skip is
// grad_out itself and grad_low its block sum (fasthg::upsample_add_backward). In C++ (as
// torchvision's ops do) rather than torch.library.register_autograd in Python, which costs
// more than the CPU kernels take at the hourglass's 4x4 and 8x8 levels.
#include <torch/library.h>

#include "op.h"

namespace fasthg {
namespace {

class UpsampleAdd : public torch::autograd::Function<UpsampleAdd> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& low, const at::Tensor& skip) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fasthg::upsample_add");
    auto out = op.call(low, skip);  // checks the arguments: low is 4-D from here on
    ctx->saved_data["low_h"] = low.sym_size(2);
    ctx->saved_data["low_w"] = low.sym_size(3);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        typed_op<at::Tensor(const at::Tensor&, c10::SymInt, c10::SymInt)>("fasthg::upsample_add_backward");
    const at::Tensor& grad = grads[0];
    return {op.call(grad, ctx->saved_data["low_h"].toSymInt(), ctx->saved_data["low_w"].toSymInt()), grad};
  }
};

at::Tensor upsample_add_autograd(const at::Tensor& low, const at::Tensor& skip) {
  return UpsampleAdd::apply(low, skip);
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, Autograd, m) {
  m.impl("upsample_add", &upsample_add_autograd);
}

}  // namespace fasthg
