// gemm_panels_simd.h's kernel for AVX-512: 6 x 64 floats of C in 24 zmm registers (per k, 4 loads of B
// and 6 broadcasts of A feed 24 FMAs; 64 columns divide the hourglass's 128 and 256 channels).
#include <immintrin.h>

#include "gemm_panels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define FASTHG_SIMD_NS avx512
#define V __m512
#define VL 16
#define MR 6
#define NV 4
#define Load(p) _mm512_loadu_ps(p)
#define Store(p, v) _mm512_storeu_ps(p, v)
#define Bcast(p) _mm512_set1_ps(*(p))
#define Fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define Zero() _mm512_setzero_ps()
#include "gemm_panels_simd.h"
#pragma GCC pop_options

namespace fasthg {
namespace gemm {
extern const Kernel<float> kAvx512 = {"avx512", MR, avx512::kNR, &avx512::run};
}  // namespace gemm
}  // namespace fasthg
#else
namespace fasthg {
namespace gemm {
extern const Kernel<float> kAvx512 = {nullptr, 0, 0, nullptr};
}  // namespace gemm
}  // namespace fasthg
#endif
