// Index math of the CUDA kernels. 64-bit division is a long instruction sequence on the GPU,
// and an elementwise kernel that divides per element (to find its channel or coordinates)
// runs out of issue slots before it runs out of memory bandwidth. So tensors of under 2^31
// elements (all the hourglass runs) index in 32 bits and divide by invariant divisors with
// ATen's IntDivider (a multiply-high and a shift); larger ones fall back to int64 indices
// and plain division, which IntDivider<int64_t> is.
#pragma once

#include <c10/macros/Macros.h>  // IntegerDivider.cuh uses C10_HOST_DEVICE without including it

#include <ATen/cuda/detail/IntegerDivider.cuh>

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

// The first index and the stride of a grid-stride loop, in index_t.
template <typename index_t>
__device__ __forceinline__ index_t grid_start() {
  return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename index_t>
__device__ __forceinline__ index_t grid_stride() {
  return static_cast<index_t>(blockDim.x) * gridDim.x;
}

}  // namespace fasthg
