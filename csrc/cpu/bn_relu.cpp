// CPU kernels of the fused BatchNorm+ReLU ops (training statistics, normalise+clamp, the
// two backward passes, and both directions of training in one call each), for NCHW and
// channels_last. The statistics add every term in double (BN backward subtracts nearly
// equal terms, and an ulp off in the mean or variance showed in the gradients); the
// backward's sums add 16 rows in float before each fold into double (two_level_sums).
// The float32, bfloat16 and float16 passes have AVX2 paths, 8 values a vector as floats
// (vec8.h; setup.py builds with AVX2 where the machine has it): a masked select feeding
// double accumulators is beyond GCC's auto-vectoriser.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include <unistd.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "../bn_relu.h"
#include "vec8.h"

namespace fasthg {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task, as in ATen

// A dense tensor seen as [outer, C, inner]: NCHW is [N, C, H*W], NHWC is [N*H*W, C, 1].
struct View {
  int64_t outer, C, inner;
  bool channels_last;
};

View view_of(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) return {N * HW, C, 1, true};
  return {N, C, HW, false};
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

// bn_relu_value for 8 floats, the same operations in the same order. max_ps returns its
// second operand, y, for a NaN and for -0, as bn_relu_value's y < 0 ? 0 : y does.
C10_ALWAYS_INLINE __m256 value8(__m256 x, __m256 m, __m256 s, __m256 w, __m256 b) {
  const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, m), _mm256_mul_ps(s, w)), b);
  return _mm256_max_ps(_mm256_setzero_ps(), y);
}

// bn_relu_masked_grad then bn_relu_grad_input for 8 floats, the same operations in order.
C10_ALWAYS_INLINE __m256 grad8(__m256 dy, __m256 x, __m256 m, __m256 s, __m256 w, __m256 b, __m256 mg,
                               __m256 mgx) {
  const __m256 d = _mm256_sub_ps(x, m);
  const __m256 pre = _mm256_add_ps(_mm256_mul_ps(d, _mm256_mul_ps(s, w)), b);
  const __m256 g = _mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_NLE_UQ), dy);
  const __m256 xhat = _mm256_mul_ps(d, s);
  return _mm256_mul_ps(_mm256_mul_ps(w, s), _mm256_sub_ps(_mm256_sub_ps(g, mg), _mm256_mul_ps(xhat, mgx)));
}

#endif

// NHWC reductions: each thread sums its rows into its own per-channel double partials,
// chunk by chunk, and bands of channels (16 for the statistics, 32 for the backward's sums:
// one or two cache lines of floats per row) walk down a chunk's rows with their sums in
// registers. A chunk sits in L2 while the next one streams in: each line a band reads issues
// a prefetch of the next chunk's lines into L2, in address order (LineStream), which DRAM
// serves as one sequential stream. Measured on 4x256x32x32 from DRAM, on a Zen 5 VM (1 MiB
// L2): the backward sums 0.23 -> 0.15 ms (NCHW's sequential planes: 0.13), the statistics
// 0.105 -> 0.09 ms, against each band's own lines prefetched 64 rows ahead (a stride of C
// floats: short scattered DRAM accesses). Per-row updates of per-channel sums in memory made
// loads of x wait on stores whose addresses matched modulo 4 KiB (1.5-3x slower).
//
// A chunk holds L2/16 of each input. 192 KiB of input (the backward's two inputs: 96 KiB
// each) was right for the 1 MiB L2 of Zen 5 and three times too much for the 512 KiB of a
// Zen 3 VM, whose statistics it left 1.5x slower than NCHW's: at 4x256x32x32 they went
// 0.43-0.49 -> 0.31-0.32 ms with 32 KiB (0.35 with 64), at 64x64 1.75-1.88 -> 1.09-1.11 ms;
// the backward sums moved within the noise. (A whole L2 of chunks, 512 KiB on Zen 5, 0.17.)
// At most 128 KiB, in case a VM reports its L3 as L2.
int64_t chunk_bytes_per_input() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // 0 or -1 where the system does not say
    return std::clamp<int64_t>((l2 > 0 ? l2 : 512 << 10) / 16, 16 << 10, 128 << 10);
  }();
  return bytes;
}

