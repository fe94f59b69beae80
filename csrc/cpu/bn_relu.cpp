// CPU kernels of the fused BatchNorm+ReLU ops (training statistics, normalise+clamp, and
// the two backward passes), for NCHW and channels_last. Sums run in double (BN backward
// subtracts nearly equal terms) per chunk (a plane in NCHW, a block of pixels in NHWC), and
// chunks merge with Chan's formula, so large N*H*W and large means keep their precision.
// The float32 reductions have AVX2 paths (setup.py builds with AVX2 where the machine has
// it): a masked select feeding double accumulators is beyond GCC's auto-vectoriser.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

// Per-channel sums and squared deviations of NHWC rows [r0, r1), C channels each. Row by
// row (x streams in order; see rows_masked_sums), sums first, then squared deviations from
// the chunk's mean while its rows are still in L1.
template <typename scalar_t>
void rows_stats(const scalar_t* __restrict__ x, int64_t r0, int64_t r1, int64_t C,
                double* __restrict__ mean, double* __restrict__ m2) {
  int64_t c0 = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t blocks = C - C % 8;
    std::fill(mean, mean + blocks, 0.0);
    std::fill(m2, m2 + blocks, 0.0);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < blocks; c += 8) {
        __m256d lo = _mm256_loadu_pd(mean + c), hi = _mm256_loadu_pd(mean + c + 4);
        add_pd(_mm256_loadu_ps(x + r * C + c), lo, hi);
        _mm256_storeu_pd(mean + c, lo);
        _mm256_storeu_pd(mean + c + 4, hi);
      }
    const __m256d inv_n = _mm256_set1_pd(1.0 / (r1 - r0));
    for (int64_t c = 0; c < blocks; c += 4) _mm256_storeu_pd(mean + c, _mm256_mul_pd(_mm256_loadu_pd(mean + c), inv_n));
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < blocks; c += 8) {
        const __m256 v = _mm256_loadu_ps(x + r * C + c);
        const __m256d dlo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_loadu_pd(mean + c));
        const __m256d dhi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), _mm256_loadu_pd(mean + c + 4));
        _mm256_storeu_pd(m2 + c, _mm256_add_pd(_mm256_loadu_pd(m2 + c), _mm256_mul_pd(dlo, dlo)));
        _mm256_storeu_pd(m2 + c + 4, _mm256_add_pd(_mm256_loadu_pd(m2 + c + 4), _mm256_mul_pd(dhi, dhi)));
      }
    c0 = blocks;
  }
#endif
  std::fill(mean + c0, mean + C, 0.0);
  std::fill(m2 + c0, m2 + C, 0.0);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < C; ++c) mean[c] += static_cast<double>(x[r * C + c]);
  for (int64_t c = c0; c < C; ++c) mean[c] /= (r1 - r0);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < C; ++c) {
      const double d = static_cast<double>(x[r * C + c]) - mean[c];
      m2[c] += d * d;
    }
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
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * R, r1 = std::min(v.outer, r0 + R);
        rows_stats(x, r0, r1, C, m.data(), q.data());
        for (int64_t c = 0; c < C; ++c) welford_merge(pn[t * C + c], pm[t * C + c], pq[t * C + c], double(r1 - r0), m[c], q[c]);
      }
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

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const scalar_t* x, scalar_t* y, const View& v, const acc_t* mean,
                    const acc_t* invstd, const acc_t* w, const acc_t* b) {
  const int64_t C = v.C;
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    const scalar_t* __restrict__ xp = x + i0;
    scalar_t* __restrict__ yp = y + i0;
    const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c];
    for (int64_t i = 0; i < n; ++i) yp[i] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(xp[i]), m, s, wc, bc));
  }, [&](int64_t r0, int64_t r1) {
    const acc_t* __restrict__ m = mean;
    const acc_t* __restrict__ s = invstd;
    const acc_t* __restrict__ wc = w;
    const acc_t* __restrict__ bc = b;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
      scalar_t* __restrict__ yr = y + r * C;
      for (int64_t c = 0; c < C; ++c)
        yr[c] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(xr[c]), m[c], s[c], wc[c], bc[c]));
    }
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

// NHWC rows [r0, r1) of C channels: adds each channel's sums of g and g * xhat to a[c], ax[c].
// Row by row, so that x and dy stream from memory in order (walking 8-channel columns down
// the rows instead strides by C and ran at a third of NCHW's speed once out of cache); the
// per-channel accumulators stay in L1.
template <typename scalar_t, typename acc_t>
void rows_masked_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t r0, int64_t r1,
                      int64_t C, const acc_t* __restrict__ m, const acc_t* __restrict__ s,
                      const acc_t* __restrict__ w, const acc_t* __restrict__ b, double* __restrict__ a,
                      double* __restrict__ ax) {
  int64_t c0 = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t blocks = C - C % 8;
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      const float* gr = dy + r * C;
      for (int64_t c = 0; c < blocks; c += 8) {
        __m256d acc[4] = {_mm256_loadu_pd(a + c), _mm256_loadu_pd(a + c + 4), _mm256_loadu_pd(ax + c),
                          _mm256_loadu_pd(ax + c + 4)};
        add_masked_terms(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(gr + c), _mm256_loadu_ps(m + c),
                         _mm256_loadu_ps(s + c), _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c), acc);
        _mm256_storeu_pd(a + c, acc[0]);
        _mm256_storeu_pd(a + c + 4, acc[1]);
        _mm256_storeu_pd(ax + c, acc[2]);
        _mm256_storeu_pd(ax + c + 4, acc[3]);
      }
    }
    c0 = blocks;
  }
#endif
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < C; ++c) {
      const acc_t xi = static_cast<acc_t>(x[r * C + c]);
      const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[r * C + c]), xi, m[c], s[c], w[c], b[c]);
      a[c] += g;
      ax[c] += g * ((xi - m[c]) * s[c]);
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
        rows_masked_sums(x, dy, k * R, std::min(v.outer, (k + 1) * R), C, mean, invstd, w, b, &ps[t * C], &px[t * C]);
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
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    const scalar_t* __restrict__ xp = x + i0;
    const scalar_t* __restrict__ gp = dy + i0;
    scalar_t* __restrict__ dp = dx + i0;
    const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c], mg = mean_g[c], mgx = mean_gx[c];
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xi = static_cast<acc_t>(xp[i]);
      const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gp[i]), xi, m, s, wc, bc);
      dp[i] = static_cast<scalar_t>(bn_relu_grad_input(g, xi, m, s, wc, mg, mgx));
    }
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
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xi = static_cast<acc_t>(xr[c]);
        const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(gr[c]), xi, m[c], s[c], wc[c], bc[c]);
        dr[c] = static_cast<scalar_t>(bn_relu_grad_input(g, xi, m[c], s[c], wc[c], mg[c], mgx[c]));
      }
    }
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
