// The register-tiled kernel of gemm_panels.h, written once over a vector type V of VL floats
// and included by gemm_panels_avx512.cpp (V = __m512) and gemm_panels_avx2.cpp (V = __m256)
// after their #pragma GCC target, with the intrinsics they map Load/Store/Bcast/Fma to.
// MR rows by NV vectors of C stay in registers for the whole k loop (AVX-512: 6 x 4 of 32
// registers; AVX2: 6 x 2 of 16), and each A value is broadcast from memory into the FMAs.
// Not a normal header: no include guard, no includes; the including file defines
// FASTHG_SIMD_NS, V, VL, MR, NV, Load, Store, Bcast, Fma and Zero.

namespace fasthg {
namespace gemm {
namespace FASTHG_SIMD_NS {

constexpr int kNR = NV * VL;

// One MR x NR block of C over the whole k. kRowA: A is row-major (csa == 1), else
// column-major (rsa == 1); the other stride is `lda`.
template <bool kRowA>
__attribute__((always_inline)) inline void block(const float* __restrict a, int64_t lda, const float* __restrict b,
                                                 float* __restrict c, int64_t ldc, int64_t k, bool accumulate) {
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? Load(c + i * ldc + v * VL) : Zero();
  for (int64_t p = 0; p < k; ++p) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + p * kNR + v * VL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V av = Bcast(kRowA ? a + i * lda + p : a + p * lda + i);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = Fma(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store(c + i * ldc + v * VL, acc[i][v]);
}

// k in chunks of kKc, so that B's panel chunk (kKc x NR) and A's row block stay in L1 while
// every row block of A passes the panel.
constexpr int64_t kKc = 128;

template <bool kRowA>
void run_blocks(const float* a, int64_t lda, const float* b, float* c, int64_t ldc, int64_t mp, int64_t np,
                int64_t k, bool accumulate, const char* pf, int64_t pf_bytes) {
  const int64_t blocks = ((k + kKc - 1) / kKc) * (np / kNR) * (mp / MR);
  const int64_t lines_per_block = blocks > 0 ? (pf_bytes / 64 + blocks - 1) / blocks : 0;
  const char* const pf_end = pf + pf_bytes;
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    const int64_t kc = k - p0 < kKc ? k - p0 : kKc;
    const bool acc = accumulate || p0 > 0;
    for (int64_t q = 0; q < np / kNR; ++q) {
      const float* bq = b + q * k * kNR + p0 * kNR;
      for (int64_t i = 0; i < mp; i += MR) {
        const float* ai = kRowA ? a + i * lda + p0 : a + p0 * lda + i;
        block<kRowA>(ai, lda, bq, c + i * ldc + q * kNR, ldc, kc, acc);
        for (int64_t l = 0; l < lines_per_block && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      }
    }
  }
}

void run(const float* a, int64_t rsa, int64_t csa, const float* b, float* c, int64_t ldc, int64_t mp, int64_t np,
         int64_t k, bool accumulate, const void* prefetch, int64_t prefetch_bytes) {
  const char* pf = static_cast<const char*>(prefetch);
  if (csa == 1)
    run_blocks<true>(a, rsa, b, c, ldc, mp, np, k, accumulate, pf, pf ? prefetch_bytes : 0);
  else
    run_blocks<false>(a, csa, b, c, ldc, mp, np, k, accumulate, pf, pf ? prefetch_bytes : 0);
}

}  // namespace FASTHG_SIMD_NS
}  // namespace gemm
}  // namespace fasthg
