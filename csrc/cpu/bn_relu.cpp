// CPU kernels of the fused BatchNorm+ReLU ops (training statistics, normalise+clamp, and
// the two backward passes), for NCHW and channels_last. Sums run in double (BN backward
// subtracts nearly equal terms) per chunk (a plane in NCHW, a block of pixels in NHWC), and
// chunks merge with Chan's formula, so large N*H*W and large means keep their precision;
// float32 NHWC sums add 16 rows in float before each fold into double (two_level_sums).
// The float32 passes have AVX2 paths (setup.py builds with AVX2 where the machine has it):
// a masked select feeding double accumulators is beyond GCC's auto-vectoriser.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "../bn_relu.h"

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

// Rows of C channels per NHWC chunk: enough work per task, few partials to merge.
int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(16, 16384 / C); }

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

// The backward reduction's terms for 8 float elements, as bn_relu_masked_grad computes
// them: g = dy where (x - mean) * (invstd * weight) + bias > 0, and g * xhat.
C10_ALWAYS_INLINE void add_masked_terms(__m256 x, __m256 dy, __m256 mean, __m256 invstd, __m256 weight,
                                        __m256 bias, __m256d* acc /* g lo, g hi, gx lo, gx hi */) {
  const __m256 d = _mm256_sub_ps(x, mean);
  const __m256 pre = _mm256_add_ps(_mm256_mul_ps(d, _mm256_mul_ps(invstd, weight)), bias);
  const __m256 g = _mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_GT_OQ), dy);
  add_pd(g, acc[0], acc[1]);
  add_pd(_mm256_mul_ps(g, _mm256_mul_ps(d, invstd)), acc[2], acc[3]);
}

C10_ALWAYS_INLINE double hsum(__m256d v) {
  alignas(32) double t[4];
  _mm256_store_pd(t, v);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// bn_relu_value for 8 floats, the same operations in the same order. max_ps returns its
// second operand (+0) for NaN and for -0, as bn_relu_value's y > 0 ? y : 0 does.
C10_ALWAYS_INLINE __m256 value8(__m256 x, __m256 m, __m256 s, __m256 w, __m256 b) {
  const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, m), _mm256_mul_ps(s, w)), b);
  return _mm256_max_ps(y, _mm256_setzero_ps());
}

// bn_relu_masked_grad then bn_relu_grad_input for 8 floats, the same operations in order.
C10_ALWAYS_INLINE __m256 grad8(__m256 dy, __m256 x, __m256 m, __m256 s, __m256 w, __m256 b, __m256 mg,
                               __m256 mgx) {
  const __m256 d = _mm256_sub_ps(x, m);
  const __m256 pre = _mm256_add_ps(_mm256_mul_ps(d, _mm256_mul_ps(s, w)), b);
  const __m256 g = _mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_GT_OQ), dy);
  const __m256 xhat = _mm256_mul_ps(d, s);
  return _mm256_mul_ps(_mm256_mul_ps(w, s), _mm256_sub_ps(_mm256_sub_ps(g, mg), _mm256_mul_ps(xhat, mgx)));
}

// Streaming stores skip the read-for-ownership of each output line: a third less traffic
// for an elementwise pass over tensors too big to stay in cache, but they evict the output,
// so only outputs over this size stream (a 64x64x256 float level of batch 4 is 16 MiB).
constexpr int64_t kStreamBytes = 8 << 20;

C10_ALWAYS_INLINE void store8(float* p, __m256 v, bool stream) {
  if (stream)
    _mm256_stream_ps(p, v);
  else
    _mm256_storeu_ps(p, v);
}

C10_ALWAYS_INLINE bool aligned32(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }
#endif

// Mean and M2 of one NCHW plane: sum, then squared deviations (the plane stays in cache).
template <typename scalar_t>
void plane_stats(const scalar_t* __restrict__ x, int64_t n, double& mean, double& m2) {
  double s, unused;
  lane_sums(n, [&](int64_t i, double& a, double&) { a += static_cast<double>(x[i]); }, s, unused);
  const double m = s / n;
  lane_sums(n, [&](int64_t i, double& a, double&) {
    const double d = static_cast<double>(x[i]) - m;
    a += d * d;
  }, m2, unused);
  mean = m;
}

