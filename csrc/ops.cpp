// Every schema of the fasthg operator library, in one place. Kernels are registered per
// device in csrc/cpu and csrc/cuda; autograd and fake (meta) impls in fasthg/ops.
#include <Python.h>
#include <torch/library.h>

// `import fasthg._C` loads this shared library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fasthg, m) {
  // out = skip + nearest_upsample(low, size=skip.shape[-2:])
  m.def("upsample_add(Tensor low, Tensor skip) -> Tensor");
  // grad_low[..., i, j] = sum of grad_out over the outputs that read low[..., i, j]
  m.def("upsample_add_backward(Tensor grad_out, SymInt low_h, SymInt low_w) -> Tensor");
}
