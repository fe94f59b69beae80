// CPU kernels of the fused BatchNorm+ReLU ops (training statistics, normalise+clamp, the
// two backward passes, and both directions of training in one call each), for NCHW and
// channels_last. The statistics add every term in double (BN backward subtracts nearly
// equal terms, and an ulp off in the mean or variance showed in the gradients); the
// backward's sums add 16 rows in float before each fold into double (two_level_sums).
// The float32, bfloat16 and float16 passes have AVX2 paths, 8 values a vector as floats
// (vec8.h; setup.py builds with AVX2 where the machine has it): a masked select feeding
// double accumulators is beyond GCC's auto-vectoriser. The walks and sums that are not
// BN-ReLU's own (chunks of NHWC rows, lane and two-level sums, line prefetch) are in
// channel_passes.h; the NHWC reductions' bands here are 16 channels for the statistics and
// 32 for the backward's sums.
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

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "../bn_relu.h"
#include "bn_relu_cpu.h"
#include "channel_passes.h"
#include "vec8.h"
#include "bn_relu_vec8.h"

namespace fasthg {
namespace {

#ifdef __AVX2__
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

// Normalise+clamp of NHWC rows [r0, r1), one at a time. (Two rows at a time, sharing each
// load of the channel parameters, was faster on inputs in cache but slower from DRAM.)
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

// grad_x of n elements of one channel, plus skip's where skip is not null (the gradient of
// a residual block's identity branch, which autograd would otherwise add in a pass of its own).
template <typename scalar_t, typename acc_t>
void grad_plane(const scalar_t* __restrict__ gp, const scalar_t* __restrict__ xp, scalar_t* __restrict__ dp,
                int64_t n, acc_t m, acc_t s, acc_t wc, acc_t bc, acc_t mg, acc_t mgx, bool stream,
                const scalar_t* __restrict__ skip) {
  auto one = [&](int64_t i) {
    const acc_t xi = static_cast<acc_t>(xp[i]);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gp[i]), xi, m, s, wc, bc);
    const acc_t d = bn_relu_grad_input(g, xi, m, s, wc, mg, mgx);
    dp[i] = static_cast<scalar_t>(skip ? d + static_cast<acc_t>(skip[i]) : d);
  };
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(wc), vb = _mm256_set1_ps(bc),
                 vmg = _mm256_set1_ps(mg), vmgx = _mm256_set1_ps(mgx);
    run8(n, dp, stream, one, [&](int64_t i) {
      prefetch_ahead(gp + i);
      prefetch_ahead(xp + i);
      __m256 d = grad8(load8(gp + i), load8(xp + i), vm, vs, vw, vb, vmg, vmgx);
      if (skip) {
        prefetch_ahead(skip + i);
        d = _mm256_add_ps(d, load8(skip + i));
      }
      store8(dp + i, d, stream);
    });
    return;
  }
#endif
  run8(n, dp, false, one, [](int64_t) {});
}

// grad_x of NHWC rows [r0, r1), plus skip's where skip is not null.
template <typename scalar_t, typename acc_t>
void grad_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t r0, int64_t r1, int64_t C,
               const acc_t* __restrict__ m, const acc_t* __restrict__ s, const acc_t* __restrict__ wc,
               const acc_t* __restrict__ bc, const acc_t* __restrict__ mg, const acc_t* __restrict__ mgx,
               bool stream, const scalar_t* skip) {
  auto one = [&](int64_t i, int64_t c) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[i]), xi, m[c], s[c], wc[c], bc[c]);
    const acc_t d = bn_relu_grad_input(g, xi, m[c], s[c], wc[c], mg[c], mgx[c]);
    dx[i] = static_cast<scalar_t>(skip ? d + static_cast<acc_t>(skip[i]) : d);
  };
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {
    run8_rows<scalar_t>(r0, r1, C, one, [&](int64_t i, int64_t c) {
      prefetch_ahead(dy + i);
      prefetch_ahead(x + i);
      __m256 d = grad8(load8(dy + i), load8(x + i), load8(m + c), load8(s + c), load8(wc + c), load8(bc + c),
                       load8(mg + c), load8(mgx + c));
      if (skip) {
        prefetch_ahead(skip + i);
        d = _mm256_add_ps(d, load8(skip + i));
      }
      store8(dx + i, d, stream);
    });
    return;
  }
