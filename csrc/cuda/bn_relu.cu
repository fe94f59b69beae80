// CUDA kernels of the fused BatchNorm+ReLU ops; the per-element math is shared with the CPU
// twin through csrc/bn_relu.h, the reductions' grid and sums with bn_add_relu.cu through
// bn_reduce.cuh. Reductions run on a (channels, splits) grid so that few channels with large
// H*W still fill the GPU: double accumulators per thread, summed across the block
// (cub::BlockReduce for NCHW's one channel a block, a fixed 16-term loop per channel for
// channels_last's tiles of 32), double partials per split, added by a one-thread-per-channel
// finalize kernel. Elementwise passes take 4 elements a thread
// (index.cuh's unrolled_grid_loop); index math in 32 bits where it fits.
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

#include "../bn_relu.h"
#include "bn_reduce.cuh"
#include "index.cuh"

namespace fasthg {
namespace {

// Partial sums of d = x - pivot and d*d, pivot = the channel's first element (shared by every
// split, so partials add up; large offsets cost no precision), into s1/s2[split][channel].
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads) stats_kernel(
    const scalar_t* __restrict__ x, double* __restrict__ s1, double* __restrict__ s2, index_t M,
    ChannelIndex<index_t> ix) {
  __shared__ typename BlockReduce::TempStorage tmp;
  const index_t c = blockIdx.x;
  const double pivot = static_cast<double>(x[ix.offset(0, c)]);
  index_t begin, end;
  split_range(M, begin, end);
  double a = 0, q = 0;
#pragma unroll 4  // independent loads in flight; the sums stay in order
  for (index_t i = begin + threadIdx.x; i < end; i += kReduceThreads) {
    const double d = static_cast<double>(x[ix.offset(i, c)]) - pivot;
    a += d;
    q += d * d;
  }
  block_sums(a, q, tmp);
  if (threadIdx.x == 0) {
    s1[blockIdx.y * ix.c.divisor + c] = a;
    s2[blockIdx.y * ix.c.divisor + c] = q;
  }
}

// With `invstd` (the training forward), also bn_relu_invstd(var, eps), as the CPU op: two
// launches fewer.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void stats_finalize_kernel(const scalar_t* __restrict__ x, const double* __restrict__ s1,
                                      const double* __restrict__ s2, acc_t* __restrict__ mean,
                                      acc_t* __restrict__ var, index_t splits, index_t M, ChannelIndex<index_t> ix,
                                      acc_t* __restrict__ invstd, acc_t eps) {
  const index_t C = ix.c.divisor, c = thread_in_grid<index_t>();
  if (c >= C) return;
  double a = 0, q = 0;
  for (index_t k = 0; k < splits; ++k) {
    a += s1[k * C + c];
    q += s2[k * C + c];
  }
  const double d = a / M;
  mean[c] = static_cast<acc_t>(static_cast<double>(x[ix.offset(0, c)]) + d);
  const acc_t v = static_cast<acc_t>(fmax(q / M - d * d, 0.0));
  var[c] = v;
  if (invstd) invstd[c] = bn_relu_invstd(v, eps);
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                               const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                               const acc_t* __restrict__ w, const acc_t* __restrict__ b, index_t total,
                               ChannelIndex<index_t> ix) {
  unrolled_grid_loop(total, [&](index_t i) { return x[i]; }, [&](index_t i, scalar_t xi) {
    const index_t c = ix.channel(i);
    y[i] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(xi), mean[c], invstd[c], w[c], b[c]));
  });
}

// Partial sums of g and g * xhat into part_g/part_gx[split][channel].
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads) backward_reduce_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ invstd, const acc_t* __restrict__ w, const acc_t* __restrict__ b,
    double* __restrict__ part_g, double* __restrict__ part_gx, index_t M, ChannelIndex<index_t> ix) {
  __shared__ typename BlockReduce::TempStorage tmp;
  const index_t c = blockIdx.x;
  const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c];
  index_t begin, end;
  split_range(M, begin, end);
  double a = 0, ax = 0;
