// bf16_rows.h's passes, compiled for AVX-512 + AVX512_BF16 (only called where available()).
#include "bf16_rows.h"

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// GCC 12's own intrinsics (their _mm512_undefined operands) trip this warning.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace fasthg {
namespace bf16rows {
namespace {

// Lanes k .. k + 15 that lie below n.
inline __mmask16 lanes(int64_t k, int64_t n) {
  return n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
}

// The passes run f(k, m) for each 16 lanes from k, f templated on whether all 16 are in
// (Full: plain loads and stores) or only those in m (the tail): a masked store does not
// forward to a later load of the same address, which the running sums' loads waited on.
template <typename F>
inline __attribute__((always_inline)) void each16(int64_t n, F f) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) f(std::true_type{}, k, __mmask16(0xFFFF));
  if (k < n) f(std::false_type{}, k, lanes(k, n));
}

template <bool Full>
inline __attribute__((always_inline)) __m512 load(const float* p, __mmask16 m) {
  return Full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

template <bool Full>
inline __attribute__((always_inline)) void store(float* p, __m512 v, __mmask16 m) {
  if (Full)
    _mm512_storeu_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, m, v);
}

inline __m512 from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

template <bool Full>
inline __attribute__((always_inline)) __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return from_bf16(Full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p));
}

inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// 16 bf16 into dst, the lanes in m.
template <bool Full>
inline __attribute__((always_inline)) void put(uint16_t* dst, __m256i h, __mmask16 m) {
  if (Full)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
  else
    _mm256_mask_storeu_epi16(dst, m, h);
}

// The BN's constants for 16 lanes from channel k.
template <bool Full>
struct Lanes {
  __m512 mean, scale, bias, invstd;
  Lanes(const Channels& ch, int64_t k, __mmask16 m)
      : mean(load<Full>(ch.mean + k, m)), scale(load<Full>(ch.scale + k, m)), bias(load<Full>(ch.bias + k, m)),
        invstd(load<Full>(ch.invstd + k, m)) {}
  // The pre-activation d * scale + bias of d = x - mean.
  __m512 pre(__m512 d) const { return _mm512_add_ps(_mm512_mul_ps(d, scale), bias); }
  // relu((x - mean) * scale + bias): max_ps returns its second operand for a NaN, as the
  // scalar y < 0 ? 0 : y does.
  static __m512 relu(__m512 pre) { return _mm512_max_ps(_mm512_setzero_ps(), pre); }
  __m512 value(__m512 x) const { return relu(pre(_mm512_sub_ps(x, mean))); }
  // da where the pre-activation is > 0 or NaN (not <= 0), else 0, rounded to bf16.
  static __m256i masked(__m512 da, __m512 pre, __mmask16 m) {
    const __mmask16 pass = _mm512_mask_cmp_ps_mask(m, pre, _mm512_setzero_ps(), _CMP_NLE_UQ);
    return to_bf16(_mm512_maskz_mov_ps(pass, da));
  }
};

// Two rows' 16 values as 16 VNNI pairs: cvtne2ps puts row 0's in the low half and row 1's in
// the high one; the permutation interleaves them.
inline __m512i pairs(__m512 a0, __m512 a1) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(a1, a0));
}

// 16 pairs into dst, the lanes in m (a pair is a float's 32 bits).
template <bool Full>
inline __attribute__((always_inline)) void put_pairs(uint16_t* dst, __m512i v, __mmask16 m) {
  store<Full>(reinterpret_cast<float*>(dst), _mm512_castsi512_ps(v), m);
}

// total[k .. k + 16) += v's lanes in double, those in m: a group's float sums folded into
// the running totals (channel_passes.h's fold, from registers).
template <bool Full>
inline __attribute__((always_inline)) void fold16(double* total, __m512 v, __mmask16 m) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v)), hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
  if (Full) {
    _mm512_storeu_pd(total, _mm512_add_pd(_mm512_loadu_pd(total), lo));
    _mm512_storeu_pd(total + 8, _mm512_add_pd(_mm512_loadu_pd(total + 8), hi));
  } else {
    const __mmask8 ml = static_cast<__mmask8>(m), mh = static_cast<__mmask8>(m >> 8);
    _mm512_mask_storeu_pd(total, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, total), lo));
    _mm512_mask_storeu_pd(total + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, total + 8), hi));
  }
}

// The elementwise passes take rows [0, rows) kRowBlock at a time, each 16 lanes of a block
// with its channels' constants loaded once; the summing ones take their group's rows for each
// 16 lanes, the sums in registers (fold16).
constexpr int64_t kRowBlock = 4;

template <typename F>
inline __attribute__((always_inline)) void each_block(int64_t rows, F f) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) f(r0, std::min(kRowBlock, rows - r0));
}