#ifdef __AVX2__
// Two-level sums for float NHWC blocks: up to kFloatRows rows add in float (8 lanes a
// vector, no conversions), then fold into double accumulators. A float sum of 16 terms
// errs by at most 16 ulp of its magnitude (about 4 ulp typically), and what it sums is
// centred (deviations, masked gradients), so the doubles carry the precision across rows.
constexpr int64_t kFloatRows = 16;

// Sums over rows [r0, r1) of f(r, h) for the two halves h of a 16-channel block, folded
// into acc[h] as (lo, hi) doubles every kFloatRows rows; f returns one or two float vectors.
template <int K, typename F>
C10_ALWAYS_INLINE void two_level_sums(int64_t r0, int64_t r1, F f, __m256d (&acc)[2][2 * K]) {
  for (auto& h : acc)
    for (auto& v : h) v = _mm256_setzero_pd();
  for (int64_t r = r0; r < r1; r += kFloatRows) {
    __m256 part[2][K];
    for (auto& h : part)
      for (auto& v : h) v = _mm256_setzero_ps();
    const int64_t e = std::min(r1, r + kFloatRows);
    for (int64_t i = r; i < e; ++i)
      for (int h = 0; h < 2; ++h) f(i, h, part[h]);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < K; ++k) add_pd(part[h][k], acc[h][2 * k], acc[h][2 * k + 1]);
  }
}

// A block walks its chunk's rows at a stride of C floats, a pattern the hardware
// prefetchers follow poorly (a few lines per 4 KiB page): fetch the same line of the next
// chunk (of R rows) while this one is summed, so that it arrives in time.
C10_ALWAYS_INLINE void prefetch_next_chunk(const float* t, int64_t r, int64_t R, int64_t rows, int64_t C,
                                           int64_t c) {
  if (r + R < rows) _mm_prefetch(reinterpret_cast<const char*>(t + (r + R) * C + c), _MM_HINT_T1);
}

#endif

// Per-channel means and squared deviations of NHWC rows [r0, r1), C channels each. Each
// block of 16 channels (one cache line of floats per row) walks down the rows in one pass of
// shifted sums, d = x - K with K the mean of the block's first 16 rows: K is within a
// fraction of a standard deviation of the mean, so sum(d^2) - sum(d)^2 / n cancels nothing,
// and x - K is exact for large offsets. (A second pass over the chunk's rows would read
// lines that a stride of C floats maps to a few L1 sets, long evicted.) Sums stay in
// registers: per-row updates of per-channel sums in memory made loads of x wait on stores
// whose addresses matched modulo 4 KiB (1.5-3x slower, depending on placement).
template <typename scalar_t>
void rows_stats(const scalar_t* __restrict__ x, int64_t r0, int64_t r1, int64_t C, int64_t rows,
                double* __restrict__ mean, double* __restrict__ m2) {
  int64_t c0 = 0;
  const double n = double(r1 - r0);
#ifdef __AVX2__
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t head = std::min(r1, r0 + kFloatRows);
    const __m256 inv_head = _mm256_set1_ps(1.0f / float(head - r0));
    for (; c0 + 16 <= C; c0 += 16) {
      __m256 shift[2];
      for (int h = 0; h < 2; ++h) {
        __m256 sum = _mm256_setzero_ps();
        for (int64_t r = r0; r < head; ++r) sum = _mm256_add_ps(sum, _mm256_loadu_ps(x + r * C + c0 + 8 * h));
        shift[h] = _mm256_mul_ps(sum, inv_head);
      }
      __m256d dev[2][4];  // per half: d lo, d hi, d^2 lo, d^2 hi
      two_level_sums<2>(r0, r1, [&](int64_t r, int h, __m256* p) {
        prefetch_next_chunk(x, r, r1 - r0, rows, C, c0 + 8 * h);
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + r * C + c0 + 8 * h), shift[h]);
        p[0] = _mm256_add_ps(p[0], d);
        p[1] = _mm256_add_ps(p[1], _mm256_mul_ps(d, d));
      }, dev);
      alignas(32) float k[16];
      alignas(32) double d[16], q[16];
      for (int h = 0; h < 2; ++h) {
        _mm256_store_ps(k + 8 * h, shift[h]);
        for (int j = 0; j < 2; ++j) {
          _mm256_store_pd(d + 8 * h + 4 * j, dev[h][j]);
          _mm256_store_pd(q + 8 * h + 4 * j, dev[h][2 + j]);
        }
      }
      for (int j = 0; j < 16; ++j) {
        mean[c0 + j] = double(k[j]) + d[j] / n;
        m2[c0 + j] = std::max(0.0, q[j] - d[j] * d[j] / n);
      }
    }
  }