// Rows per chunk of C channels, counted as floats whatever the storage type: 16-bit inputs
// then add in the same order as float32 ones, and their results are the float32 op's, rounded.
int64_t rows_per_chunk(int64_t C) {
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
// Two-level sums for float NHWC bands: up to kFloatRows rows add in float (8 lanes a
// vector, no conversions), then fold into double accumulators. A float sum of 16 terms
// errs by at most 16 ulp of its magnitude (about 4 ulp typically), and what it sums is
// centred (masked gradients), so the doubles carry the precision across rows.
constexpr int64_t kFloatRows = 16;

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

// x and (x - K)^2 added in double: 8 floats as two halves of 4 (see stats_kernel).
C10_ALWAYS_INLINE void add_moments(__m256 x, const __m256d (&k)[2], __m256d (&sx)[2], __m256d (&sq)[2]) {
  const __m256d xd[2] = {_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))};
  for (int h = 0; h < 2; ++h) {
    sx[h] = _mm256_add_pd(sx[h], xd[h]);
    const __m256d d = _mm256_sub_pd(xd[h], k[h]);
#ifdef __FMA__
    sq[h] = _mm256_fmadd_pd(d, d, sq[h]);
#else
    sq[h] = _mm256_add_pd(sq[h], _mm256_mul_pd(d, d));
#endif
  }
}

// Sums of a band of V vectors of channels from c0, rows [r0, r1): s += sum(x) and
// q += sum((x - K)^2), in double.
template <int V, typename T>
C10_ALWAYS_INLINE void band_moments(const T* x, int64_t r0, int64_t r1, int64_t C, int64_t c0,
                                    const double* shift, double* s, double* q, LineStream& next) {
  __m256d k[V][2], sx[V][2] = {}, sq[V][2] = {};
  for (int v = 0; v < V; ++v)
    for (int h = 0; h < 2; ++h) k[v][h] = _mm256_loadu_pd(shift + c0 + 8 * v + 4 * h);
  for (int64_t r = r0; r < r1; ++r)
    for (int v = 0; v < V; ++v) {
      if (starts_line<T, V>(r, v)) next.next();
      add_moments(load8(x + r * C + c0 + 8 * v), k[v], sx[v], sq[v]);
    }
  add_band<V, 1>(sx, {s}, c0);
  add_band<V, 1>(sq, {q}, c0);
}
#endif

// The mean of up to 16 of n values spread evenly (every `stride`-th element from `p`): the
// shift of a one-pass variance (see stats_kernel).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t spread_mean(const scalar_t* p, int64_t n, int64_t stride) {
  const int64_t picks = std::min<int64_t>(n, 16), step = n / picks * stride;  // one division per call
  acc_t k = 0;
  for (int64_t i = 0; i < picks; ++i) k += static_cast<acc_t>(p[i * step]);
  return k * (acc_t(1) / acc_t(picks));
}

// sum(x) and sum((x - k)^2) of one NCHW plane of n elements, in double (see stats_kernel).
// Planes of the small levels are short (16 elements at 4x4): their vectors, the lanes' sum
// and the scalar tail are each paid only where there is something to add.
template <typename scalar_t>
void plane_moments(const scalar_t* __restrict__ x, int64_t n, double k, double& s, double& q) {
  s = q = 0;
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {  // 16 elements a step
    if (n >= 16) {
      const __m256d kd[2] = {_mm256_set1_pd(k), _mm256_set1_pd(k)};
      __m256d sx[2][2] = {}, sq[2][2] = {};
      for (; i + 16 <= n; i += 16) {
        prefetch_ahead(x + i);
        for (int v = 0; v < 2; ++v) add_moments(load8(x + i + 8 * v), kd, sx[v], sq[v]);
      }
      s = hsum(_mm256_add_pd(_mm256_add_pd(sx[0][0], sx[0][1]), _mm256_add_pd(sx[1][0], sx[1][1])));
      q = hsum(_mm256_add_pd(_mm256_add_pd(sq[0][0], sq[0][1]), _mm256_add_pd(sq[1][0], sq[1][1])));
    }
  }
#endif
  if (i == n) return;
  double ts, tq;
  lane_sums(n - i, [&](int64_t j, double& a, double& a2) {
    const double xj = static_cast<double>(x[i + j]), d = xj - k;
    a += xj;
    a2 += d * d;
  }, ts, tq);
  s += ts;
  q += tq;
}

