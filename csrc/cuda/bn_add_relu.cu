// CUDA kernels of the fused BatchNorm+add+ReLU ops (a residual block's end); the per-element
// math is shared with the CPU twin through csrc/bn_add_relu.h, the reductions' grid and sums
// with bn_relu.cu through bn_reduce.cuh. The backward's reduction reads each element once
// anyway, so it also writes g, the masked gradient: grad_residual, and what the elementwise
// pass reads in place of grad_out and y.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#ifndef FASTHG_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#endif

#include <tuple>

#include "../bn_add_relu.h"
#include "bn_reduce.cuh"
#include "index.cuh"

namespace fasthg {
namespace {

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                               scalar_t* __restrict__ y, const acc_t* __restrict__ mean,
                               const acc_t* __restrict__ invstd, const acc_t* __restrict__ w,
                               const acc_t* __restrict__ b, index_t total, ChannelIndex<index_t> ix) {
  struct Pair {
    scalar_t x, r;
  };
  unrolled_grid_loop(total, [&](index_t i) { return Pair{x[i], residual[i]}; }, [&](index_t i, Pair p) {
    const index_t c = ix.channel(i);
    y[i] = static_cast<scalar_t>(bn_add_relu_value(static_cast<acc_t>(p.x), static_cast<acc_t>(p.r), mean[c],
                                                   invstd[c], w[c], b[c]));
  });
}

// g at offset o into g_out, and its terms of the sums of g and g * xhat.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ void masked_grad_terms(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                                                  const scalar_t* __restrict__ x, scalar_t* __restrict__ g_out,
                                                  acc_t m, acc_t s, index_t o, double& a, double& ax) {
  const acc_t g = bn_add_relu_masked_grad(static_cast<acc_t>(dy[o]), static_cast<acc_t>(y[o]));
  g_out[o] = static_cast<scalar_t>(g);  // exact: g is 0 or grad_out's value
  a += g;
  ax += g * ((static_cast<acc_t>(x[o]) - m) * s);
}

// g, and partial sums of g and g * xhat into part_g/part_gx[split][channel].
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads) backward_reduce_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd, scalar_t* __restrict__ g_out,
    double* __restrict__ part_g, double* __restrict__ part_gx, index_t M, ChannelIndex<index_t> ix) {
  __shared__ typename BlockReduce::TempStorage tmp;
  const index_t c = blockIdx.x;
  const acc_t m = mean[c], s = invstd[c];
  index_t begin, end;
  split_range(M, begin, end);
  double a = 0, ax = 0;
#pragma unroll 4  // independent loads in flight; the sums stay in order
  for (index_t i = begin + threadIdx.x; i < end; i += kReduceThreads)
    masked_grad_terms(dy, y, x, g_out, m, s, ix.offset(i, c), a, ax);
  block_sums(a, ax, tmp);
  if (threadIdx.x == 0) {
    part_g[blockIdx.y * ix.c.divisor + c] = a;
    part_gx[blockIdx.y * ix.c.divisor + c] = ax;
  }
}

