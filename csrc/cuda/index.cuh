// Index math of the CUDA kernels. 64-bit division is a long instruction sequence on the GPU,
// and an elementwise kernel that divides per element (to find its channel or coordinates)
// runs out of issue slots before it runs out of memory bandwidth. So tensors of under 2^31
// elements (all the hourglass runs) index in 32 bits and divide by invariant divisors with
// ATen's IntDivider (a multiply-high and a shift); larger ones fall back to int64 indices
// and plain division, which IntDivider<int64_t> is.
#pragma once

#include <c10/macros/Macros.h>  // IntegerDivider.cuh uses C10_HOST_DEVICE without including it

#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace fasthg {

using at::cuda::detail::IntDivider;

// Calls f with a value of the index type for tensors of `numel` elements: uint32_t when every
// index, and every sum of an index and a grid stride, fits (IntDivider<unsigned> needs
// dividends of at most INT32_MAX), int64_t otherwise.
template <typename F>
void with_index_type(int64_t numel, F&& f) {
  if (numel <= std::numeric_limits<int32_t>::max())
    f(uint32_t{});
  else
    f(int64_t{});
}

// This thread's index in a one-dimensional grid, in index_t.
template <typename index_t>
__device__ __forceinline__ index_t thread_in_grid() {
  return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// A grid-stride loop over [0, total) in which each thread takes kUnroll elements a step,
// blockDim apart (each load coalesced across the warp), and loads all of them before it
// stores any: kUnroll loads in flight per thread, where a one-element loop has one, too few
// bytes in flight per SM to cover DRAM latency at Hopper's bandwidth. load(i) returns what
// store(i, value) needs. Launch with unrolled_blocks(total, threads) blocks.
constexpr int kUnroll = 4;

template <typename index_t, typename Load, typename Store>
__device__ __forceinline__ void unrolled_grid_loop(index_t total, Load load, Store store) {
  using value_t = decltype(load(index_t(0)));
  const index_t step = static_cast<index_t>(blockDim.x) * kUnroll;
  for (index_t base = static_cast<index_t>(blockIdx.x) * step; base < total; base += step * gridDim.x) {
    value_t v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t i = base + threadIdx.x + static_cast<index_t>(k) * blockDim.x;
      if (i < total) v[k] = load(i);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t i = base + threadIdx.x + static_cast<index_t>(k) * blockDim.x;
      if (i < total) store(i, v[k]);
    }
  }
}

// Blocks for unrolled_grid_loop: one step of the loop per block, at most 2^20 blocks (the
// loop covers the rest; 2^20 steps of 2^10 elements keep uint32 indices from wrapping).
inline unsigned int unrolled_blocks(int64_t total, int threads) {
  const int64_t per_block = int64_t(threads) * kUnroll;
  return static_cast<unsigned int>(std::min<int64_t>((total + per_block - 1) / per_block, int64_t(1) << 20));
}

// Sizes [N, C, H, W] of a dense tensor in NCHW or NHWC order, with the dividers that turn a
// linear index in that order into coordinates (n, c, h, w); `offset` maps them back.
template <typename index_t>
struct Dims {
  index_t N;
  IntDivider<index_t> C, H, W;
};

template <typename index_t>
Dims<index_t> dims(int64_t N, int64_t C, int64_t H, int64_t W) {
  return {static_cast<index_t>(N), IntDivider<index_t>(C), IntDivider<index_t>(H), IntDivider<index_t>(W)};
}

template <typename index_t>
Dims<index_t> dims_of(const at::Tensor& t) {
  return dims<index_t>(t.size(0), t.size(1), t.size(2), t.size(3));
}

// i = ((n * D2 + a2) * D1 + a1) * D0 + a0 into its digits, innermost first.
template <typename index_t>
__device__ __forceinline__ void digits(index_t i, const IntDivider<index_t>& d0, const IntDivider<index_t>& d1,
                                       const IntDivider<index_t>& d2, index_t& a0, index_t& a1, index_t& a2,
                                       index_t& n) {
  auto q = d0.divmod(i);
  a0 = q.mod;
  q = d1.divmod(q.div);
  a1 = q.mod;
  q = d2.divmod(q.div);
  a2 = q.mod;
  n = q.div;
}

template <bool kChannelsLast, typename index_t>
__device__ __forceinline__ void unravel(index_t i, const Dims<index_t>& d, index_t& n, index_t& c,
                                        index_t& h, index_t& w) {
  if (kChannelsLast)
    digits(i, d.C, d.W, d.H, c, w, h, n);
  else
    digits(i, d.W, d.H, d.C, w, h, c, n);
}

template <bool kChannelsLast, typename index_t>
__device__ __forceinline__ index_t offset(const Dims<index_t>& d, index_t n, index_t c, index_t h, index_t w) {
  const index_t C = d.C.divisor, H = d.H.divisor, W = d.W.divisor;
  return kChannelsLast ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

}  // namespace fasthg