// parts[p * C + c] summed over p, per channel: one partial per image or per thread.
C10_ALWAYS_INLINE double sum_parts(const std::vector<double>& parts, int64_t C, int64_t c) {
  double total = 0;
  for (size_t k = c; k < parts.size(); k += C) total += parts[k];
  return total;
}

// Per-channel mean and biased variance from the partial sums of x and of (x - K)^2 over n
// values: mean = sum(x) / n, M2 = sum((x - K)^2) - n (mean - K)^2.
template <typename acc_t>
void finish_stats(const std::vector<double>& S, const std::vector<double>& Q, const std::vector<double>& K,
                  double n, acc_t* mean, acc_t* var) {
  for (size_t c = 0; c < K.size(); ++c) {
    const double m = sum_parts(S, K.size(), c) / n, dm = m - K[c];
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(std::max(0.0, sum_parts(Q, K.size(), c) - n * dm * dm) / n);
  }
}

// Per-channel mean and biased variance in one pass, every term added in double: mean =
// sum(x) / n, M2 = sum(d^2) - n (mean - K)^2 with d = x - K, K the mean of 16 values spread
// evenly over the channel (over image 0 in NCHW). K is then within a few standard deviations
// of the mean unless the data is built against it, so the difference cancels little (rows
// 0-15 of NHWC instead lost 1e-5 of the variance when they were 100 sigma out), and large
// offsets (1e4 with unit variance) keep their precision. (Float sums of 16 rows folded into double left the mean or variance an
// ulp off now and then, which turned the backward of a BN whose grad_out nearly lies in the
// span of (1, xhat), a tiny difference of large terms, 6e-3 wrong in the hourglass stem.)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void stats_kernel(const scalar_t* x, const View& v, acc_t* mean, acc_t* var) {
  const int64_t C = v.C;
  std::vector<double> K(C);  // the shift: 16 values of each channel spread over image 0 (NCHW) or N*H*W (NHWC)
  for (int64_t c = 0; c < C; ++c)
    K[c] = static_cast<double>(v.channels_last ? spread_mean(x + c, v.outer, C) : spread_mean(x + c * v.inner, v.inner, 1));
  if (!v.channels_last) {  // one partial per plane
    std::vector<double> S(v.outer * C), Q(v.outer * C);
    at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / v.inner), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) plane_moments(x + p * v.inner, v.inner, K[p % C], S[p], Q[p]);
    });
    finish_stats(S, Q, K, double(v.outer * v.inner), mean, var);
    return;
  }
  const int64_t T = at::get_num_threads();  // one partial per thread
  std::vector<double> S(T * C, 0.0), Q(T * C, 0.0);
  for_row_chunks(v.outer, C, rows_per_chunk(C), [&](int64_t t, int64_t r0, int64_t r1, int64_t r2) {
    double* s = &S[t * C];
    double* q = &Q[t * C];
    int64_t c0 = 0;
#ifdef __AVX2__
    if constexpr (kVec8<scalar_t>) {
      LineStream next(x, r1, r2, C);
      for (; c0 + 16 <= C; c0 += 16) band_moments<2>(x, r0, r1, C, c0, K.data(), s, q, next);
      for (; c0 + 8 <= C; c0 += 8) band_moments<1>(x, r0, r1, C, c0, K.data(), s, q, next);
    }
#endif
    for (int64_t c = c0; c < C; ++c) {  // the channels left over (every channel for float64 x)
      double a, a2;
      lane_sums(r1 - r0, [&](int64_t i, double& d1, double& d2) {
        const double xi = static_cast<double>(x[(r0 + i) * C + c]), d = xi - K[c];
        d1 += xi;
        d2 += d * d;
      }, a, a2);
      s[c] += a;
      q[c] += a2;
    }
  });
  finish_stats(S, Q, K, double(v.outer), mean, var);
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

// Normalise+clamp of n elements from x to y, one channel's parameters.
template <typename scalar_t, typename acc_t>
void forward_plane(const scalar_t* __restrict__ xp, scalar_t* __restrict__ yp, int64_t n, acc_t m, acc_t s,
                   acc_t wc, acc_t bc, bool stream) {
  auto one = [&](int64_t i) { yp[i] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(xp[i]), m, s, wc, bc)); };
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(wc), vb = _mm256_set1_ps(bc);
    run8(n, yp, stream, one, [&](int64_t i) {
      prefetch_ahead(xp + i);
      store8(yp + i, value8(load8(xp + i), vm, vs, vw, vb), stream);
    });
    return;
  }
