// What the CUDA kernels of csrc/cuda use of CUDA, on the CPU: the thread and block indices,
// __syncthreads and __shared__, so that those kernels, compiled as C++ with
// FASTHG_HOST_EMULATION (which leaves out the ops around them), run here against double
// references. A block's threads are real threads (std::barrier for __syncthreads); blocks
// run one after another, so a __shared__ array can be a static. It checks the kernels' index
// math, coverage and sums, not what only a GPU has: warps, the memory model, half/bfloat16
// device conversions, launch limits.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* g_block_barrier = nullptr;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)

template <typename T>
inline T min(T a, T b) {
  return a < b ? a : b;
}

// kernel() on every thread of every block of the grid, blocks in order.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::barrier<> bar(threads);
  g_block_barrier = &bar;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel();
            bar.arrive_and_wait();  // the next block reuses the shared memory
          }
    });
  for (auto& th : pool) th.join();
  g_block_barrier = nullptr;
}

namespace emu {

inline int failures = 0;

inline double rel_err(const std::vector<double>& ref, const std::vector<double>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(got[i])) return INFINITY;  // never written (outputs start as NaN)
    num += (ref[i] - got[i]) * (ref[i] - got[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

template <typename T>
std::vector<double> as_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <typename T>
void expect_close(const char* what, const std::vector<double>& ref, const std::vector<T>& got, double tol,
                  const char* shape) {
  const double err = rel_err(ref, as_double(got));
  if (!(err < tol)) {
    ++failures;
    std::printf("FAILED %s %s: relative error %g (tolerance %g)\n", what, shape, err, tol);
  }
}

inline int finish() {
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures != 0;
}

}  // namespace emu