#endif
  run8_rows<scalar_t>(r0, r1, C, one, [](int64_t, int64_t) {});
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_elemt_kernel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const View& v,
                           const acc_t* mean, const acc_t* invstd, const acc_t* w, const acc_t* b,
                           const acc_t* mean_g, const acc_t* mean_gx, const scalar_t* skip = nullptr) {
  const bool stream = streams(dx, v);
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    grad_plane(dy + i0, x + i0, dx + i0, n, mean[c], invstd[c], w[c], b[c], mean_g[c], mean_gx[c], stream,
               skip ? skip + i0 : nullptr);
    fence_streams(stream);
  }, [&](int64_t r0, int64_t r1) {
    grad_rows(dy, x, dx, r0, r1, v.C, mean, invstd, w, b, mean_g, mean_gx, stream, skip);
    fence_streams(stream);
  });
}

// Where E[x^2] - mean^2 keeps less than this share of E[x^2] (a mean large against the
// spread), the float32 sums' rounding (~1e-7 of E[x^2]) would reach 1e-4 of the variance:
// the statistics come from the pass over x instead.
constexpr double kSumsCancel = 1e-3;

// Mean and biased variance from n values' per-channel sum and sum of squares, in double;
// false where a channel cancels (kSumsCancel) or its sums are not finite (NaN included).
template <typename acc_t>
bool stats_from_sums(const acc_t* sum, const acc_t* sum_sq, double n, int64_t C, acc_t* mean, acc_t* var) {
  bool usable = true;
  for (int64_t c = 0; c < C; ++c) {
    const double m = static_cast<double>(sum[c]) / n, e2 = static_cast<double>(sum_sq[c]) / n, d = e2 - m * m;
    usable &= d >= kSumsCancel * e2 && std::isfinite(e2);
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(d);
  }
  return usable;
}

// The training forward and backward in one call each: the same passes, without the Python
// and dispatch between them. (Running each NCHW channel's reduction and elementwise pass
// back to back, its planes still in L2, was faster on inputs in cache but slower from DRAM:
// a channel's planes lie an image apart, short streams for the prefetchers.)
// The statistics from a pass over x or, with sum (and sum_sq) not null, from x's per-channel
// sums (the conv1x1 unit takes them as it writes x) unless stats_from_sums refuses them.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void train_forward_kernel(const scalar_t* x, scalar_t* y, const View& v, const acc_t* w, const acc_t* b,
                          double eps, acc_t* mean, acc_t* var, acc_t* invstd, const acc_t* sum = nullptr,
                          const acc_t* sum_sq = nullptr) {
  if (!sum || !stats_from_sums(sum, sum_sq, static_cast<double>(v.outer * v.inner), v.C, mean, var))
    stats_kernel(x, v, mean, var);
  for (int64_t c = 0; c < v.C; ++c) invstd[c] = bn_relu_invstd(var[c], static_cast<acc_t>(eps));
  forward_kernel(x, y, v, mean, invstd, w, b);
}

// backward_reduce_kernel, then backward_elemt_kernel with mean_g = sum_g / count and
// mean_gx = sum_gx / count (training: the statistics depend on x); skip as grad_plane's.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void train_backward_kernel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const View& v, const acc_t* mean,
                           const acc_t* invstd, const acc_t* w, const acc_t* b, acc_t* sum_g, acc_t* sum_gx,
                           const scalar_t* skip = nullptr) {
  const acc_t count = static_cast<acc_t>(v.outer * v.inner);
  backward_reduce_kernel(dy, x, v, mean, invstd, w, b, sum_g, sum_gx);
  std::vector<acc_t> mg(v.C), mgx(v.C);
  for (int64_t c = 0; c < v.C; ++c) {
    mg[c] = sum_g[c] / count;
    mgx[c] = sum_gx[c] / count;
  }
  backward_elemt_kernel(dy, x, dx, v, mean, invstd, w, b, mg.data(), mgx.data(), skip);
}

// What an op takes besides x, null where it does not: which of bn_relu.h's checks applies,
// and which tensors prepare makes ready.
struct Takes {
  const at::Tensor *grad_out = nullptr, *mean = nullptr, *invstd = nullptr, *weight = nullptr, *bias = nullptr,
                   *mean_g = nullptr, *mean_gx = nullptr;
};

// An op's arguments ready for the kernels: x and grad_out dense in x's memory format, the
// channel tensors contiguous, x seen as [outer, C, inner]; and its outputs' allocation.
struct Args {
  at::MemoryFormat fmt;
  at::Tensor x, dy;                                        // dy: grad_out, where the op takes it
  at::Tensor mean, invstd, weight, bias, mean_g, mean_gx;  // those the op takes
  View v;

  at::Tensor like_x() const { return at::empty(x.sizes(), x.options().memory_format(fmt)); }
  at::Tensor per_channel() const { return at::empty({v.C}, x.options().dtype(bn_relu_param_dtype(x))); }
};

