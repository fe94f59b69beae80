// CUDA kernels of fasthg::upsample_add; the math is shared with the CPU twin through
// csrc/upsample_add.h. Each thread takes 4 output elements (forward) or low elements
// (backward, which sums each one's block of grad_out in registers: no atomics), loading all
// before storing any; index math in 32 bits where it fits (index.cuh).
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

#include "../upsample_add.h"
#include "index.cuh"

namespace fasthg {
namespace {

constexpr int kThreads = 256;

// skip[i] + the low element nearest_upsample puts at output i.
template <typename scalar_t, bool kChannelsLast, typename index_t>
__device__ __forceinline__ scalar_t merged(const scalar_t* low, const scalar_t* skip, const Dims<index_t>& lo,
                                           const Dims<index_t>& hi, index_t i) {
  index_t n, c, h, w;
  unravel<kChannelsLast>(i, hi, n, c, h, w);
  const auto sh = static_cast<index_t>(nearest_src(h, lo.H.divisor, hi.H.divisor));
  const auto sw = static_cast<index_t>(nearest_src(w, lo.W.divisor, hi.W.divisor));
  return static_cast<scalar_t>(skip[i] + low[offset<kChannelsLast>(lo, n, c, sh, sw)]);
}

template <typename scalar_t, bool kChannelsLast, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ low, const scalar_t* __restrict__ skip,
                               scalar_t* __restrict__ out, Dims<index_t> lo, Dims<index_t> hi, index_t total) {
  unrolled_grid_loop(total, [&](index_t i) { return merged<scalar_t, kChannelsLast>(low, skip, lo, hi, i); },
                     [&](index_t i, scalar_t v) { out[i] = v; });
}

// skip += nearest_upsample(low): skip is read and written, so not __restrict__ (each element
// is read, then written, by one thread).
template <typename scalar_t, bool kChannelsLast, typename index_t>
__global__ void inplace_kernel(const scalar_t* __restrict__ low, scalar_t* skip, Dims<index_t> lo, Dims<index_t> hi,
                               index_t total) {
  unrolled_grid_loop(total, [&](index_t i) { return merged<scalar_t, kChannelsLast>(low, skip, lo, hi, i); },
                     [&](index_t i, scalar_t v) { skip[i] = v; });
}

template <typename scalar_t, bool kChannelsLast, typename index_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_low,
                                Dims<index_t> lo, Dims<index_t> hi, index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Hi = lo.H.divisor, Wi = lo.W.divisor, Ho = hi.H.divisor, Wo = hi.W.divisor;
  unrolled_grid_loop(total, [&](index_t i) {
    index_t n, c, h, w;
    unravel<kChannelsLast>(i, lo, n, c, h, w);
    const auto h0 = static_cast<index_t>(nearest_dst_begin(h, Hi, Ho));
    const auto h1 = static_cast<index_t>(nearest_dst_begin(h + 1, Hi, Ho));
    const auto w0 = static_cast<index_t>(nearest_dst_begin(w, Wi, Wo));
    const auto w1 = static_cast<index_t>(nearest_dst_begin(w + 1, Wi, Wo));
    acc_t acc = 0;
    for (index_t y = h0; y < h1; ++y)
      for (index_t x = w0; x < w1; ++x) acc += static_cast<acc_t>(grad[offset<kChannelsLast>(hi, n, c, y, x)]);
    return static_cast<scalar_t>(acc);
  }, [&](index_t i, scalar_t v) { grad_low[i] = v; });
}

// Above: what tests/cuda_emulation runs on the CPU (the kernels). Below: the ops, which need a GPU.
#ifndef FASTHG_HOST_EMULATION