// x comes from memory, in tiles between AMX GEMMs that leave the hardware prefetchers nothing
// to follow: each block prefetches its own lines' worth kAheadBytes further on (vec8.h's
// distance; a prefetch past the end of x does not fault).
constexpr int64_t kAheadBytes = 2048;

inline __attribute__((always_inline)) void ahead(const uint16_t* x, int64_t r0, int64_t nr, int64_t n) {
  const char* p = reinterpret_cast<const char*>(x + r0 * n) + kAheadBytes;
  for (int64_t o = 0; o < nr * n * 2; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

}  // namespace

void activation(const uint16_t* x, int64_t rows, int64_t n, const Channels& ch, uint16_t* dst) {
  each_block(rows, [&](int64_t r0, int64_t r1) {
    ahead(x, r0, r1, n);
    each16(n, [&](auto full, int64_t k, __mmask16 m) {
      constexpr bool F = decltype(full)::value;
      const Lanes<F> c(ch, k, m);
      for (int64_t r = r0; r < r0 + r1; ++r) put<F>(dst + r * n + k, to_bf16(c.value(load_bf16<F>(x + r * n + k, m))), m);
    });
  });
}

void store(const float* c, const float* bias, int64_t rows, int64_t n, uint16_t* y, double* s, double* s2) {
  if (!s) {
    each_block(rows, [&](int64_t r0, int64_t r1) {
      each16(n, [&](auto full, int64_t j, __mmask16 m) {
        constexpr bool F = decltype(full)::value;
        const __m512 b = load<F>(bias + j, m);
        for (int64_t r = r0; r < r0 + r1; ++r) put<F>(y + r * n + j, to_bf16(_mm512_add_ps(load<F>(c + r * n + j, m), b)), m);
      });
    });
    return;
  }
  each16(n, [&](auto full, int64_t j, __mmask16 m) {
    constexpr bool F = decltype(full)::value;
    const __m512 b = load<F>(bias + j, m);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (int64_t r = 0; r < rows; ++r) {
      const __m256i h = to_bf16(_mm512_add_ps(load<F>(c + r * n + j, m), b));
      put<F>(y + r * n + j, h, m);
      const __m512 v = from_bf16(h);  // the value as stored
      a0 = _mm512_add_ps(a0, v);
      a1 = _mm512_add_ps(a1, _mm512_mul_ps(v, v));
    }
    fold16<F>(s + j, a0, m);
    fold16<F>(s2 + j, a1, m);
  });
}

void masked_grad(const float* da, const uint16_t* x, int64_t rows, int64_t n, const Channels& ch, double* sg,
                 double* sgx, uint16_t* g, const Pairs& act) {
  ahead(x, 0, rows, n);
  each16(n, [&](auto full, int64_t k, __mmask16 m) {
    constexpr bool F = decltype(full)::value;
    const Lanes<F> c(ch, k, m);
    const int64_t j0 = k - k % act.block, w = std::min(act.block, n - j0);
    uint16_t* a = act.tile + j0 * act.rows + act.row0 * w + 2 * (k - j0);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    // Row r's g, its sums, and its activation.
    auto row = [&](int64_t r) {
      const __m512 d = _mm512_sub_ps(load_bf16<F>(x + r * n + k, m), c.mean), p = c.pre(d);
      const __m256i h = c.masked(load<F>(da + r * n + k, m), p, m);
      put<F>(g + r * n + k, h, m);
      const __m512 gv = from_bf16(h);
      s0 = _mm512_add_ps(s0, gv);
      s1 = _mm512_add_ps(s1, _mm512_mul_ps(gv, _mm512_mul_ps(d, c.invstd)));
      return Lanes<F>::relu(p);
    };
    for (int64_t r = 0; r < rows; r += 2) {
      const __m512 a0 = row(r);
      const __m512 a1 = r + 1 < rows ? row(r + 1) : _mm512_setzero_ps();
      put_pairs<F>(a + r * w, pairs(a0, a1), m);
    }
    fold16<F>(sg + k, s0, m);
    fold16<F>(sgx + k, s1, m);
  });
}

void grad_input(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t n, const Channels& ch, const float* mean_g,
                const float* mean_gx, const uint16_t* skip, uint16_t* gx) {
  each_block(rows, [&](int64_t r0, int64_t r1) {
    ahead(x, r0, r1, n);
    ahead(g, r0, r1, n);
    if (skip) ahead(skip, r0, r1, n);
    each16(n, [&](auto full, int64_t k, __mmask16 m) {
      constexpr bool F = decltype(full)::value;
      const Lanes<F> c(ch, k, m);
      const __m512 mg = load<F>(mean_g + k, m), mgx = load<F>(mean_gx + k, m);
      for (int64_t r = r0; r < r0 + r1; ++r) {
        const __m512 d = _mm512_sub_ps(load_bf16<F>(x + r * n + k, m), c.mean);
        const __m512 gv = load_bf16<F>(g + r * n + k, m);
        const __m512 xhat = _mm512_mul_ps(d, c.invstd);
        const __m512 centred = _mm512_sub_ps(_mm512_sub_ps(gv, mg), _mm512_mul_ps(xhat, mgx));
        __m512 d_x = _mm512_mul_ps(c.scale, centred);
        if (skip) d_x = _mm512_add_ps(d_x, load_bf16<F>(skip + r * n + k, m));
        put<F>(gx + r * n + k, to_bf16(d_x), m);
      }
    });
  });
}

namespace {

// s[0 .. 16 V) += the sums of V full vectors of each row, the rows read in order (each line once,
// as the hardware prefetchers follow), the sums in registers.
template <int V>
void add_rows(const uint16_t* src, int64_t rows, int64_t n, double* s) {
  __m512 a[V];
  for (auto& v : a) v = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < V; ++v) a[v] = _mm512_add_ps(a[v], load_bf16<true>(src + r * n + 16 * v, 0xFFFF));
  for (int v = 0; v < V; ++v) fold16<true>(s + 16 * v, a[v], 0xFFFF);
}

}  // namespace