#pragma unroll 4  // independent loads in flight; the sums stay in order
  for (index_t i = begin + threadIdx.x; i < end; i += kReduceThreads) {
    const index_t o = ix.offset(i, c);
    const acc_t xi = static_cast<acc_t>(x[o]);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[o]), xi, m, s, wc, bc);
    a += g;
    ax += g * ((xi - m) * s);
  }
  block_sums(a, ax, tmp);
  if (threadIdx.x == 0) {
    part_g[blockIdx.y * ix.c.divisor + c] = a;
    part_gx[blockIdx.y * ix.c.divisor + c] = ax;
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads) stats_nhwc_kernel(
    const scalar_t* __restrict__ x, double* __restrict__ s1, double* __restrict__ s2, index_t M, index_t C) {
  const index_t c = blockIdx.x * kTileC + threadIdx.x;
  index_t begin, end;
  split_range(M, begin, end);
  double a = 0, q = 0;
  if (c < C) {
    const double pivot = static_cast<double>(x[c]);  // row 0, as stats_finalize_kernel reads it
#pragma unroll 4  // independent loads in flight; the sums stay in order
    for (index_t r = begin + threadIdx.y; r < end; r += kTileRows) {
      const double d = static_cast<double>(x[r * C + c]) - pivot;
      a += d;
      q += d * d;
    }
  }
  column_sums(a, q);
  if (threadIdx.y == 0 && c < C) {
    s1[blockIdx.y * C + c] = a;
    s2[blockIdx.y * C + c] = q;
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads) backward_reduce_nhwc_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ invstd, const acc_t* __restrict__ w, const acc_t* __restrict__ b,
    double* __restrict__ part_g, double* __restrict__ part_gx, index_t M, index_t C) {
  const index_t c = blockIdx.x * kTileC + threadIdx.x;
  index_t begin, end;
  split_range(M, begin, end);
  double a = 0, ax = 0;
  if (c < C) {
    const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c];
#pragma unroll 4  // independent loads in flight; the sums stay in order
    for (index_t r = begin + threadIdx.y; r < end; r += kTileRows) {
      const index_t o = r * C + c;
      const acc_t xi = static_cast<acc_t>(x[o]);
      const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[o]), xi, m, s, wc, bc);
      a += g;
      ax += g * ((xi - m) * s);
    }
  }
  column_sums(a, ax);
  if (threadIdx.y == 0 && c < C) {
    part_g[blockIdx.y * C + c] = a;
    part_gx[blockIdx.y * C + c] = ax;
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void backward_elemt_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ dx, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ invstd, const acc_t* __restrict__ w,
                                      const acc_t* __restrict__ b, const acc_t* __restrict__ mean_g,
                                      const acc_t* __restrict__ mean_gx, index_t total, ChannelIndex<index_t> ix,
                                      const scalar_t* __restrict__ skip = nullptr) {
  // skip (may be null): a residual block's identity-branch gradient, added in this pass
  struct Pair {
    scalar_t x, dy;
  };
  unrolled_grid_loop(total, [&](index_t i) { return Pair{x[i], dy[i]}; }, [&](index_t i, Pair p) {
    const index_t c = ix.channel(i);
    const acc_t xi = static_cast<acc_t>(p.x);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(p.dy), xi, mean[c], invstd[c], w[c], b[c]);
    const acc_t d = bn_relu_grad_input(g, xi, mean[c], invstd[c], w[c], mean_g[c], mean_gx[c]);
    dx[i] = static_cast<scalar_t>(skip ? d + static_cast<acc_t>(skip[i]) : d);
  });
}

// Above: what tests/cuda_emulation runs on the CPU (the kernels and their launch shapes).
// Below: the ops, which need a GPU.
#ifndef FASTHG_HOST_EMULATION

