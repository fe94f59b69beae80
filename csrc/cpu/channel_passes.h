// The walks and sums that the CPU kernels' memory-bound passes over an NCHW or NHWC tensor
// share, whatever they compute: the parallel grain, a tensor seen as [outer, C, inner], the
// elementwise walk over its planes or rows, the NHWC reductions' chunks of rows (sized from
// the L2, the next chunk's lines prefetched in address order), and sums in double, as
// independent lanes or as float sums folded into double (two_level_sums). The 8-wide
// loads, stores and prefetches are vec8.h's.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <unistd.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "vec8.h"

namespace fasthg {

// Elements per task: below this, threading costs more than it saves (ATen's value).
constexpr int64_t kGrain = 32768;

// A tensor's data as the kernels take it: read-only, or written.
template <typename T>
const T* in(const at::Tensor& t) {
  return t.const_data_ptr<T>();
}

template <typename T>
T* out(const at::Tensor& t) {
  return t.mutable_data_ptr<T>();
}

// A dense tensor seen as [outer, C, inner]: NCHW is [N, C, H*W], NHWC is [N*H*W, C, 1].
struct View {
  int64_t outer, C, inner;
  bool channels_last;
};

inline View view_of(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) return {N * HW, C, 1, true};
  return {N, C, HW, false};
}

// Calls plane(c, begin, n) for every NCHW plane, or rows(begin_row, end_row) for NHWC.
template <typename P, typename R>
void elementwise(const View& v, P plane, R rows) {
  if (!v.channels_last) {
    at::parallel_for(0, v.outer * v.C, std::max<int64_t>(1, kGrain / v.inner), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) plane(p % v.C, p * v.inner, v.inner);
    });
  } else {
    at::parallel_for(0, v.outer, std::max<int64_t>(1, kGrain / v.C), rows);
  }
}

// run8 for NHWC rows [r0, r1) of C channels: f(i, c) and vec(i, c) (float only) for the
// element i = r * C + c, the 8-wide loop over each row's channels. (Rows start aligned
// when they stream: see streams.)
template <typename scalar_t, typename F, typename V>
C10_ALWAYS_INLINE void run8_rows(int64_t r0, int64_t r1, int64_t C, F f, V vec) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t c = 0;
#ifdef __AVX2__
    if constexpr (kVec8<scalar_t>)
      for (; c + 8 <= C; c += 8) vec(r * C + c, c);
#endif
    for (; c < C; ++c) f(r * C + c, c);
  }
}

// Whether an elementwise pass writing `out` streams its stores. NHWC rows stream only when
// every row starts aligned; NCHW planes peel to alignment (run8).
template <typename scalar_t>
bool streams(const scalar_t* out, const View& v) {
  return fasthg::streams(out, v.outer * v.C * v.inner * int64_t(sizeof(scalar_t)), !v.channels_last || v.C % 8 == 0);
}

// Independent double accumulators: a single chain can be neither vectorised (no
// reassociation) nor pipelined; kLanes of them can be both, and keep double precision.
constexpr int kLanes = 8;

template <typename F>
C10_ALWAYS_INLINE void lane_sums(int64_t n, F f, double& s0, double& s1) {
  double a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) f(i + k, a[k], b[k]);
  for (; i < n; ++i) f(i, a[0], b[0]);
  s0 = s1 = 0;
  for (int k = 0; k < kLanes; ++k) {
    s0 += a[k];
    s1 += b[k];
  }
}

// parts[p * C + c] summed over p, per channel: one partial per image or per thread.
C10_ALWAYS_INLINE double sum_parts(const std::vector<double>& parts, int64_t C, int64_t c) {
  double total = 0;
  for (size_t k = c; k < parts.size(); k += C) total += parts[k];
  return total;
}

// NHWC reductions: each thread sums its rows into its own per-channel double partials,
// chunk by chunk, and bands of channels (one or two cache lines of floats per row) walk
// down a chunk's rows with their sums in registers. A chunk sits in L2 while the next one
// streams in: each line a band reads issues a prefetch of the next chunk's lines into L2,
// in address order (LineStream), which DRAM serves as one sequential stream (each band
// prefetching its own lines ahead, a stride of C, makes short scattered DRAM accesses).
// Per-row updates of per-channel sums in memory would make loads of x wait on stores whose
// addresses match modulo 4 KiB.
//
// A chunk holds L2/16 of each input: a fixed size right for one L2 overflows a smaller one
// (the backward reads two inputs, and the next chunk streams in beside them). At most
// 128 KiB, in case a VM reports its L3 as L2. (Measurements: benchmarks/results/HISTORY.md.)
inline int64_t chunk_bytes_per_input() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // 0 or -1 where the system does not say
    return std::clamp<int64_t>((l2 > 0 ? l2 : 512 << 10) / 16, 16 << 10, 128 << 10);
  }();
  return bytes;
}

// Rows per chunk of C channels, counted as floats whatever the storage type: 16-bit inputs
// then add in the same order as float32 ones, and their results are the float32 op's, rounded.
inline int64_t rows_per_chunk(int64_t C) {
  return std::max<int64_t>(2, chunk_bytes_per_input() / (C * int64_t(sizeof(float))));
}