// channels_last: tiles of 32 channels, as bn_relu.cu's backward_reduce_nhwc_kernel.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads) backward_reduce_nhwc_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd, scalar_t* __restrict__ g_out,
    double* __restrict__ part_g, double* __restrict__ part_gx, index_t M, index_t C) {
  const index_t c = blockIdx.x * kTileC + threadIdx.x;
  index_t begin, end;
  split_range(M, begin, end);
  double a = 0, ax = 0;
  if (c < C) {
    const acc_t m = mean[c], s = invstd[c];
#pragma unroll 4  // independent loads in flight; the sums stay in order
    for (index_t r = begin + threadIdx.y; r < end; r += kTileRows)
      masked_grad_terms(dy, y, x, g_out, m, s, r * C + c, a, ax);
  }
  column_sums(a, ax);
  if (threadIdx.y == 0 && c < C) {
    part_g[blockIdx.y * C + c] = a;
    part_gx[blockIdx.y * C + c] = ax;
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void backward_elemt_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ dx, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ invstd, const acc_t* __restrict__ w,
                                      const acc_t* __restrict__ mean_g, const acc_t* __restrict__ mean_gx,
                                      index_t total, ChannelIndex<index_t> ix) {
  struct Pair {
    scalar_t x, g;
  };
  unrolled_grid_loop(total, [&](index_t i) { return Pair{x[i], g[i]}; }, [&](index_t i, Pair p) {
    const index_t c = ix.channel(i);
    dx[i] = static_cast<scalar_t>(bn_add_relu_grad_input(static_cast<acc_t>(p.g), static_cast<acc_t>(p.x), mean[c],
                                                         invstd[c], w[c], mean_g[c], mean_gx[c]));
  });
}

// Above: what tests/cuda_emulation runs on the CPU (the kernels and their launch shapes).
// Below: the ops, which need a GPU.
#ifndef FASTHG_HOST_EMULATION

at::Tensor bn_add_relu_forward_cuda(const at::Tensor& x_in, const at::Tensor& residual, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_add_relu_forward_args("bn_add_relu_forward", x_in, residual, mean, invstd, weight, bias);
  TORCH_CHECK(x_in.is_cuda(), "bn_add_relu_forward: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  const auto r = residual.contiguous(d.fmt);
  auto y = at::empty(d.t.sizes(), d.t.options().memory_format(d.fmt));
  const int64_t total = d.t.numel();
  FASTHG_BN_RELU_DISPATCH(d.t.scalar_type(), "bn_add_relu_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(total, [&](auto index) {
      using index_t = decltype(index);
      forward_kernel<scalar_t, acc_t, index_t><<<unrolled_blocks(total, kThreads), kThreads, 0,
                                                 c10::cuda::getCurrentCUDAStream()>>>(
          d.t.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
          mean.contiguous().const_data_ptr<acc_t>(), invstd.contiguous().const_data_ptr<acc_t>(),
          weight.contiguous().const_data_ptr<acc_t>(), bias.contiguous().const_data_ptr<acc_t>(), total,
          d.index<index_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_reduce_cuda(const at::Tensor& grad_out,
                                                                                const at::Tensor& y_in,
                                                                                const at::Tensor& x_in,
                                                                                const at::Tensor& mean,
                                                                                const at::Tensor& invstd) {
  check_bn_add_relu_reduce_args("bn_add_relu_backward_reduce", grad_out, y_in, x_in, mean, invstd);
  TORCH_CHECK(x_in.is_cuda(), "bn_add_relu_backward_reduce: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  const auto dy = grad_out.contiguous(d.fmt), y = y_in.contiguous(d.fmt);
  auto g = at::empty(d.t.sizes(), d.t.options().memory_format(d.fmt));
  auto sum_g = at::empty({d.C}, mean.options()), sum_gx = at::empty({d.C}, mean.options());
  const auto grid = d.reduction(x_in.device().index());
  auto part_g = at::empty({grid.splits, d.C}, d.t.options().dtype(at::kDouble));
  auto part_gx = at::empty({grid.splits, d.C}, part_g.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTHG_BN_RELU_DISPATCH(d.t.scalar_type(), "bn_add_relu_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(d.t.numel(), [&](auto index) {
      using index_t = decltype(index);
      const auto m = mean.contiguous(), s = invstd.contiguous();
      const scalar_t *grad = dy.const_data_ptr<scalar_t>(), *out = y.const_data_ptr<scalar_t>(),
                     *x = d.t.const_data_ptr<scalar_t>();
      if (d.channels_last)
        backward_reduce_nhwc_kernel<scalar_t, acc_t, index_t><<<grid.grid, grid.block, 0, stream>>>(
            grad, out, x, m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), g.mutable_data_ptr<scalar_t>(),
            part_g.mutable_data_ptr<double>(), part_gx.mutable_data_ptr<double>(), d.M, d.C);
      else
        backward_reduce_kernel<scalar_t, acc_t, index_t><<<grid.grid, grid.block, 0, stream>>>(
            grad, out, x, m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), g.mutable_data_ptr<scalar_t>(),
            part_g.mutable_data_ptr<double>(), part_gx.mutable_data_ptr<double>(), d.M, d.index<index_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sums_finalize_kernel<acc_t><<<channel_blocks(d.C), kThreads, 0, stream>>>(
        part_g.const_data_ptr<double>(), part_gx.const_data_ptr<double>(), sum_g.mutable_data_ptr<acc_t>(),
        sum_gx.mutable_data_ptr<acc_t>(), grid.splits, d.C, nullptr, nullptr, static_cast<acc_t>(d.M));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g, sum_g, sum_gx};
}

at::Tensor bn_add_relu_backward_elemt_cuda(const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& mean,
                                           const at::Tensor& invstd, const at::Tensor& weight,
                                           const at::Tensor& mean_g, const at::Tensor& mean_g_xhat) {
  check_bn_add_relu_elemt_args("bn_add_relu_backward_elemt", g_in, x_in, mean, invstd, weight, mean_g, mean_g_xhat);
  TORCH_CHECK(x_in.is_cuda(), "bn_add_relu_backward_elemt: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  const auto g = g_in.contiguous(d.fmt);
  auto dx = at::empty(d.t.sizes(), d.t.options().memory_format(d.fmt));
  const int64_t total = d.t.numel();
  FASTHG_BN_RELU_DISPATCH(d.t.scalar_type(), "bn_add_relu_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(total, [&](auto index) {
      using index_t = decltype(index);
      backward_elemt_kernel<scalar_t, acc_t, index_t><<<unrolled_blocks(total, kThreads), kThreads, 0,
                                                        c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
          mean.contiguous().const_data_ptr<acc_t>(), invstd.contiguous().const_data_ptr<acc_t>(),
          weight.contiguous().const_data_ptr<acc_t>(), mean_g.contiguous().const_data_ptr<acc_t>(),
          mean_g_xhat.contiguous().const_data_ptr<acc_t>(), total, d.index<index_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx;
}

#endif  // FASTHG_HOST_EMULATION

}  // namespace

#ifndef FASTHG_HOST_EMULATION
TORCH_LIBRARY_IMPL(fasthg, CUDA, m) {
  m.impl("bn_add_relu_forward", &bn_add_relu_forward_cuda);
  m.impl("bn_add_relu_backward_reduce", &bn_add_relu_backward_reduce_cuda);
  m.impl("bn_add_relu_backward_elemt", &bn_add_relu_backward_elemt_cuda);
}
#endif

}  // namespace fasthg
