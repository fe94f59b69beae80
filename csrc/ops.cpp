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
  // skip += nearest_upsample(low), in place (inference: no autograd)
  m.def("upsample_add_inplace(Tensor low, Tensor(a!) skip) -> ()");

  // y = max over each 2x2 window of x (stride 2, floor mode: nn.MaxPool2d(2, 2)); ties and NaN
  // as ATen picks them (csrc/max_pool2x2.h)
  m.def("max_pool2x2(Tensor x) -> Tensor");
  // grad_x: grad_out at each window's maximum (recomputed from x: no indices are kept), 0 elsewhere
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor x) -> Tensor");
  // the same plus grad_skip in the same pass (x also feeding another branch, whose gradient
  // autograd would add in a pass of its own)
  m.def("max_pool2x2_backward_skip(Tensor grad_out, Tensor x, Tensor grad_skip) -> Tensor");

  // Fused BatchNorm(+ReLU) over the channels of x [N, C, H, W]; statistics and parameters
  // are float32 whatever x's dtype. Per-channel mean and biased variance of x:
  m.def("bn_relu_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // y = max(0, (x - mean) * invstd * weight + bias)
  m.def("bn_relu_forward(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) -> Tensor");
  // the same, written into `out` (x's sizes and dtype, dense in x's memory format, apart from x;
  // inference: no autograd)
  m.def("bn_relu_forward_into(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, Tensor(a!) out) -> ()");
  // sums over N, H, W of g and g * xhat, g = grad_out where the forward output was > 0
  m.def("bn_relu_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias) -> (Tensor sum_g, Tensor sum_g_xhat)");
  // grad_x = weight * invstd * (g - mean_g - xhat * mean_g_xhat); the means are 0 in eval
  m.def("bn_relu_backward_elemt(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias, Tensor mean_g, Tensor mean_g_xhat) -> Tensor");
  // Training in one call each (CPU and CUDA): bn_relu_stats, invstd = rsqrt(var + eps), bn_relu_forward
  m.def("bn_relu_train_forward(Tensor x, Tensor weight, Tensor bias, float eps) -> "
        "(Tensor y, Tensor mean, Tensor var, Tensor invstd)");
  // bn_relu_backward_reduce, then bn_relu_backward_elemt with mean_g = sum_g / count, and so on
  m.def("bn_relu_train_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias) -> (Tensor grad_x, Tensor sum_g, Tensor sum_g_xhat)");
  // the same, plus grad_skip in the same pass: grad_x + grad_skip (x also feeding a residual
  // block's identity branch, whose gradient autograd would add in a pass of its own)
  m.def("bn_relu_train_backward_skip(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias, Tensor grad_skip) -> (Tensor grad_x, Tensor sum_g, Tensor sum_g_xhat)");
  // Training with autograd (CPU and CUDA): y, mean and (biased) var of bn_relu_train_forward, its
  // backward bn_relu_train_backward (csrc/autograd/bn_relu.cpp)
  m.def("bn_relu_train(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor y, Tensor mean, Tensor var)");
  // The same two with the statistics from x's per-channel sum and sum of squares (float32,
  // float64 for float64 x; the conv1x1 unit's out_stats) instead of a pass over x: mean and
  // var = E[x^2] - mean^2 in double, the pass after all where that cancels (CPU)
  m.def("bn_relu_train_forward_sums(Tensor x, Tensor sum, Tensor sum_sq, Tensor weight, Tensor bias, float eps) -> "
        "(Tensor y, Tensor mean, Tensor var, Tensor invstd)");
  m.def("bn_relu_train_sums(Tensor x, Tensor sum, Tensor sum_sq, Tensor weight, Tensor bias, float eps) -> "
        "(Tensor y, Tensor mean, Tensor var)");

  // Fused BatchNorm+add+ReLU, a residual block's end; statistics from bn_relu_stats.
  // y = max(0, (x - mean) * invstd * weight + bias + residual), residual like x
  m.def("bn_add_relu_forward(Tensor x, Tensor residual, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias) -> Tensor");
  // g = grad_out where y > 0 (grad_residual), and the sums over N, H, W of g and g * xhat
  m.def("bn_add_relu_backward_reduce(Tensor grad_out, Tensor y, Tensor x, Tensor mean, Tensor invstd) -> "
        "(Tensor g, Tensor sum_g, Tensor sum_g_xhat)");
  // grad_x = weight * invstd * (g - mean_g - xhat * mean_g_xhat); the means are 0 in eval
  m.def("bn_add_relu_backward_elemt(Tensor g, Tensor x, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor mean_g, Tensor mean_g_xhat) -> Tensor");
  // Training with autograd, each direction one call on the device's kernels: bn_relu_stats,
  // invstd = rsqrt(var + eps), bn_add_relu_forward; backward the two passes above
  // (csrc/autograd/bn_add_relu.cpp)
  m.def("bn_add_relu_train(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> "
        "(Tensor y, Tensor mean, Tensor var)");

  // The BN-ReLU-conv1x1 unit (CPU; its GPU twin is Triton's, fasthg/ops/conv1x1.py): y =
  // conv1x1(relu((x - mean) * invstd * bn_weight + bn_bias), conv_weight) + conv_bias, the
  // activation never stored; with out_stats, y's per-channel sum and sum of squares (else empty).
  // `training` is for autograd (the backward's BN terms), as in Triton's twin.
  // conv_weight [Cout, C, 1, 1] in x's dtype or in the statistics' (float32: cast inside, as
  // autocast would, and its gradient returned in float32 from the kernels' float sums);
  // statistics, BN parameters and conv_bias float32 (float64 for float64 x).
  m.def("bn_relu_conv1x1_forward(Tensor x, Tensor mean, Tensor invstd, Tensor bn_weight, Tensor bn_bias, "
        "Tensor conv_weight, Tensor conv_bias, bool training, bool out_stats) -> (Tensor y, Tensor sum, Tensor sum_sq)");
  // Its backward from x (the activation recomputed): BatchNorm's training backward (the batch
  // statistics' gradient terms) when training, else the eval one; grad_skip (like x), the
  // gradient of a residual branch that also took x, is added into grad_x.
  m.def("bn_relu_conv1x1_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, Tensor bn_weight, "
        "Tensor bn_bias, Tensor conv_weight, bool training, Tensor? grad_skip=None) -> (Tensor grad_x, Tensor grad_bn_weight, "
        "Tensor grad_bn_bias, Tensor grad_conv_weight, Tensor grad_conv_bias)");
  // The backward of a stride-1 convolution with zero padding k // 2 (k odd, one group),
  // fasthg.ops.conv2d's: the input gradient where input_grad (else an empty tensor), the weight
  // and bias gradients. CPU; for bfloat16 on AMX fasthg's own weight gradient (and 1x1 input
  // gradient), csrc/cpu/conv2d.cpp. The weight and bias gradients in grad_weight_dtype: the
  // weight's (None) or float32 (a float32 parameter cast for autocast takes its gradient so).
  m.def("conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, bool input_grad, "
        "ScalarType? grad_weight_dtype=None) -> "
        "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // A float32 (or float64) 3x3 convolution, stride 1, zero padding 1, one group, by Winograd's
  // F(2x2, 3x3), and its backward (the input gradient where input_grad, else an empty tensor):
  // fasthg.ops.conv2d's on CPUs with AVX2 or AVX-512, csrc/cpu/conv3x3_winograd.cpp.
  m.def("conv3x3_winograd(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("conv3x3_winograd_backward(Tensor grad_out, Tensor x, Tensor weight, bool input_grad) -> "
        "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Which GEMM kernel the CPU unit runs for a dtype here: avx512, avx2 or plain
  // (csrc/cpu/gemm_panels.h), or amx for bfloat16 on AMX CPUs (csrc/cpu/brgemm_bf16.h)
  m.def("cpu_gemm_kernel(ScalarType dtype) -> str");
}