// mean and biased var of d's channels, and 1 / sqrt(var + eps) into invstd where it is defined.
void launch_stats(const Dense& d, c10::DeviceIndex device, const at::Tensor& mean, const at::Tensor& var,
                  const at::Tensor& invstd, double eps) {
  const auto g = d.reduction(device);
  auto s1 = at::empty({g.splits, d.C}, d.t.options().dtype(at::kDouble));
  auto s2 = at::empty({g.splits, d.C}, s1.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTHG_BN_RELU_DISPATCH(d.t.scalar_type(), "bn_relu_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(d.t.numel(), [&](auto index) {
      using index_t = decltype(index);
      const auto ix = d.index<index_t>();
      const scalar_t* x = d.t.const_data_ptr<scalar_t>();
      if (d.channels_last)
        stats_nhwc_kernel<scalar_t, index_t><<<g.grid, g.block, 0, stream>>>(
            x, s1.mutable_data_ptr<double>(), s2.mutable_data_ptr<double>(), d.M, d.C);
      else
        stats_kernel<scalar_t, index_t><<<g.grid, g.block, 0, stream>>>(
            x, s1.mutable_data_ptr<double>(), s2.mutable_data_ptr<double>(), d.M, ix);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats_finalize_kernel<scalar_t, acc_t, index_t><<<channel_blocks(d.C), kThreads, 0, stream>>>(
          x, s1.const_data_ptr<double>(), s2.const_data_ptr<double>(), mean.mutable_data_ptr<acc_t>(),
          var.mutable_data_ptr<acc_t>(), g.splits, d.M, ix,
          invstd.defined() ? invstd.mutable_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> bn_relu_stats_cuda(const at::Tensor& x_in) {
  check_bn_relu_input("bn_relu_stats", x_in);
  TORCH_CHECK(x_in.is_cuda(), "bn_relu_stats: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  auto mean = at::empty({d.C}, d.t.options().dtype(bn_relu_param_dtype(d.t)));
  auto var = at::empty({d.C}, mean.options());
  launch_stats(d, x_in.device().index(), mean, var, at::Tensor(), 0);
  return {mean, var};
}

void launch_forward(const Dense& d, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                    const at::Tensor& bias, const at::Tensor& y) {
  const int64_t total = d.t.numel();
  FASTHG_BN_RELU_DISPATCH(d.t.scalar_type(), "bn_relu_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(total, [&](auto index) {
      using index_t = decltype(index);
      forward_kernel<scalar_t, acc_t, index_t><<<unrolled_blocks(total, kThreads), kThreads, 0,
                                                 c10::cuda::getCurrentCUDAStream()>>>(
          d.t.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mean.contiguous().const_data_ptr<acc_t>(),
          invstd.contiguous().const_data_ptr<acc_t>(), weight.contiguous().const_data_ptr<acc_t>(),
          bias.contiguous().const_data_ptr<acc_t>(), total, d.index<index_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor bn_relu_forward_cuda(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                                const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_params("bn_relu_forward", x_in, mean, invstd, weight, bias);
  TORCH_CHECK(x_in.is_cuda(), "bn_relu_forward: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  auto y = at::empty(d.t.sizes(), d.t.options().memory_format(d.fmt));
  launch_forward(d, mean, invstd, weight, bias, y);
  return y;
}

void bn_relu_forward_into_cuda(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y) {
  check_bn_relu_params("bn_relu_forward_into", x_in, mean, invstd, weight, bias);
  check_bn_relu_out("bn_relu_forward_into", y, x_in);
  TORCH_CHECK(x_in.is_cuda(), "bn_relu_forward_into: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  launch_forward(dense(x_in), mean, invstd, weight, bias, y);
}

// sum(g) and sum(g * xhat) per channel of d (dy laid out as d), and their means over the
// N*H*W values into mean_g and mean_gx where those are defined.
void launch_sums(const Dense& d, const at::Tensor& dy, c10::DeviceIndex device, const at::Tensor& mean,
                 const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& sum_g,
                 const at::Tensor& sum_gx, const at::Tensor& mean_g, const at::Tensor& mean_gx) {
  const auto g = d.reduction(device);
  auto part_g = at::empty({g.splits, d.C}, d.t.options().dtype(at::kDouble));
  auto part_gx = at::empty({g.splits, d.C}, part_g.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTHG_BN_RELU_DISPATCH(d.t.scalar_type(), "bn_relu_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(d.t.numel(), [&](auto index) {
      using index_t = decltype(index);
      const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
      const scalar_t *g_out = dy.const_data_ptr<scalar_t>(), *x = d.t.const_data_ptr<scalar_t>();
      if (d.channels_last)
        backward_reduce_nhwc_kernel<scalar_t, acc_t, index_t><<<g.grid, g.block, 0, stream>>>(
            g_out, x, m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
            b.const_data_ptr<acc_t>(), part_g.mutable_data_ptr<double>(), part_gx.mutable_data_ptr<double>(), d.M,
            d.C);
      else
        backward_reduce_kernel<scalar_t, acc_t, index_t><<<g.grid, g.block, 0, stream>>>(
            g_out, x, m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
            b.const_data_ptr<acc_t>(), part_g.mutable_data_ptr<double>(), part_gx.mutable_data_ptr<double>(), d.M,
            d.index<index_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const bool means = mean_g.defined();
    sums_finalize_kernel<acc_t><<<channel_blocks(d.C), kThreads, 0, stream>>>(
        part_g.const_data_ptr<double>(), part_gx.const_data_ptr<double>(), sum_g.mutable_data_ptr<acc_t>(),
        sum_gx.mutable_data_ptr<acc_t>(), g.splits, d.C, means ? mean_g.mutable_data_ptr<acc_t>() : nullptr,
        means ? mean_gx.mutable_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(d.M));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_backward_args("bn_relu_backward_reduce", grad_in, x_in, mean, invstd, weight, bias);
  TORCH_CHECK(x_in.is_cuda(), "bn_relu_backward_reduce: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  auto sum_g = at::empty({d.C}, mean.options());
  auto sum_gx = at::empty({d.C}, mean.options());
  launch_sums(d, grad_in.contiguous(d.fmt), x_in.device().index(), mean, invstd, weight, bias, sum_g, sum_gx,
              at::Tensor(), at::Tensor());
  return {sum_g, sum_gx};
}

// grad_x, plus grad_skip where it is defined (bn_relu_train_backward_skip's, checked there).
at::Tensor elemt(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                 const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean_g, const at::Tensor& mean_gx,
                 const at::Tensor& grad_skip) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  const auto dy = grad_in.contiguous(d.fmt);
  const auto skip = grad_skip.defined() ? grad_skip.contiguous(d.fmt) : at::Tensor();
  auto dx = at::empty(d.t.sizes(), d.t.options().memory_format(d.fmt));
  const int64_t total = d.t.numel();
  FASTHG_BN_RELU_DISPATCH(d.t.scalar_type(), "bn_relu_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(total, [&](auto index) {
      using index_t = decltype(index);
      backward_elemt_kernel<scalar_t, acc_t, index_t><<<unrolled_blocks(total, kThreads), kThreads, 0,
                                                        c10::cuda::getCurrentCUDAStream()>>>(
          dy.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
          mean.contiguous().const_data_ptr<acc_t>(), invstd.contiguous().const_data_ptr<acc_t>(),
          weight.contiguous().const_data_ptr<acc_t>(), bias.contiguous().const_data_ptr<acc_t>(),
          mean_g.contiguous().const_data_ptr<acc_t>(), mean_gx.contiguous().const_data_ptr<acc_t>(), total,
          d.index<index_t>(), skip.defined() ? skip.const_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx;
}

at::Tensor bn_relu_backward_elemt_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean,
                                       const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& mean_g, const at::Tensor& mean_gx) {
  check_bn_relu_backward_args("bn_relu_backward_elemt", grad_in, x_in, mean, invstd, weight, bias, &mean_g,
                              &mean_gx);
  TORCH_CHECK(x_in.is_cuda(), "bn_relu_backward_elemt: expected a CUDA `x`");
  return elemt(grad_in, x_in, mean, invstd, weight, bias, mean_g, mean_gx, at::Tensor());
}

// Training in one call each direction, as on the CPU (csrc/autograd/bn_relu.cpp runs them):
// the same kernels, with no Python autograd Function and no Python between their launches,
// which at the small levels cost more than the kernels; the statistics' finalize kernel
// also writes invstd, the sums' the means the elementwise pass takes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_train_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_bn_relu_train_args("bn_relu_train_forward", x_in, weight, bias);
  TORCH_CHECK(x_in.is_cuda(), "bn_relu_train_forward: expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  auto mean = at::empty({d.C}, d.t.options().dtype(bn_relu_param_dtype(d.t)));
  auto var = at::empty({d.C}, mean.options()), invstd = at::empty({d.C}, mean.options());
  launch_stats(d, x_in.device().index(), mean, var, invstd, eps);
  return {bn_relu_forward_cuda(d.t, mean, invstd, weight, bias), mean, var, invstd};
}

// bn_relu_train_backward, and with grad_skip defined bn_relu_train_backward_skip.
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_backward(const char* op, const at::Tensor& grad_in,
                                                              const at::Tensor& x_in, const at::Tensor& mean,
                                                              const at::Tensor& invstd, const at::Tensor& weight,
                                                              const at::Tensor& bias, const at::Tensor& grad_skip) {
  check_bn_relu_backward_args(op, grad_in, x_in, mean, invstd, weight, bias);
  if (grad_skip.defined()) check_same_as_x(op, "grad_skip", grad_skip, x_in);
  TORCH_CHECK(x_in.is_cuda(), op, ": expected a CUDA `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto d = dense(x_in);
  const auto dy = grad_in.contiguous(d.fmt);
  auto sum_g = at::empty({d.C}, mean.options()), sum_gx = at::empty({d.C}, mean.options());
  auto mean_g = at::empty({d.C}, mean.options()), mean_gx = at::empty({d.C}, mean.options());
  launch_sums(d, dy, x_in.device().index(), mean, invstd, weight, bias, sum_g, sum_gx, mean_g, mean_gx);
  return {elemt(dy, d.t, mean, invstd, weight, bias, mean_g, mean_gx, grad_skip), sum_g, sum_gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias) {
  return train_backward("bn_relu_train_backward", grad_in, x_in, mean, invstd, weight, bias, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_backward_skip_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& grad_skip) {
  return train_backward("bn_relu_train_backward_skip", grad_in, x_in, mean, invstd, weight, bias, grad_skip);
}

// bn_relu_train without autograd (torch.inference_mode, say): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  auto [y, mean, var, invstd] = bn_relu_train_forward_cuda(x, weight, bias, eps);
  return {y, mean, var};
}

#endif  // FASTHG_HOST_EMULATION

}  // namespace

#ifndef FASTHG_HOST_EMULATION
TORCH_LIBRARY_IMPL(fasthg, CUDA, m) {
  m.impl("bn_relu_stats", &bn_relu_stats_cuda);
  m.impl("bn_relu_forward", &bn_relu_forward_cuda);
  m.impl("bn_relu_forward_into", &bn_relu_forward_into_cuda);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt_cuda);
  m.impl("bn_relu_train_forward", &bn_relu_train_forward_cuda);
  m.impl("bn_relu_train_backward", &bn_relu_train_backward_cuda);
  m.impl("bn_relu_train_backward_skip", &bn_relu_train_backward_skip_cuda);
  m.impl("bn_relu_train", &bn_relu_train_cuda);
}
#endif

}  // namespace fasthg