#endif
  for (int64_t c = c0; c < C; ++c) {  // the channels left over (every channel for non-float x)
    double sum, sq, unused;
    lane_sums(r1 - r0, [&](int64_t i, double& a, double&) { a += static_cast<double>(x[(r0 + i) * C + c]); },
              sum, unused);
    const double m = sum / n;
    lane_sums(r1 - r0, [&](int64_t i, double& a, double&) {
      const double d = static_cast<double>(x[(r0 + i) * C + c]) - m;
      a += d * d;
    }, sq, unused);
    mean[c] = m;
    m2[c] = sq;
  }
}

// welford_merge of a chunk's per-channel (mean, M2) into a thread's, for all C channels:
// every channel has the same counts, so the weights are computed once, not divided per channel.
void merge_rows(double& n, double* __restrict__ mean, double* __restrict__ m2, double nb,
                const double* __restrict__ mean_b, const double* __restrict__ m2_b, int64_t C) {
  const double total = n + nb, wb = nb / total, wx = n * nb / total;
  for (int64_t c = 0; c < C; ++c) {
    const double delta = mean_b[c] - mean[c];
    mean[c] += delta * wb;
    m2[c] += m2_b[c] + delta * delta * wx;
  }
  n = total;
}

// Per-chunk (count, mean, M2) partials of every channel (a plane in NCHW, a block of rows
// in NHWC), merged per channel with Chan's formula.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void stats_kernel(const scalar_t* x, const View& v, acc_t* mean_out, acc_t* var_out) {
  const int64_t C = v.C;
  const int64_t R = rows_per_chunk(C), chunks = (v.outer + R - 1) / R;
  // Partials to merge: one per image in NCHW (planes), one per thread in NHWC.
  const int64_t parts = v.channels_last ? at::get_num_threads() : v.outer;
  std::vector<double> pn(parts * C, 0.0), pm(parts * C, 0.0), pq(parts * C, 0.0);
  if (!v.channels_last) {
    std::fill(pn.begin(), pn.end(), double(v.inner));
    at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / v.inner), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) plane_stats(x + p * v.inner, v.inner, pm[p], pq[p]);
    });
  } else {
    // Each thread folds its chunks into its own per-channel partial as it goes, so only
    // one partial per thread is left to merge.
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      const int64_t t = at::get_thread_num();
      std::vector<double> m(C), q(C);
      double n = 0;
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * R, r1 = std::min(v.outer, r0 + R);
        rows_stats(x, r0, r1, C, v.outer, m.data(), q.data());
        merge_rows(n, &pm[t * C], &pq[t * C], double(r1 - r0), m.data(), q.data(), C);
      }
      std::fill(&pn[t * C], &pn[t * C] + C, n);
    });
  }
  at::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      double n = 0, m = 0, q = 0;
      for (int64_t k = 0; k < parts; ++k) welford_merge(n, m, q, pn[k * C + c], pm[k * C + c], pq[k * C + c]);
      mean_out[c] = static_cast<acc_t>(m);
      var_out[c] = static_cast<acc_t>(q / n);
    }
  });
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