#endif
  run8(n, yp, false, one, [](int64_t) {});
}

// Normalise+clamp of NHWC rows [r0, r1). (Two rows at a time, sharing each load of the
// channel parameters, was 1.2x faster on inputs in cache but 2x slower on inputs from DRAM.)
template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* x, scalar_t* y, int64_t r0, int64_t r1, int64_t C, const acc_t* __restrict__ m,
                  const acc_t* __restrict__ s, const acc_t* __restrict__ wc, const acc_t* __restrict__ bc,
                  bool stream) {
  auto one = [&](int64_t i, int64_t c) {
    y[i] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(x[i]), m[c], s[c], wc[c], bc[c]));
  };
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {
    run8_rows<scalar_t>(r0, r1, C, one, [&](int64_t i, int64_t c) {
      prefetch_ahead(x + i);
      store8(y + i, value8(load8(x + i), load8(m + c), load8(s + c),
                           load8(wc + c), load8(bc + c)), stream);
    });
    return;
  }
#endif
  run8_rows<scalar_t>(r0, r1, C, one, [](int64_t, int64_t) {});
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const scalar_t* x, scalar_t* y, const View& v, const acc_t* mean,
                    const acc_t* invstd, const acc_t* w, const acc_t* b) {
  const bool stream = streams(y, v);
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    forward_plane(x + i0, y + i0, n, mean[c], invstd[c], w[c], b[c], stream);
    fence_streams(stream);
  }, [&](int64_t r0, int64_t r1) {
    forward_rows(x, y, r0, r1, v.C, mean, invstd, w, b, stream);
    fence_streams(stream);
  });
}

// One NCHW plane (constant channel parameters): sums of g and g * xhat. (As plane_moments:
// one horizontal sum per quantity and plane, lanes only for a scalar tail.)
template <typename scalar_t, typename acc_t>
void plane_masked_sums(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ gp, int64_t n, acc_t m,
                       acc_t s, acc_t w, acc_t b, double& sum_g, double& sum_gx) {
  sum_g = sum_gx = 0;
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {  // 32 elements a step, then 8, two-level sums
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vsw = _mm256_set1_ps(s * w), vb = _mm256_set1_ps(b);
    __m256d tg = _mm256_setzero_pd(), tgx = _mm256_setzero_pd();
    auto steps = [&](auto width) {  // the elements from i in steps of V vectors
      constexpr int V = decltype(width)::value;
      if (n - i < 8 * V) return;
      __m256d acc[V][4];
      const scalar_t* x0 = xp + i;
      const scalar_t* g0 = gp + i;
      two_level_sums<V, 2>(0, (n - i) / (8 * V), [&](int64_t r, int v, __m256* p) {
        const int64_t j = r * 8 * V + 8 * v;
        if (v % 2 == 0) {
          prefetch_ahead(x0 + j);
          prefetch_ahead(g0 + j);
        }
        const __m256 d = _mm256_sub_ps(load8(x0 + j), vm);
        const __m256 pre = _mm256_add_ps(_mm256_mul_ps(d, vsw), vb);
        const __m256 g = _mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_NLE_UQ), load8(g0 + j));
        p[0] = _mm256_add_ps(p[0], g);
        p[1] = _mm256_add_ps(p[1], _mm256_mul_ps(g, _mm256_mul_ps(d, vs)));
      }, acc);
      for (auto& v : acc) {
        tg = _mm256_add_pd(tg, _mm256_add_pd(v[0], v[1]));
        tgx = _mm256_add_pd(tgx, _mm256_add_pd(v[2], v[3]));
      }
      i += (n - i) / (8 * V) * (8 * V);
    };
    steps(std::integral_constant<int, 4>());
    steps(std::integral_constant<int, 1>());  // small planes (16 elements at 4x4)
    if (i > 0) {
      sum_g = hsum(tg);
      sum_gx = hsum(tgx);
    }
  }
#endif
  if (i == n) return;
  double tg, tgx;
  lane_sums(n - i, [&](int64_t j, double& a, double& ax) {
    const acc_t xi = static_cast<acc_t>(xp[i + j]);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gp[i + j]), xi, m, s, w, b);
    a += g;
    ax += g * ((xi - m) * s);
  }, tg, tgx);
  sum_g += tg;
  sum_gx += tgx;
}