// out = skip + nearest_upsample(low), skip and low dense in fmt; out is skip where in place.
void launch_forward(const at::Tensor& low, const at::Tensor& skip, const at::Tensor& out, at::MemoryFormat fmt) {
  const int64_t total = out.numel();
  const bool inplace = out.is_same(skip);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, skip.scalar_type(), "upsample_add_cuda", [&] {
    with_index_type(total, [&](auto index) {
      using index_t = decltype(index);
      const auto lo = dims_of<index_t>(low), hi = dims_of<index_t>(skip);
      const auto blocks = unrolled_blocks(total, kThreads);
      const auto n = static_cast<index_t>(total);
      const bool cl = fmt == at::MemoryFormat::ChannelsLast;
      const scalar_t* l = low.const_data_ptr<scalar_t>();
      if (inplace) {
        scalar_t* s = out.mutable_data_ptr<scalar_t>();
        if (cl) inplace_kernel<scalar_t, true, index_t><<<blocks, kThreads, 0, stream>>>(l, s, lo, hi, n);
        else inplace_kernel<scalar_t, false, index_t><<<blocks, kThreads, 0, stream>>>(l, s, lo, hi, n);
      } else {
        const scalar_t* s = skip.const_data_ptr<scalar_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        if (cl) forward_kernel<scalar_t, true, index_t><<<blocks, kThreads, 0, stream>>>(l, s, o, lo, hi, n);
        else forward_kernel<scalar_t, false, index_t><<<blocks, kThreads, 0, stream>>>(l, s, o, lo, hi, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor upsample_add_cuda(const at::Tensor& low_in, const at::Tensor& skip_in) {
  check_upsample_add_args(low_in, skip_in);
  TORCH_CHECK(skip_in.is_cuda(), "upsample_add: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(skip_in.device());
  const auto fmt = skip_in.suggest_memory_format();
  const auto skip = skip_in.contiguous(fmt);
  auto out = at::empty(skip.sizes(), skip.options().memory_format(fmt));
  launch_forward(low_in.contiguous(fmt), skip, out, fmt);
  return out;
}

void upsample_add_inplace_cuda(const at::Tensor& low, const at::Tensor& skip) {
  check_upsample_add_inplace_args(low, skip);
  TORCH_CHECK(skip.is_cuda(), "upsample_add_inplace: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(skip.device());
  const auto fmt = skip.suggest_memory_format();
  launch_forward(low.contiguous(fmt), skip, skip, fmt);
}

at::Tensor upsample_add_backward_cuda(const at::Tensor& grad_in, int64_t low_h, int64_t low_w) {
  check_upsample_add_backward_args(grad_in, low_h, low_w);
  TORCH_CHECK(grad_in.is_cuda(), "upsample_add_backward: expected a CUDA `grad_out`");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto fmt = grad_in.suggest_memory_format();
  const auto grad = grad_in.contiguous(fmt);
  auto grad_low = at::empty({grad.size(0), grad.size(1), low_h, low_w},
                            grad.options().memory_format(fmt));
  const int64_t total = grad_low.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_add_backward_cuda", [&] {
    // Indexed by the size of grad_out, the larger tensor, whose offsets the kernel computes.
    with_index_type(grad.numel(), [&](auto index) {
      using index_t = decltype(index);
      auto launch = [&](auto kernel) {
        kernel<<<unrolled_blocks(total, kThreads), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), grad_low.mutable_data_ptr<scalar_t>(), dims_of<index_t>(grad_low),
            dims_of<index_t>(grad), static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (fmt == at::MemoryFormat::ChannelsLast) launch(backward_kernel<scalar_t, true, index_t>);
      else launch(backward_kernel<scalar_t, false, index_t>);
    });
  });
  return grad_low;
}

#endif  // FASTHG_HOST_EMULATION

}  // namespace

#ifndef FASTHG_HOST_EMULATION
TORCH_LIBRARY_IMPL(fasthg, CUDA, m) {
  m.impl("upsample_add", &upsample_add_cuda);
  m.impl("upsample_add_inplace", &upsample_add_inplace_cuda);
  m.impl("upsample_add_backward", &upsample_add_backward_cuda);
}
#endif

}  // namespace fasthg