// Scalar elements [i0, i1) of an elementwise pass, f(i) each, around an 8-wide AVX2 loop
// vec(i) (float only) whose stores start 32-byte aligned when streaming.
template <typename scalar_t, typename F, typename V>
C10_ALWAYS_INLINE void run8(int64_t n, scalar_t* out, bool stream, F f, V vec) {
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream)
      for (; i < n && !aligned32(out + i); ++i) f(i);
    for (; i + 8 <= n; i += 8) vec(i);
  }
#endif
  for (; i < n; ++i) f(i);
}

// Whether an elementwise pass writing `out` streams its stores (see kStreamBytes).
template <typename scalar_t>
bool streams(const scalar_t* out, const View& v) {
#ifdef __AVX2__
  const int64_t bytes = v.outer * v.C * v.inner * int64_t(sizeof(scalar_t));
  // NHWC rows stream only when every row starts aligned; NCHW planes peel to alignment.
  return std::is_same_v<scalar_t, float> && bytes >= kStreamBytes && aligned32(out) &&
         (!v.channels_last || v.C % 8 == 0);
#else
  return false;
#endif
}

C10_ALWAYS_INLINE void fence_streams(bool stream) {
#ifdef __AVX2__
  if (stream) _mm_sfence();  // streamed lines are visible before the task counts as done
#endif
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const scalar_t* x, scalar_t* y, const View& v, const acc_t* mean,
                    const acc_t* invstd, const acc_t* w, const acc_t* b) {
  const int64_t C = v.C;
  const bool stream = streams(y, v);
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    const scalar_t* __restrict__ xp = x + i0;
    scalar_t* __restrict__ yp = y + i0;
    const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c];
    auto one = [&](int64_t i) { yp[i] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(xp[i]), m, s, wc, bc)); };
#ifdef __AVX2__
    if constexpr (std::is_same_v<scalar_t, float>) {
      const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(wc), vb = _mm256_set1_ps(bc);
      run8(n, yp, stream, one, [&](int64_t i) { store8(yp + i, value8(_mm256_loadu_ps(xp + i), vm, vs, vw, vb), stream); });
      fence_streams(stream);
      return;
    }
#endif
    run8(n, yp, false, one, [](int64_t) {});
  }, [&](int64_t r0, int64_t r1) {
    const acc_t* __restrict__ m = mean;
    const acc_t* __restrict__ s = invstd;
    const acc_t* __restrict__ wc = w;
    const acc_t* __restrict__ bc = b;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
      scalar_t* __restrict__ yr = y + r * C;
      int64_t c0 = 0;
#ifdef __AVX2__
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (; c0 + 8 <= C; c0 += 8)
          store8(yr + c0, value8(_mm256_loadu_ps(xr + c0), _mm256_loadu_ps(m + c0), _mm256_loadu_ps(s + c0),
                                 _mm256_loadu_ps(wc + c0), _mm256_loadu_ps(bc + c0)), stream);
      }
#endif
      for (int64_t c = c0; c < C; ++c)
        yr[c] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(xr[c]), m[c], s[c], wc[c], bc[c]));
    }
    fence_streams(stream);
  });
}

// One NCHW plane (constant channel parameters): sums of g and g * xhat.
template <typename scalar_t, typename acc_t>
void plane_masked_sums(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ gp, int64_t n, acc_t m,
                       acc_t s, acc_t w, acc_t b, double& sum_g, double& sum_gx) {
  double a[kLanes] = {}, ax[kLanes] = {};
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(w), vb = _mm256_set1_ps(b);
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (; i + 8 <= n; i += 8)
      add_masked_terms(_mm256_loadu_ps(xp + i), _mm256_loadu_ps(gp + i), vm, vs, vw, vb, acc);
    a[0] = hsum(_mm256_add_pd(acc[0], acc[1]));
    ax[0] = hsum(_mm256_add_pd(acc[2], acc[3]));
  }