#ifdef __AVX2__
// sum(g) and sum(g * xhat) of a band of V vectors of channels from c0, rows [r0, r1), with
// g = dy where the forward output was not <= 0, as bn_relu_masked_grad computes it.
template <int V, typename T>
C10_ALWAYS_INLINE void band_masked_sums(const T* x, const T* dy, int64_t r0, int64_t r1, int64_t C,
                                        int64_t c0, const float* m, const float* s, const float* w,
                                        const float* b, double* sg, double* sgx, LineStream& next_x,
                                        LineStream& next_dy) {
  __m256 vm[V], vs[V], vsw[V], vb[V];
  for (int v = 0; v < V; ++v) {
    const int64_t c = c0 + 8 * v;
    vm[v] = load8(m + c);
    vs[v] = load8(s + c);
    vsw[v] = _mm256_mul_ps(vs[v], load8(w + c));
    vb[v] = load8(b + c);
  }
  __m256d acc[V][4];
  two_level_sums<V, 2>(r0, r1, [&](int64_t r, int v, __m256* p) {
    const int64_t i = r * C + c0 + 8 * v;
    if (starts_line<T, V>(r, v)) {
      next_x.next();
      next_dy.next();
    }
    const __m256 d = _mm256_sub_ps(load8(x + i), vm[v]);
    const __m256 pre = _mm256_add_ps(_mm256_mul_ps(d, vsw[v]), vb[v]);
    const __m256 g = _mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_NLE_UQ), load8(dy + i));
    p[0] = _mm256_add_ps(p[0], g);
    p[1] = _mm256_add_ps(p[1], _mm256_mul_ps(g, _mm256_mul_ps(d, vs[v])));
  }, acc);
  add_band<V, 2>(acc, {sg, sgx}, c0);
}
#endif

// sum over N*H*W of g and of g * xhat, g = grad_out masked by the recomputed ReLU.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_reduce_kernel(const scalar_t* dy, const scalar_t* x, const View& v, const acc_t* mean,
                            const acc_t* invstd, const acc_t* w, const acc_t* b, acc_t* sum_g,
                            acc_t* sum_gx) {
  const int64_t C = v.C;
  // Partials to add: one per image in NCHW (planes), one per thread in NHWC.
  const int64_t parts = v.channels_last ? at::get_num_threads() : v.outer;
  std::vector<double> ps(parts * C, 0.0), px(parts * C, 0.0);
  if (!v.channels_last) {
    at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / v.inner), [&](int64_t b0, int64_t e0) {
      for (int64_t p = b0; p < e0; ++p) {
        const int64_t c = p % C;
        plane_masked_sums(x + p * v.inner, dy + p * v.inner, v.inner, mean[c], invstd[c], w[c], b[c], ps[p], px[p]);
      }
    });
  } else {
    for_row_chunks(v.outer, C, rows_per_chunk(C), [&](int64_t t, int64_t r0, int64_t r1, int64_t r2) {
      double* a = &ps[t * C];
      double* ax = &px[t * C];
      int64_t c0 = 0;
#ifdef __AVX2__
      if constexpr (kVec8<scalar_t>) {
        LineStream next_x(x, r1, r2, C), next_dy(dy, r1, r2, C);
        for (; c0 + 32 <= C; c0 += 32) band_masked_sums<4>(x, dy, r0, r1, C, c0, mean, invstd, w, b, a, ax, next_x, next_dy);
        for (; c0 + 8 <= C; c0 += 8) band_masked_sums<1>(x, dy, r0, r1, C, c0, mean, invstd, w, b, a, ax, next_x, next_dy);
      }
#endif
      for (int64_t c = c0; c < C; ++c) {  // the channels left over (every channel for float64 x)
        double sg, sgx;
        lane_sums(r1 - r0, [&](int64_t i, double& g_acc, double& gx_acc) {
          const acc_t xi = static_cast<acc_t>(x[(r0 + i) * C + c]);
          const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[(r0 + i) * C + c]), xi, mean[c], invstd[c], w[c], b[c]);
          g_acc += g;
          gx_acc += g * ((xi - mean[c]) * invstd[c]);
        }, sg, sgx);
        a[c] += sg;
        ax[c] += sgx;
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    sum_g[c] = static_cast<acc_t>(sum_parts(ps, C, c));
    sum_gx[c] = static_cast<acc_t>(sum_parts(px, C, c));
  }
}