void add(const uint16_t* src, int64_t rows, int64_t n, double* s) {
  int64_t j0 = 0;
  for (; n - j0 >= 256; j0 += 256) add_rows<16>(src + j0, rows, n, s + j0);
  if (n - j0 >= 128) add_rows<8>(src + j0, rows, n, s + j0), j0 += 128;
  if (n - j0 >= 64) add_rows<4>(src + j0, rows, n, s + j0), j0 += 64;
  each16(n - j0, [&](auto full, int64_t j, __mmask16 m) {  // the rest by columns
    constexpr bool F = decltype(full)::value;
    __m512 a = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) a = _mm512_add_ps(a, load_bf16<F>(src + r * n + j0 + j, m));
    fold16<F>(s + j0 + j, a, m);
  });
}

float sum(const uint16_t* src, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;  // four chains: the adds' latency
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    s0 = _mm512_add_ps(s0, load_bf16<true>(src + j, 0xFFFF));
    s1 = _mm512_add_ps(s1, load_bf16<true>(src + j + 16, 0xFFFF));
    s2 = _mm512_add_ps(s2, load_bf16<true>(src + j + 32, 0xFFFF));
    s3 = _mm512_add_ps(s3, load_bf16<true>(src + j + 48, 0xFFFF));
  }
  for (; j < n; j += 16) s0 = _mm512_add_ps(s0, load_bf16<false>(src + j, lanes(j, n)));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

int64_t pair_rows(const uint16_t* r0, const uint16_t* r1, int64_t n, uint16_t* d) {
  // Output word k of a 32-word half takes input word k / 2 of r0 (k even) or of r1 (k odd).
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512i a = _mm512_loadu_si512(r0 + j), b = _mm512_loadu_si512(r1 + j);
    _mm512_storeu_si512(d + 2 * j, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(d + 2 * j + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
  return j;
}

void transpose_block(const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  // Rows 2i and 2i + 1 as 16 words of pairs, a 16x16 transpose of words (in-lane unpacks of
  // 32 and 64 bits, then 128-bit lane shuffles), each column's 32 rows stored at once.
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i * ld_src)));
    const __m512i b =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (2 * i + 1) * ld_src)));
    r[i] = _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
  }
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  // r[4k + m], lane L: column 4L + m of rows 4k .. 4k + 3.
  for (int m = 0; m < 4; ++m) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    t[4 + m] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    t[8 + m] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
  for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + j * ld_dst, t[j]);
}

}  // namespace bf16rows
}  // namespace fasthg
#pragma GCC pop_options

namespace fasthg {
namespace bf16rows {

// Outside the AVX-512 region: it runs on every CPU, and the compiler may use any instruction
// its target allows anywhere in a function.
bool available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

}  // namespace bf16rows
}  // namespace fasthg
#else
namespace fasthg {
namespace bf16rows {
bool available() { return false; }
void activation(const uint16_t*, int64_t, int64_t, const Channels&, uint16_t*) {}
void store(const float*, const float*, int64_t, int64_t, uint16_t*, double*, double*) {}
void masked_grad(const float*, const uint16_t*, int64_t, int64_t, const Channels&, double*, double*, uint16_t*,
                 const Pairs&) {}
void grad_input(const uint16_t*, const uint16_t*, int64_t, int64_t, const Channels&, const float*, const float*,
                const uint16_t*, uint16_t*) {}
void add(const uint16_t*, int64_t, int64_t, double*) {}
float sum(const uint16_t*, int64_t) { return 0.f; }
int64_t pair_rows(const uint16_t*, const uint16_t*, int64_t, uint16_t*) { return 0; }
void transpose_block(const uint16_t*, int64_t, uint16_t*, int64_t) {}
}  // namespace bf16rows
}  // namespace fasthg
#endif
