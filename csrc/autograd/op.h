// What the C++ autograd kernels share: the autograd Function types, and the typed handle of
// the fasthg op they call below autograd.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

namespace fasthg {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fasthg::<name>'s dispatcher handle with C++ signature Sig (hold it in a static: the lookup
// takes a lock and a hash).
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace fasthg
