// gemm_panels_simd.h's kernel for AVX2 + FMA: 6 x 16 floats of C in 12 ymm registers.
#include <immintrin.h>

#include "gemm_panels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTHG_SIMD_NS avx2
#define V __m256
#define VL 8
#define MR 6
#define NV 2
#define Load(p) _mm256_loadu_ps(p)
#define Store(p, v) _mm256_storeu_ps(p, v)
#define Bcast(p) _mm256_broadcast_ss(p)
#define Fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define Zero() _mm256_setzero_ps()
#include "gemm_panels_simd.h"
#pragma GCC pop_options

namespace fasthg {
namespace gemm {
extern const Kernel<float> kAvx2 = {"avx2", MR, avx2::kNR, &avx2::run};
}  // namespace gemm
}  // namespace fasthg
#else
namespace fasthg {
namespace gemm {
extern const Kernel<float> kAvx2 = {nullptr, 0, 0, nullptr};
}  // namespace gemm
}  // namespace fasthg
#endif