// Calls f(t, r0, r1, r2) for chunks [r0, r1) of R NHWC rows of C channels, in parallel; t
// is the thread and [r1, r2) its next chunk (empty after the last).
template <typename F>
void for_row_chunks(int64_t rows, int64_t C, int64_t R, F f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
    const int64_t t = at::get_thread_num();
    for (int64_t r0 = b; r0 < e; r0 += R) f(t, r0, std::min(e, r0 + R), std::min(e, r0 + 2 * R));
  });
}

#ifdef __AVX2__
// 8 floats added in double: two halves of 4.
C10_ALWAYS_INLINE void add_pd(__m256 v, __m256d& lo, __m256d& hi) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

C10_ALWAYS_INLINE double hsum(__m256d v) {
  alignas(32) double t[4];
  _mm256_store_pd(t, v);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// Two-level sums for float NHWC bands: up to kFloatRows rows add in float (8 lanes a
// vector, no conversions), then fold into double accumulators. A float sum of 16 terms
// errs by at most 16 ulp of its magnitude (about 4 ulp typically), and what it sums is
// centred (masked gradients), so the doubles carry the precision across rows.
constexpr int64_t kFloatRows = 16;

// The same two levels for per-row epilogues (the AMX kernels' per-channel sums, any math
// type T): partials added for kFloatRows rows, then folded into double totals, since a
// double accumulation per element cost more than the rest of an epilogue.
// total[k] += part[k] (in double), part[k] = 0, for k < n.
template <typename T>
void fold(T* __restrict part, double* __restrict total, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    total[k] += static_cast<double>(part[k]);
    part[k] = T(0);
  }
}

// Whether row r (of a tile of `rows`) ends a group of kFloatRows, or the tile.
inline bool fold_due(int64_t r, int64_t rows) { return r % kFloatRows == kFloatRows - 1 || r == rows - 1; }

// f(r, n) for the groups of kFloatRows rows [r, r + n) of a tile of `rows`, in order: a pass
// over a group's rows, then its fold.
template <typename F>
void in_float_groups(int64_t rows, F f) {
  for (int64_t r = 0; r < rows; r += kFloatRows) f(r, std::min(kFloatRows, rows - r));
}

// Sums over rows [r0, r1) of f(r, v, p) for V vectors v of 8 channels, f adding Q float
// quantities into p[0..Q); every kFloatRows rows they fold into acc[v][2q], acc[v][2q+1]
// (the low and high halves, in double).
template <int V, int Q, typename F>
C10_ALWAYS_INLINE void two_level_sums(int64_t r0, int64_t r1, F f, __m256d (&acc)[V][2 * Q]) {
  for (auto& a : acc)
    for (auto& d : a) d = _mm256_setzero_pd();
  for (int64_t r = r0; r < r1; r += kFloatRows) {
    __m256 part[V][Q];
    for (auto& p : part)
      for (auto& f32 : p) f32 = _mm256_setzero_ps();
    const int64_t e = std::min(r1, r + kFloatRows);
    for (int64_t i = r; i < e; ++i)
      for (int v = 0; v < V; ++v) f(i, v, part[v]);
    for (int v = 0; v < V; ++v)
      for (int q = 0; q < Q; ++q) add_pd(part[v][q], acc[v][2 * q], acc[v][2 * q + 1]);
  }
}

// Prefetches the cache lines of the elements [r1 * C, r2 * C) into L2, one per next(), in
// address order.
class LineStream {
 public:
  template <typename T>
  LineStream(const T* p, int64_t r1, int64_t r2, int64_t C)
      : p_(reinterpret_cast<uintptr_t>(p + r1 * C)), end_(reinterpret_cast<uintptr_t>(p + r2 * C)) {}
  C10_ALWAYS_INLINE void next() {
    if (p_ < end_) {
      _mm_prefetch(reinterpret_cast<const char*>(p_), _MM_HINT_T2);
      p_ += 64;
    }
  }

 private:
  uintptr_t p_, end_;
};

// Whether vector v of row r, in a band of V vectors of T, starts a cache line's worth of
// the stream: a line holds 2 vectors of float, 4 of bfloat16 or half.
template <typename T, int V>
C10_ALWAYS_INLINE bool starts_line(int64_t r, int v) {
  constexpr int per_line = 64 / (8 * sizeof(T));
  return (r * V + v) % per_line == 0;
}

// out[q][c0 + 8v ..] += acc[v][2q], acc[v][2q + 1], for the Q per-channel sums.
template <int V, int Q>
C10_ALWAYS_INLINE void add_band(const __m256d (&acc)[V][2 * Q], double* const (&out)[Q], int64_t c0) {
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < V; ++v) {
      double* o = out[q] + c0 + 8 * v;
      _mm256_storeu_pd(o, _mm256_add_pd(_mm256_loadu_pd(o), acc[v][2 * q]));
      _mm256_storeu_pd(o + 4, _mm256_add_pd(_mm256_loadu_pd(o + 4), acc[v][2 * q + 1]));
    }
}
#endif

}  // namespace fasthg