#endif
  for (; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(xp[i]);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gp[i]), xi, m, s, w, b);
    a[i % kLanes] += g;
    ax[i % kLanes] += g * ((xi - m) * s);
  }
  sum_g = sum_gx = 0;
  for (int k = 0; k < kLanes; ++k) {
    sum_g += a[k];
    sum_gx += ax[k];
  }
}

// NHWC rows [r0, r1) of C channels: adds each channel's sums of g and g * xhat to a[c],
// ax[c]. Blocks of 16 channels (a cache line of floats) walk down the rows with two-level
// sums in registers (see rows_stats).
template <typename scalar_t, typename acc_t>
void rows_masked_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t r0, int64_t r1,
                      int64_t C, int64_t rows, const acc_t* __restrict__ m, const acc_t* __restrict__ s,
                      const acc_t* __restrict__ w, const acc_t* __restrict__ b, double* __restrict__ a,
                      double* __restrict__ ax) {
  int64_t c0 = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; c0 + 16 <= C; c0 += 16) {
      __m256 vm[2], vs[2], vsw[2], vb[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t c = c0 + 8 * h;
        vm[h] = _mm256_loadu_ps(m + c);
        vs[h] = _mm256_loadu_ps(s + c);
        vsw[h] = _mm256_mul_ps(vs[h], _mm256_loadu_ps(w + c));
        vb[h] = _mm256_loadu_ps(b + c);
      }
      __m256d acc[2][4];  // per half: g lo, g hi, g*xhat lo, g*xhat hi
      two_level_sums<2>(r0, r1, [&](int64_t r, int h, __m256* p) {
        // bn_relu_masked_grad's mask and g * xhat, as add_masked_terms computes them
        const int64_t i = r * C + c0 + 8 * h;
        prefetch_next_chunk(x, r, r1 - r0, rows, C, c0 + 8 * h);
        prefetch_next_chunk(dy, r, r1 - r0, rows, C, c0 + 8 * h);
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm[h]);
        const __m256 pre = _mm256_add_ps(_mm256_mul_ps(d, vsw[h]), vb[h]);
        const __m256 g = _mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_loadu_ps(dy + i));
        p[0] = _mm256_add_ps(p[0], g);
        p[1] = _mm256_add_ps(p[1], _mm256_mul_ps(g, _mm256_mul_ps(d, vs[h])));
      }, acc);
      for (int h = 0; h < 2; ++h) {
        const int64_t c = c0 + 8 * h;
        _mm256_storeu_pd(a + c, _mm256_add_pd(_mm256_loadu_pd(a + c), acc[h][0]));
        _mm256_storeu_pd(a + c + 4, _mm256_add_pd(_mm256_loadu_pd(a + c + 4), acc[h][1]));
        _mm256_storeu_pd(ax + c, _mm256_add_pd(_mm256_loadu_pd(ax + c), acc[h][2]));
        _mm256_storeu_pd(ax + c + 4, _mm256_add_pd(_mm256_loadu_pd(ax + c + 4), acc[h][3]));
      }
    }
  }
#endif
  for (int64_t c = c0; c < C; ++c) {  // the channels left over (every channel for non-float x)
    double sg, sgx;
    lane_sums(r1 - r0, [&](int64_t i, double& g_acc, double& gx_acc) {
      const acc_t xi = static_cast<acc_t>(x[(r0 + i) * C + c]);
      const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[(r0 + i) * C + c]), xi, m[c], s[c], w[c], b[c]);
      g_acc += g;
      gx_acc += g * ((xi - m[c]) * s[c]);
    }, sg, sgx);
    a[c] += sg;
    ax[c] += sgx;
  }
}