// grad_x of n elements of one channel.
template <typename scalar_t, typename acc_t>
void grad_plane(const scalar_t* __restrict__ gp, const scalar_t* __restrict__ xp, scalar_t* __restrict__ dp,
                int64_t n, acc_t m, acc_t s, acc_t wc, acc_t bc, acc_t mg, acc_t mgx, bool stream) {
  auto one = [&](int64_t i) {
    const acc_t xi = static_cast<acc_t>(xp[i]);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gp[i]), xi, m, s, wc, bc);
    dp[i] = static_cast<scalar_t>(bn_relu_grad_input(g, xi, m, s, wc, mg, mgx));
  };
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(wc), vb = _mm256_set1_ps(bc),
                 vmg = _mm256_set1_ps(mg), vmgx = _mm256_set1_ps(mgx);
    run8(n, dp, stream, one, [&](int64_t i) {
      prefetch_ahead(gp + i);
      prefetch_ahead(xp + i);
      store8(dp + i, grad8(load8(gp + i), load8(xp + i), vm, vs, vw, vb, vmg, vmgx), stream);
    });
    return;
  }
#endif
  run8(n, dp, false, one, [](int64_t) {});
}

// grad_x of NHWC rows [r0, r1).
template <typename scalar_t, typename acc_t>
void grad_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t r0, int64_t r1, int64_t C,
               const acc_t* __restrict__ m, const acc_t* __restrict__ s, const acc_t* __restrict__ wc,
               const acc_t* __restrict__ bc, const acc_t* __restrict__ mg, const acc_t* __restrict__ mgx,
               bool stream) {
  auto one = [&](int64_t i, int64_t c) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[i]), xi, m[c], s[c], wc[c], bc[c]);
    dx[i] = static_cast<scalar_t>(bn_relu_grad_input(g, xi, m[c], s[c], wc[c], mg[c], mgx[c]));
  };
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {
    run8_rows<scalar_t>(r0, r1, C, one, [&](int64_t i, int64_t c) {
      prefetch_ahead(dy + i);
      prefetch_ahead(x + i);
      store8(dx + i, grad8(load8(dy + i), load8(x + i), load8(m + c),
                           load8(s + c), load8(wc + c), load8(bc + c),
                           load8(mg + c), load8(mgx + c)), stream);
    });
    return;
  }
#endif
  run8_rows<scalar_t>(r0, r1, C, one, [](int64_t, int64_t) {});
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_elemt_kernel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const View& v,
                           const acc_t* mean, const acc_t* invstd, const acc_t* w, const acc_t* b,
                           const acc_t* mean_g, const acc_t* mean_gx) {
  const bool stream = streams(dx, v);
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    grad_plane(dy + i0, x + i0, dx + i0, n, mean[c], invstd[c], w[c], b[c], mean_g[c], mean_gx[c], stream);
    fence_streams(stream);
  }, [&](int64_t r0, int64_t r1) {
    grad_rows(dy, x, dx, r0, r1, v.C, mean, invstd, w, b, mean_g, mean_gx, stream);
    fence_streams(stream);
  });
}

// The training forward and backward in one call each: the same passes, without the Python
// and dispatch between them. (Running each NCHW channel's reduction and elementwise pass
// back to back, its planes still in L2, was 1.1x faster on inputs in cache and 1.3x slower
// on inputs from DRAM: a channel's planes lie 1 MiB apart, short streams for the prefetchers.)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void train_forward_kernel(const scalar_t* x, scalar_t* y, const View& v, const acc_t* w, const acc_t* b,
                          double eps, acc_t* mean, acc_t* var, acc_t* invstd) {
  stats_kernel(x, v, mean, var);
  for (int64_t c = 0; c < v.C; ++c) invstd[c] = bn_relu_invstd(var[c], static_cast<acc_t>(eps));
  forward_kernel(x, y, v, mean, invstd, w, b);
}