// The one preparation of the seven ops (as dense in csrc/cuda/bn_relu.cu), after the check
// for what the op takes.
Args prepare(const char* op, const at::Tensor& x_in, const Takes& t) {
  if (t.grad_out)
    check_bn_relu_backward_args(op, *t.grad_out, x_in, *t.mean, *t.invstd, *t.weight, *t.bias, t.mean_g, t.mean_gx);
  else if (t.mean)
    check_bn_relu_params(op, x_in, *t.mean, *t.invstd, *t.weight, *t.bias);
  else if (t.weight)
    check_bn_relu_train_args(op, x_in, *t.weight, *t.bias);
  else
    check_bn_relu_input(op, x_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto dense = [](const at::Tensor* p) { return p ? p->contiguous() : at::Tensor(); };
  Args a{fmt, x_in.contiguous(fmt), t.grad_out ? t.grad_out->contiguous(fmt) : at::Tensor(),
         dense(t.mean), dense(t.invstd), dense(t.weight), dense(t.bias), dense(t.mean_g), dense(t.mean_gx), {}};
  a.v = view_of(a.x, fmt);
  return a;
}

std::tuple<at::Tensor, at::Tensor> bn_relu_stats_cpu(const at::Tensor& x) {
  const auto a = prepare("bn_relu_stats", x, {});
  auto mean = a.per_channel(), var = a.per_channel();
  FASTHG_BN_RELU_DISPATCH(a.x.scalar_type(), "bn_relu_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel(in<scalar_t>(a.x), a.v, out<acc_t>(mean), out<acc_t>(var));
  });
  return {mean, var};
}

void forward_into(const Args& a, const at::Tensor& y) {
  FASTHG_BN_RELU_DISPATCH(a.x.scalar_type(), "bn_relu_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel(in<scalar_t>(a.x), out<scalar_t>(y), a.v, in<acc_t>(a.mean), in<acc_t>(a.invstd),
                   in<acc_t>(a.weight), in<acc_t>(a.bias));
  });
}

at::Tensor bn_relu_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor& weight, const at::Tensor& bias) {
  const auto a = prepare("bn_relu_forward", x, {.mean = &mean, .invstd = &invstd, .weight = &weight, .bias = &bias});
  auto y = a.like_x();
  forward_into(a, y);
  return y;
}

void bn_relu_forward_into_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                              const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y) {
  const auto a = prepare("bn_relu_forward_into", x, {.mean = &mean, .invstd = &invstd, .weight = &weight, .bias = &bias});
  check_bn_relu_out("bn_relu_forward_into", y, x);
  forward_into(a, y);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias) {
  const auto a = prepare("bn_relu_backward_reduce", x,
                         {.grad_out = &grad_out, .mean = &mean, .invstd = &invstd, .weight = &weight, .bias = &bias});
  auto sum_g = a.per_channel(), sum_gx = a.per_channel();
  FASTHG_BN_RELU_DISPATCH(a.x.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_reduce_kernel(in<scalar_t>(a.dy), in<scalar_t>(a.x), a.v, in<acc_t>(a.mean), in<acc_t>(a.invstd),
                           in<acc_t>(a.weight), in<acc_t>(a.bias), out<acc_t>(sum_g), out<acc_t>(sum_gx));
  });
  return {sum_g, sum_gx};
}

}  // namespace

at::Tensor bn_relu_backward_elemt_skip_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                           const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                           const at::Tensor& mean_g, const at::Tensor& mean_gx,
                                           const at::Tensor* grad_skip) {
  const char* op = "bn_relu_backward_elemt";
  const auto a = prepare(op, x,
                         {.grad_out = &grad_out, .mean = &mean, .invstd = &invstd, .weight = &weight, .bias = &bias,
                          .mean_g = &mean_g, .mean_gx = &mean_gx});
  at::Tensor skip;
  if (grad_skip) {
    check_same_as_x(op, "grad_skip", *grad_skip, x);
    skip = grad_skip->contiguous(a.fmt);
  }
  auto dx = a.like_x();
  FASTHG_BN_RELU_DISPATCH(a.x.scalar_type(), "bn_relu_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_elemt_kernel(in<scalar_t>(a.dy), in<scalar_t>(a.x), out<scalar_t>(dx), a.v, in<acc_t>(a.mean),
                          in<acc_t>(a.invstd), in<acc_t>(a.weight), in<acc_t>(a.bias), in<acc_t>(a.mean_g),
                          in<acc_t>(a.mean_gx), grad_skip ? in<scalar_t>(skip) : nullptr);
  });
  return dx;
}

namespace {

at::Tensor bn_relu_backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& mean_g, const at::Tensor& mean_gx) {
  return bn_relu_backward_elemt_skip_cpu(grad_out, x, mean, invstd, weight, bias, mean_g, mean_gx, nullptr);
}

