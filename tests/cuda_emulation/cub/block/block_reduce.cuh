// Stand-in for cub::BlockReduce<T, N>::Sum (the block's sum, on thread 0) for cuda_shim.h.
#pragma once

namespace cub {

template <typename T, int N>
struct BlockReduce {
  struct TempStorage {
    T v[N];
  };
  TempStorage& s;
  explicit BlockReduce(TempStorage& t) : s(t) {}

  T Sum(T x) {
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    s.v[tid] = x;
    __syncthreads();
    T sum = 0;
    if (tid == 0)
      for (int i = 0; i < N; ++i) sum += s.v[i];
    __syncthreads();
    return sum;
  }
};

}  // namespace cub