// backward_reduce_kernel, then backward_elemt_kernel with mean_g = sum_g / count and
// mean_gx = sum_gx / count (training: the statistics depend on x).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void train_backward_kernel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const View& v, const acc_t* mean,
                           const acc_t* invstd, const acc_t* w, const acc_t* b, acc_t* sum_g, acc_t* sum_gx) {
  const acc_t count = static_cast<acc_t>(v.outer * v.inner);
  backward_reduce_kernel(dy, x, v, mean, invstd, w, b, sum_g, sum_gx);
  std::vector<acc_t> mg(v.C), mgx(v.C);
  for (int64_t c = 0; c < v.C; ++c) {
    mg[c] = sum_g[c] / count;
    mgx[c] = sum_gx[c] / count;
  }
  backward_elemt_kernel(dy, x, dx, v, mean, invstd, w, b, mg.data(), mgx.data());
}

std::tuple<at::Tensor, at::Tensor> bn_relu_stats_cpu(const at::Tensor& x_in) {
  check_bn_relu_input("bn_relu_stats", x_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  auto mean = at::empty({x.size(1)}, x.options().dtype(bn_relu_param_dtype(x)));
  auto var = at::empty({x.size(1)}, x.options().dtype(bn_relu_param_dtype(x)));
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_relu_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel(x.const_data_ptr<scalar_t>(), view_of(x, fmt), mean.mutable_data_ptr<acc_t>(),
                 var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

at::Tensor bn_relu_forward_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_params("bn_relu_forward", x_in, mean, invstd, weight, bias);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  auto y = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_relu_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), view_of(x, fmt),
                   m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                   b.const_data_ptr<acc_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_backward_args("bn_relu_backward_reduce", grad_in, x_in, mean, invstd, weight, bias);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), dy = grad_in.contiguous(fmt);
  const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  auto sum_g = at::empty({x.size(1)}, m.options());
  auto sum_gx = at::empty({x.size(1)}, m.options());
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_reduce_kernel(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), view_of(x, fmt),
                           m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                           b.const_data_ptr<acc_t>(), sum_g.mutable_data_ptr<acc_t>(),
                           sum_gx.mutable_data_ptr<acc_t>());
  });
  return {sum_g, sum_gx};
}

at::Tensor bn_relu_backward_elemt_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& mean_g, const at::Tensor& mean_gx) {
  check_bn_relu_backward_args("bn_relu_backward_elemt", grad_in, x_in, mean, invstd, weight, bias, &mean_g,
                              &mean_gx);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), dy = grad_in.contiguous(fmt);
  auto dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  const auto mg = mean_g.contiguous(), mgx = mean_gx.contiguous();
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_relu_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_elemt_kernel(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                          view_of(x, fmt), m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
                          w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), mg.const_data_ptr<acc_t>(),
                          mgx.const_data_ptr<acc_t>());
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_train_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_bn_relu_train_args("bn_relu_train_forward", x_in, weight, bias);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  auto y = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto popts = x.options().dtype(bn_relu_param_dtype(x));
  auto mean = at::empty({x.size(1)}, popts), var = at::empty({x.size(1)}, popts), invstd = at::empty({x.size(1)}, popts);
  const auto w = weight.contiguous(), b = bias.contiguous();
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_relu_train_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    train_forward_kernel(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), view_of(x, fmt),
                         w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), eps, mean.mutable_data_ptr<acc_t>(),
                         var.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>());
  });
  return {y, mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_backward_args("bn_relu_train_backward", grad_in, x_in, mean, invstd, weight, bias);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), dy = grad_in.contiguous(fmt);
  const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  auto dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  auto sum_g = at::empty({x.size(1)}, m.options()), sum_gx = at::empty({x.size(1)}, m.options());
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_relu_train_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    train_backward_kernel(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                          dx.mutable_data_ptr<scalar_t>(), view_of(x, fmt), m.const_data_ptr<acc_t>(),
                          s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                          sum_g.mutable_data_ptr<acc_t>(), sum_gx.mutable_data_ptr<acc_t>());
  });
  return {dx, sum_g, sum_gx};
}

// bn_relu_train without autograd (under torch.inference_mode, say): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double eps) {
  auto [y, mean, var, invstd] = bn_relu_train_forward_cpu(x, weight, bias, eps);
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("bn_relu_stats", &bn_relu_stats_cpu);
  m.impl("bn_relu_forward", &bn_relu_forward_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt_cpu);
  m.impl("bn_relu_train_forward", &bn_relu_train_forward_cpu);
  m.impl("bn_relu_train_backward", &bn_relu_train_backward_cpu);
  m.impl("bn_relu_train", &bn_relu_train_cpu);
}

}  // namespace fasthg