// bn_relu_train_forward, and with sum and sum_sq (not null) bn_relu_train_forward_sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_forward(const char* op, const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& bias, double eps,
                                                                         const at::Tensor* sum, const at::Tensor* sum_sq) {
  const auto a = prepare(op, x, {.weight = &weight, .bias = &bias});
  at::Tensor s, s2;
  if (sum) {
    check_bn_relu_channel(op, "sum", *sum, x);
    check_bn_relu_channel(op, "sum_sq", *sum_sq, x);
    s = sum->contiguous();
    s2 = sum_sq->contiguous();
  }
  auto y = a.like_x();
  auto mean = a.per_channel(), var = a.per_channel(), invstd = a.per_channel();
  FASTHG_BN_RELU_DISPATCH(a.x.scalar_type(), "bn_relu_train_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    train_forward_kernel(in<scalar_t>(a.x), out<scalar_t>(y), a.v, in<acc_t>(a.weight), in<acc_t>(a.bias), eps,
                         out<acc_t>(mean), out<acc_t>(var), out<acc_t>(invstd), sum ? in<acc_t>(s) : nullptr,
                         sum ? in<acc_t>(s2) : nullptr);
  });
  return {y, mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_train_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return train_forward("bn_relu_train_forward", x, weight, bias, eps, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_train_forward_sums_cpu(
    const at::Tensor& x, const at::Tensor& sum, const at::Tensor& sum_sq, const at::Tensor& weight,
    const at::Tensor& bias, double eps) {
  return train_forward("bn_relu_train_forward_sums", x, weight, bias, eps, &sum, &sum_sq);
}

// bn_relu_train_backward, and with grad_skip (not null) bn_relu_train_backward_skip.
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_backward(const char* op, const at::Tensor& grad_out,
                                                              const at::Tensor& x, const at::Tensor& mean,
                                                              const at::Tensor& invstd, const at::Tensor& weight,
                                                              const at::Tensor& bias, const at::Tensor* grad_skip) {
  const auto a =
      prepare(op, x, {.grad_out = &grad_out, .mean = &mean, .invstd = &invstd, .weight = &weight, .bias = &bias});
  at::Tensor skip;
  if (grad_skip) {
    check_same_as_x(op, "grad_skip", *grad_skip, x);
    skip = grad_skip->contiguous(a.fmt);
  }
  auto dx = a.like_x();
  auto sum_g = a.per_channel(), sum_gx = a.per_channel();
  FASTHG_BN_RELU_DISPATCH(a.x.scalar_type(), "bn_relu_train_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    train_backward_kernel(in<scalar_t>(a.dy), in<scalar_t>(a.x), out<scalar_t>(dx), a.v, in<acc_t>(a.mean),
                          in<acc_t>(a.invstd), in<acc_t>(a.weight), in<acc_t>(a.bias), out<acc_t>(sum_g),
                          out<acc_t>(sum_gx), grad_skip ? in<scalar_t>(skip) : nullptr);
  });
  return {dx, sum_g, sum_gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias) {
  return train_backward("bn_relu_train_backward", grad_out, x, mean, invstd, weight, bias, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_backward_skip_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& grad_skip) {
  return train_backward("bn_relu_train_backward_skip", grad_out, x, mean, invstd, weight, bias, &grad_skip);
}

// bn_relu_train without autograd (under torch.inference_mode, say): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double eps) {
  auto [y, mean, var, invstd] = bn_relu_train_forward_cpu(x, weight, bias, eps);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_sums_cpu(const at::Tensor& x, const at::Tensor& sum,
                                                                      const at::Tensor& sum_sq, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  auto [y, mean, var, invstd] = bn_relu_train_forward_sums_cpu(x, sum, sum_sq, weight, bias, eps);
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("bn_relu_stats", &bn_relu_stats_cpu);
  m.impl("bn_relu_forward", &bn_relu_forward_cpu);
  m.impl("bn_relu_forward_into", &bn_relu_forward_into_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt_cpu);
  m.impl("bn_relu_train_forward", &bn_relu_train_forward_cpu);
  m.impl("bn_relu_train_backward", &bn_relu_train_backward_cpu);
  m.impl("bn_relu_train_backward_skip", &bn_relu_train_backward_skip_cpu);
  m.impl("bn_relu_train", &bn_relu_train_cpu);
  m.impl("bn_relu_train_forward_sums", &bn_relu_train_forward_sums_cpu);
  m.impl("bn_relu_train_sums", &bn_relu_train_sums_cpu);
}

}  // namespace fasthg
