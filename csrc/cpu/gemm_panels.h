// A small GEMM for the fused 1x1-convolution units (conv1x1.cpp): C (+)= A * B with B packed
// in nr-wide column panels and A read in place through two strides, so that the caller can
// hand it a tile it has just written into an L2-sized buffer (the normalised activation, a
// gradient tile) without a second packing pass. ATen-free on purpose: the AVX-512 and AVX2
// variants are compiled under #pragma GCC target in their own files, and no inline function
// of a shared header may be compiled there (the linker could pick that copy for the whole
// library and run AVX-512 code on an AVX2 machine).
#pragma once

#include <cstdint>

namespace fasthg {
namespace gemm {

// C[i][j] (+)= sum_p A(i, p) * Bp(p, j) for i < mp, j < np, p < k, where
//   A(i, p) = a[i * rsa + p * csa]: one of rsa, csa is 1 (a row-major or a column-major tile);
//   Bp is packed in np / nr panels, panel q holding [k][nr] floats: B(p, q * nr + r);
//   C is row-major with row stride ldc. mp is a multiple of mr and np of nr: callers pad
//   their buffers (zero rows and columns) rather than the kernel handling fringes.
// [prefetch, prefetch + prefetch_bytes) is brought towards the L2 a few lines per register
// block, spread over the whole call: the caller's next tile of a memory-bound input arrives
// while this one computes (the SIMD kernels; the plain loops ignore it).
template <typename T>
struct Kernel {
  const char* name;
  int mr, nr;
  void (*run)(const T* a, int64_t rsa, int64_t csa, const T* b, T* c, int64_t ldc, int64_t mp, int64_t np,
              int64_t k, bool accumulate, const void* prefetch, int64_t prefetch_bytes);
};

// Defined in gemm_panels_avx512.cpp and gemm_panels_avx2.cpp (constant-initialised data, so
// reading them runs no code of the other instruction set).
extern const Kernel<float> kAvx512;
extern const Kernel<float> kAvx2;

// Plain loops: float64 (gradcheck), and float32 where the CPU has neither AVX2+FMA nor AVX-512.
template <typename T>
void run_plain(const T* a, int64_t rsa, int64_t csa, const T* b, T* c, int64_t ldc, int64_t mp, int64_t np,
               int64_t k, bool accumulate, const void*, int64_t) {
  constexpr int64_t nr = 8;
  for (int64_t i = 0; i < mp; ++i) {
    for (int64_t q = 0; q < np / nr; ++q) {
      T acc[nr];
      for (int64_t r = 0; r < nr; ++r) acc[r] = accumulate ? c[i * ldc + q * nr + r] : T(0);
      const T* bq = b + q * k * nr;
      for (int64_t p = 0; p < k; ++p) {
        const T av = a[i * rsa + p * csa];
        for (int64_t r = 0; r < nr; ++r) acc[r] += av * bq[p * nr + r];
      }
      for (int64_t r = 0; r < nr; ++r) c[i * ldc + q * nr + r] = acc[r];
    }
  }
}

template <typename T>
constexpr Kernel<T> plain_kernel() {
  return {"plain", 1, 8, &run_plain<T>};
}

// The widest kernel this CPU runs (FASTHG_GEMM=avx2|plain narrows it, for tests and
// benchmarks of the other paths).
const Kernel<float>& best_float_kernel();

// The kernel for T: best_float_kernel for float, the plain loops for double (gradcheck).
template <typename T>
Kernel<T> kernel_for();
template <>
Kernel<float> kernel_for<float>();
template <>
Kernel<double> kernel_for<double>();

}  // namespace gemm
}  // namespace fasthg