// sum over N*H*W of g and of g * xhat, g = grad_out masked by the recomputed ReLU.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_reduce_kernel(const scalar_t* dy, const scalar_t* x, const View& v, const acc_t* mean,
                            const acc_t* invstd, const acc_t* w, const acc_t* b, acc_t* sum_g,
                            acc_t* sum_gx) {
  const int64_t C = v.C;
  const int64_t R = rows_per_chunk(C), chunks = (v.outer + R - 1) / R;
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
    at::parallel_for(0, chunks, 1, [&](int64_t b0, int64_t e0) {
      const int64_t t = at::get_thread_num();
      for (int64_t k = b0; k < e0; ++k)
        rows_masked_sums(x, dy, k * R, std::min(v.outer, (k + 1) * R), C, v.outer, mean, invstd, w, b, &ps[t * C], &px[t * C]);
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, ax = 0;
    for (int64_t k = 0; k < parts; ++k) {
      a += ps[k * C + c];
      ax += px[k * C + c];
    }
    sum_g[c] = static_cast<acc_t>(a);
    sum_gx[c] = static_cast<acc_t>(ax);
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_elemt_kernel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const View& v,
                           const acc_t* mean, const acc_t* invstd, const acc_t* w, const acc_t* b,
                           const acc_t* mean_g, const acc_t* mean_gx) {
  const int64_t C = v.C;
  const bool stream = streams(dx, v);
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    const scalar_t* __restrict__ xp = x + i0;
    const scalar_t* __restrict__ gp = dy + i0;
    scalar_t* __restrict__ dp = dx + i0;
    const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c], mg = mean_g[c], mgx = mean_gx[c];
    auto one = [&](int64_t i) {
      const acc_t xi = static_cast<acc_t>(xp[i]);
      const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gp[i]), xi, m, s, wc, bc);
      dp[i] = static_cast<scalar_t>(bn_relu_grad_input(g, xi, m, s, wc, mg, mgx));
    };
#ifdef __AVX2__
    if constexpr (std::is_same_v<scalar_t, float>) {
      const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(wc), vb = _mm256_set1_ps(bc),
                   vmg = _mm256_set1_ps(mg), vmgx = _mm256_set1_ps(mgx);
      run8(n, dp, stream, one, [&](int64_t i) {
        store8(dp + i, grad8(_mm256_loadu_ps(gp + i), _mm256_loadu_ps(xp + i), vm, vs, vw, vb, vmg, vmgx), stream);
      });
      fence_streams(stream);
      return;
    }
#endif
    run8(n, dp, false, one, [](int64_t) {});
  }, [&](int64_t r0, int64_t r1) {
    const acc_t* __restrict__ m = mean;
    const acc_t* __restrict__ s = invstd;
    const acc_t* __restrict__ wc = w;
    const acc_t* __restrict__ bc = b;
    const acc_t* __restrict__ mg = mean_g;
    const acc_t* __restrict__ mgx = mean_gx;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
      const scalar_t* __restrict__ gr = dy + r * C;
      scalar_t* __restrict__ dr = dx + r * C;
      int64_t c0 = 0;
#ifdef __AVX2__
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (; c0 + 8 <= C; c0 += 8)
          store8(dr + c0, grad8(_mm256_loadu_ps(gr + c0), _mm256_loadu_ps(xr + c0), _mm256_loadu_ps(m + c0),
                                _mm256_loadu_ps(s + c0), _mm256_loadu_ps(wc + c0), _mm256_loadu_ps(bc + c0),
                                _mm256_loadu_ps(mg + c0), _mm256_loadu_ps(mgx + c0)), stream);
      }
#endif
      for (int64_t c = c0; c < C; ++c) {
        const acc_t xi = static_cast<acc_t>(xr[c]);
        const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gr[c]), xi, m[c], s[c], wc[c], bc[c]);
        dr[c] = static_cast<scalar_t>(bn_relu_grad_input(g, xi, m[c], s[c], wc[c], mg[c], mgx[c]));
      }
    }
    fence_streams(stream);
  });
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

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("bn_relu_stats", &bn_relu_stats_cpu);
  m.impl("bn_relu_forward", &bn_relu_forward_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt_cpu);
}

}  // namespace fasthg
