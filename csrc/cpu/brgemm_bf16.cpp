#include "brgemm_bf16.h"

#include "bf16_rows.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace fasthg {
namespace amx {

bool bf16_available() {
  static const bool yes = [] {
    const char* env = std::getenv("FASTHG_GEMM");
    const std::string want = env ? env : "";
    if (want == "avx512" || want == "avx2" || want == "plain") return false;
    return at::native::cpublas::could_pack(at::kBFloat16);
  }();
  return yes;
}

namespace {

// Whether the AVX-512 layouts of bf16_rows.h run here (every AMX CPU has them).
bool wide() {
  static const bool yes = bf16rows::available();
  return yes;
}

}  // namespace

bool bf16_runs(int64_t c, int64_t cout) { return c % 2 == 0 && cout % 2 == 0 && wide() && bf16_available(); }

void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc, bool accumulate, const c10::BFloat16* a,
          const c10::BFloat16* b, float* c) {
  gemm_window(m, n, k, lda, ldc, accumulate, a, b, k, 0, c);
}

void gemm_window(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc, bool accumulate, const c10::BFloat16* a,
                 const c10::BFloat16* b, int64_t kb, int64_t k0, float* c, int64_t block) {
  for (int64_t j0 = 0; j0 < n; j0 += block) {
    const int64_t w = std::min(block, n - j0);
    at::native::cpublas::brgemm(m, w, k, lda, w, ldc, accumulate, a, b + j0 * kb + k0 * w, c + j0, /*is_vnni=*/true);
  }
}

void release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

namespace {

using u16 = uint16_t;

const u16* bits(const c10::BFloat16* p) { return reinterpret_cast<const u16*>(p); }
u16* bits(c10::BFloat16* p) { return reinterpret_cast<u16*>(p); }

#ifdef __AVX2__
// Eight (p, p + 1) pairs of columns j..j + 7 as eight 32-bit words.
C10_ALWAYS_INLINE __m256i pairs8(const u16* r0, const u16* r1) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1));
  return _mm256_set_m128i(_mm_unpackhi_epi16(a, b), _mm_unpacklo_epi16(a, b));
}

// The 8x8 transpose of 32-bit words in v.
C10_ALWAYS_INLINE void transpose8(__m256i v[8]) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_castsi256_ps(v[i]);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_castps_si256(_mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    v[i + 4] = _mm256_castps_si256(_mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// Rows r0 and r1 (null: zeros) interleaved: d[2j + i] = ri[j] for j < n.
void pair_rows(const u16* r0, const u16* r1, int64_t n, u16* d) {
  int64_t j = 0;
  if (!r0 && !r1) {
    std::memset(d, 0, 2 * n * sizeof(u16));
    return;
  }
  if (r0 && r1 && wide()) j = bf16rows::pair_rows(r0, r1, n, d);
#ifdef __AVX2__
  if (r0 && r1)
    for (; j + 8 <= n; j += 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * j), pairs8(r0 + j, r1 + j));
#endif
  for (; j < n; ++j) {
    d[2 * j] = r0 ? r0[j] : u16(0);
    d[2 * j + 1] = r1 ? r1[j] : u16(0);
  }
}

// One column block of vnni_pairs: [rows / 2][n][2].
void pairs_block(const u16* src, int64_t rows, int64_t n, int64_t ld, u16* dst) {
  for (int64_t p = 0; p < rows; p += 2) pair_rows(src + p * ld, p + 1 < rows ? src + (p + 1) * ld : nullptr, n, dst + p * n);
}

}  // namespace

void vnni_pairs(const c10::BFloat16* src_, int64_t rows, int64_t n, int64_t ld, c10::BFloat16* dst_) {
  const int64_t k2 = rows + rows % 2;
  for (int64_t j0 = 0; j0 < n; j0 += kBlockN)
    pairs_block(bits(src_) + j0, rows, std::min(kBlockN, n - j0), ld, bits(dst_) + j0 * k2);
}

Buffer<c10::BFloat16> vnni_pairs(const c10::BFloat16* src, int64_t rows, int64_t n) {
  Buffer<c10::BFloat16> pairs((rows + rows % 2) * n);
  vnni_pairs(src, rows, n, n, pairs.data());
  return pairs;
}

void vnni_pairs_of(const c10::BFloat16* const* rows, int64_t count, int64_t n, c10::BFloat16* dst_,
                   int64_t block) {
  u16* dst = bits(dst_);
  for (int64_t j0 = 0; j0 < n; j0 += block) {
    const int64_t w = std::min(block, n - j0);
    for (int64_t p = 0; p < count; p += 2) {
      const c10::BFloat16 *r0 = rows[p], *r1 = rows[p + 1];
      pair_rows(r0 ? bits(r0) + j0 : nullptr, r1 ? bits(r1) + j0 : nullptr, w, dst + j0 * count + p * w);
    }
  }
}

void transpose(const c10::BFloat16* src_, int64_t rows, int64_t rows_pad, int64_t n, int64_t ld_src,
               c10::BFloat16* dst_, int64_t ld_dst) {
  const u16* src = bits(src_);
  u16* dst = bits(dst_);
  int64_t p0 = 0;
  if (wide() && n % 16 == 0)  // 32 rows by 16 columns at a time (AVX-512)
    for (; p0 + 32 <= rows; p0 += 32)
      for (int64_t j = 0; j < n; j += 16) bf16rows::transpose_block(src + p0 * ld_src + j, ld_src, dst + j * ld_dst + p0, ld_dst);
#ifdef __AVX2__
  // 16 rows by 8 columns at a time: row pairs as words, then an 8x8 word transpose gives each
  // column's 16 rows.
  for (; p0 + 16 <= rows; p0 += 16) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256i v[8];
      for (int i = 0; i < 8; ++i) v[i] = pairs8(src + (p0 + 2 * i) * ld_src + j, src + (p0 + 2 * i + 1) * ld_src + j);
      transpose8(v);
      for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j + i) * ld_dst + p0), v[i]);
    }
    for (; j < n; ++j)
      for (int64_t p = p0; p < p0 + 16; ++p) dst[j * ld_dst + p] = src[p * ld_src + j];
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t p = p0; p < rows; ++p) dst[j * ld_dst + p] = src[p * ld_src + j];
    std::memset(dst + j * ld_dst + rows, 0, (rows_pad - rows) * sizeof(u16));
  }
}

}  // namespace amx
}  // namespace fasthg
