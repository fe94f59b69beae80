// CUDA kernels of fasthg::upsample_add; the math is shared with the CPU twin through
// csrc/upsample_add.h. One thread per output element (forward) or per low element
// (backward, which sums its block of grad_out in registers: no atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../upsample_add.h"

namespace fasthg {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(b, int64_t(1) << 20));
}

// Coordinates (n, c, h, w) of element `i` of a dense tensor of sizes [N, C, H, W] in NCHW
// or NHWC order; `offset` maps them back to the linear index in that order.
struct Dims {
  int64_t N, C, H, W;
};

template <bool kChannelsLast>
__device__ __forceinline__ void unravel(int64_t i, const Dims& d, int64_t& n, int64_t& c,
                                        int64_t& h, int64_t& w) {
  if (kChannelsLast) {
    c = i % d.C; i /= d.C;
    w = i % d.W; i /= d.W;
    h = i % d.H; n = i / d.H;
  } else {
    w = i % d.W; i /= d.W;
    h = i % d.H; i /= d.H;
    c = i % d.C; n = i / d.C;
  }
}

template <bool kChannelsLast>
__device__ __forceinline__ int64_t offset(const Dims& d, int64_t n, int64_t c, int64_t h,
                                          int64_t w) {
  return kChannelsLast ? ((n * d.H + h) * d.W + w) * d.C + c : ((n * d.C + c) * d.H + h) * d.W + w;
}

template <typename scalar_t, bool kChannelsLast>
__global__ void forward_kernel(const scalar_t* __restrict__ low, const scalar_t* __restrict__ skip,
                               scalar_t* __restrict__ out, Dims lo, Dims hi, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t n, c, h, w;
    unravel<kChannelsLast>(i, hi, n, c, h, w);
    const int64_t src = offset<kChannelsLast>(lo, n, c, nearest_src(h, lo.H, hi.H),
                                              nearest_src(w, lo.W, hi.W));
    out[i] = skip[i] + low[src];
  }
}

template <typename scalar_t, bool kChannelsLast>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_low,
                                Dims lo, Dims hi, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t n, c, h, w;
    unravel<kChannelsLast>(i, lo, n, c, h, w);
    const int64_t h0 = nearest_dst_begin(h, lo.H, hi.H), h1 = nearest_dst_begin(h + 1, lo.H, hi.H);
    const int64_t w0 = nearest_dst_begin(w, lo.W, hi.W), w1 = nearest_dst_begin(w + 1, lo.W, hi.W);
    acc_t acc = 0;
    for (int64_t y = h0; y < h1; ++y)
      for (int64_t x = w0; x < w1; ++x) acc += static_cast<acc_t>(grad[offset<kChannelsLast>(hi, n, c, y, x)]);
    grad_low[i] = static_cast<scalar_t>(acc);
  }
}

Dims dims_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

at::Tensor upsample_add_cuda(const at::Tensor& low_in, const at::Tensor& skip_in) {
  check_upsample_add_args(low_in, skip_in);
  TORCH_CHECK(skip_in.is_cuda(), "upsample_add: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(skip_in.device());
  const auto fmt = skip_in.suggest_memory_format();
  const auto skip = skip_in.contiguous(fmt);
  const auto low = low_in.contiguous(fmt);
  auto out = at::empty(skip.sizes(), skip.options().memory_format(fmt));
  const int64_t total = out.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, skip.scalar_type(), "upsample_add_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          low.const_data_ptr<scalar_t>(), skip.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), dims_of(low), dims_of(skip), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (fmt == at::MemoryFormat::ChannelsLast) launch(forward_kernel<scalar_t, true>);
    else launch(forward_kernel<scalar_t, false>);
  });
  return out;
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
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), grad_low.mutable_data_ptr<scalar_t>(),
          dims_of(grad_low), dims_of(grad), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (fmt == at::MemoryFormat::ChannelsLast) launch(backward_kernel<scalar_t, true>);
    else launch(backward_kernel<scalar_t, false>);
  });
  return grad_low;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CUDA, m) {
  m.impl("upsample_add", &upsample_add_cuda);
  m.impl("upsample_add_backward", &upsample_add_backward_cuda);
}

}  // namespace fasthg
