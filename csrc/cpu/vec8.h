// Eight activations at a time as an AVX2 vector of floats, whatever their storage type:
// float, bfloat16 (the high half of a float) and half (F16C), loaded exactly and stored with
// round to nearest even, as c10's conversions do, so a vector and a scalar loop agree; and
// what the CPU kernels' memory-bound passes share: prefetching ahead, streaming stores.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __AVX2__
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fasthg {

// Storage types with an 8-wide path (half needs F16C, which setup.py enables with AVX2).
template <typename T>
constexpr bool kVec8 = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>
#ifdef __F16C__
                       || std::is_same_v<T, c10::Half>
#endif
    ;

C10_ALWAYS_INLINE bool aligned32(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }

C10_ALWAYS_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

C10_ALWAYS_INLINE __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Streaming stores (float only, 32-byte aligned) skip the read-for-ownership of the line.
C10_ALWAYS_INLINE void store8(float* p, __m256 v, bool stream) {
  if (stream)
    _mm256_stream_ps(p, v);
  else
    _mm256_storeu_ps(p, v);
}

// c10::detail::round_to_nearest_even, 8 at a time: NaN becomes 0x7FC0.
C10_ALWAYS_INLINE void store8(c10::BFloat16* p, __m256 v, bool) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // 32 -> 16 bits: packus works within 128-bit lanes, so pack, then gather the two low quarters.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// Elementwise passes and reductions read each thread's share in address order, a stream the
// hardware prefetchers restart at every 4 KiB page (one NCHW plane at 32x32), and they fall
// behind when the loop has work besides loads (the statistics' double sums): a prefetch a
// fixed distance ahead of every vector keeps the stream going across pages. 2 KiB ahead
// beat 1 and 4 KiB (benchmarks/results/HISTORY.md).
constexpr int kAheadBytes = 2048;

template <typename T>
C10_ALWAYS_INLINE void prefetch_ahead(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kAheadBytes, _MM_HINT_T0);
}

#ifdef __F16C__
C10_ALWAYS_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

C10_ALWAYS_INLINE void store8(c10::Half* p, __m256 v, bool) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

}  // namespace fasthg
#endif

namespace fasthg {

// Streaming stores skip the read-for-ownership of each output line: a third less traffic
// for an elementwise pass over tensors too big to stay in cache, but they evict the output,
// so only float outputs over this size stream (a 64x64x256 float level of batch 4 is 16 MiB).
constexpr int64_t kStreamBytes = 8 << 20;

// Whether a pass writing `bytes` of `out` streams its stores: float outputs of kStreamBytes
// and more, starting 32-byte aligned, every vector of them aligned when `rows_aligned`.
template <typename T>
bool streams(const T* out, int64_t bytes, bool rows_aligned) {
#ifdef __AVX2__
  return std::is_same_v<T, float> && bytes >= kStreamBytes && rows_aligned && aligned32(out);
#else
  (void)out, (void)bytes, (void)rows_aligned;
  return false;
#endif
}

// n elements of an elementwise pass writing `out`: an 8-wide AVX2 loop vec(i) (for the kVec8
// types) between scalar elements f(i), the head ones peeled so that streamed stores start
// 32-byte aligned, and the tail.
template <typename T, typename F, typename V>
C10_ALWAYS_INLINE void run8(int64_t n, T* out, bool stream, F f, V vec) {
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (kVec8<T>) {
    if (stream)
      for (; i < n && !aligned32(out + i); ++i) f(i);
    for (; i + 8 <= n; i += 8) vec(i);
  }
#else
  (void)out, (void)stream, (void)vec;
#endif
  for (; i < n; ++i) f(i);
}

// After a parallel task's streaming stores: its lines are visible before the task counts as done.
inline void fence_streams(bool stream) {
#ifdef __AVX2__
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

}  // namespace fasthg
