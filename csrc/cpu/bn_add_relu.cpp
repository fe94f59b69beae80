// CPU kernels of the fused BatchNorm+add+ReLU ops (a residual block's end), NCHW and
// channels_last: the forward's normalise+add+clamp, the backward's reduction (which writes
// the masked gradient, grad_residual, while it sums) and its elementwise pass. The training
// statistics are bn_relu_stats'. The ReLU mask comes from the saved output y (x alone cannot
// give it: the residual was added), so the reduction reads grad_out, y and x and writes g,
// and the elementwise pass reads g and x: 7 tensor passes against eager's 8 (ReLU backward
// 3, BN backward 5). The walks, lanes and two-level sums are channel_passes.h's, as in
// bn_relu.cpp; the backward's sums add 16 rows in float before each fold into double.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "../bn_add_relu.h"
#include "channel_passes.h"
#include "vec8.h"

namespace fasthg {
namespace {

#ifdef __AVX2__
// bn_add_relu_value for 8 floats, the same operations in the same order (max_ps returns its
// second operand for a NaN, as y < 0 ? 0 : y does).
C10_ALWAYS_INLINE __m256 value8(__m256 x, __m256 r, __m256 m, __m256 sw, __m256 b) {
  const __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, m), sw), b), r);
  return _mm256_max_ps(_mm256_setzero_ps(), y);
}

// bn_add_relu_masked_grad: dy where not y <= 0 (unordered compare: a NaN y passes dy).
C10_ALWAYS_INLINE __m256 mask8(__m256 dy, __m256 y) {
  return _mm256_and_ps(_mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_NLE_UQ), dy);
}

// bn_add_relu_grad_input for 8 floats, in bn_relu_grad_input's order.
C10_ALWAYS_INLINE __m256 grad8(__m256 g, __m256 x, __m256 m, __m256 s, __m256 w, __m256 mg, __m256 mgx) {
  const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(x, m), s);
  return _mm256_mul_ps(_mm256_mul_ps(w, s), _mm256_sub_ps(_mm256_sub_ps(g, mg), _mm256_mul_ps(xhat, mgx)));
}
#endif

// ---------------------------------------------------------------- forward
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const scalar_t* x, const scalar_t* r, scalar_t* y, const View& v, const acc_t* mean,
                    const acc_t* invstd, const acc_t* w, const acc_t* b) {
  const bool stream = streams(y, v);
  auto value = [&](int64_t i, int64_t c) {
    y[i] = static_cast<scalar_t>(bn_add_relu_value(static_cast<acc_t>(x[i]), static_cast<acc_t>(r[i]), mean[c],
                                                   invstd[c], w[c], b[c]));
  };
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    auto one = [&](int64_t i) { value(i0 + i, c); };
#ifdef __AVX2__
    if constexpr (kVec8<scalar_t>) {
      const __m256 vm = _mm256_set1_ps(mean[c]), vsw = _mm256_set1_ps(invstd[c] * w[c]), vb = _mm256_set1_ps(b[c]);
      run8(n, y + i0, stream, one, [&](int64_t i) {
        prefetch_ahead(x + i0 + i);
        prefetch_ahead(r + i0 + i);
        store8(y + i0 + i, value8(load8(x + i0 + i), load8(r + i0 + i), vm, vsw, vb), stream);
      });
      fence_streams(stream);
      return;
    }
#endif
    run8(n, y + i0, false, one, [](int64_t) {});
  }, [&](int64_t r0, int64_t r1) {
#ifdef __AVX2__
    if constexpr (kVec8<scalar_t>) {
      std::vector<float> sw(v.C);  // invstd * weight, once per task rather than per element
      for (int64_t c = 0; c < v.C; ++c) sw[c] = invstd[c] * w[c];
      run8_rows<scalar_t>(r0, r1, v.C, value, [&](int64_t i, int64_t c) {
        prefetch_ahead(x + i);
        prefetch_ahead(r + i);
        store8(y + i, value8(load8(x + i), load8(r + i), load8(mean + c), load8(sw.data() + c), load8(b + c)),
               stream);
      });
      fence_streams(stream);
      return;
    }
#endif
    run8_rows<scalar_t>(r0, r1, v.C, value, [](int64_t, int64_t) {});
  });
}

// ---------------------------------------------------------------- backward reduction
// One NCHW plane: g written, and the plane's sums of g and g * xhat.
template <typename scalar_t, typename acc_t>
void plane_reduce(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                  scalar_t* __restrict__ g, int64_t n, acc_t m, acc_t s, double& sum_g, double& sum_gx) {
  sum_g = sum_gx = 0;
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {  // rows of 8V elements, two-level sums as bn_relu's planes
    constexpr int V = 2;
    if (n >= 8 * V) {
      const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(s);
      __m256d acc[V][4];
      two_level_sums<V, 2>(0, n / (8 * V), [&](int64_t row, int v, __m256* p) {
        const int64_t j = row * 8 * V + 8 * v;
        if (v == 0) {
          prefetch_ahead(dy + j);
          prefetch_ahead(y + j);
          prefetch_ahead(x + j);
        }
        const __m256 gv = mask8(load8(dy + j), load8(y + j));
        store8(g + j, gv, false);
        p[0] = _mm256_add_ps(p[0], gv);
        p[1] = _mm256_add_ps(p[1], _mm256_mul_ps(gv, _mm256_mul_ps(_mm256_sub_ps(load8(x + j), vm), vs)));
      }, acc);
      __m256d tg = _mm256_setzero_pd(), tgx = _mm256_setzero_pd();
      for (auto& a : acc) {
        tg = _mm256_add_pd(tg, _mm256_add_pd(a[0], a[1]));
        tgx = _mm256_add_pd(tgx, _mm256_add_pd(a[2], a[3]));
      }
      sum_g = hsum(tg);
      sum_gx = hsum(tgx);
      i = n / (8 * V) * (8 * V);
    }
  }
#endif
  if (i == n) return;
  double tg, tgx;
  lane_sums(n - i, [&](int64_t j, double& a, double& ax) {
    const acc_t gj = bn_add_relu_masked_grad(static_cast<acc_t>(dy[i + j]), static_cast<acc_t>(y[i + j]));
    g[i + j] = static_cast<scalar_t>(gj);
    a += gj;
    ax += gj * ((static_cast<acc_t>(x[i + j]) - m) * s);
  }, tg, tgx);
  sum_g += tg;
  sum_gx += tgx;
}

#ifdef __AVX2__
// A band of V vectors of channels from c0, NHWC rows [r0, r1): g written, sums added.
template <int V, typename T>
C10_ALWAYS_INLINE void band_reduce(const T* dy, const T* y, const T* x, T* g, int64_t r0, int64_t r1, int64_t C,
                                   int64_t c0, const float* m, const float* s, double* sg, double* sgx) {
  __m256 vm[V], vs[V];
  for (int v = 0; v < V; ++v) {
    vm[v] = load8(m + c0 + 8 * v);
    vs[v] = load8(s + c0 + 8 * v);
  }
  __m256d acc[V][4];
  two_level_sums<V, 2>(r0, r1, [&](int64_t row, int v, __m256* p) {
    const int64_t i = row * C + c0 + 8 * v;
    const __m256 gv = mask8(load8(dy + i), load8(y + i));
    store8(g + i, gv, false);
    p[0] = _mm256_add_ps(p[0], gv);
    p[1] = _mm256_add_ps(p[1], _mm256_mul_ps(gv, _mm256_mul_ps(_mm256_sub_ps(load8(x + i), vm[v]), vs[v])));
  }, acc);
  add_band<V, 2>(acc, {sg, sgx}, c0);
}
#endif

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_reduce_kernel(const scalar_t* dy, const scalar_t* y, const scalar_t* x, scalar_t* g, const View& v,
                            const acc_t* mean, const acc_t* invstd, acc_t* sum_g, acc_t* sum_gx) {
  const int64_t C = v.C;
  // Partials to add: one per plane in NCHW, one per thread in NHWC.
  const int64_t parts = v.channels_last ? at::get_num_threads() : v.outer;
  std::vector<double> ps(parts * C, 0.0), px(parts * C, 0.0);
  if (!v.channels_last) {
    at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / v.inner), [&](int64_t b0, int64_t e0) {
      for (int64_t p = b0; p < e0; ++p) {
        const int64_t c = p % C, o = p * v.inner;
        plane_reduce(dy + o, y + o, x + o, g + o, v.inner, mean[c], invstd[c], ps[p], px[p]);
      }
    });
  } else {
    // Rows in chunks that stay in L2 while g is written and the sums are taken.
    for_row_chunks(v.outer, C, rows_per_chunk(C), [&](int64_t t, int64_t r0, int64_t r1, int64_t) {
      double* a = &ps[t * C];
      double* ax = &px[t * C];
      int64_t c0 = 0;
#ifdef __AVX2__
      if constexpr (kVec8<scalar_t>) {
        for (; c0 + 32 <= C; c0 += 32) band_reduce<4>(dy, y, x, g, r0, r1, C, c0, mean, invstd, a, ax);
        for (; c0 + 8 <= C; c0 += 8) band_reduce<1>(dy, y, x, g, r0, r1, C, c0, mean, invstd, a, ax);
      }
#endif
      for (int64_t c = c0; c < C; ++c) {  // the channels left over (every channel for float64 x)
        double sg, sgx;
        lane_sums(r1 - r0, [&](int64_t k, double& g_acc, double& gx_acc) {
          const int64_t i = (r0 + k) * C + c;
          const acc_t gi = bn_add_relu_masked_grad(static_cast<acc_t>(dy[i]), static_cast<acc_t>(y[i]));
          g[i] = static_cast<scalar_t>(gi);
          g_acc += gi;
          gx_acc += gi * ((static_cast<acc_t>(x[i]) - mean[c]) * invstd[c]);
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

// ---------------------------------------------------------------- backward elementwise
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_elemt_kernel(const scalar_t* g, const scalar_t* x, scalar_t* dx, const View& v, const acc_t* mean,
                           const acc_t* invstd, const acc_t* w, const acc_t* mean_g, const acc_t* mean_gx) {
  const bool stream = streams(dx, v);
  auto grad = [&](int64_t i, int64_t c) {
    dx[i] = static_cast<scalar_t>(bn_add_relu_grad_input(static_cast<acc_t>(g[i]), static_cast<acc_t>(x[i]), mean[c],
                                                         invstd[c], w[c], mean_g[c], mean_gx[c]));
  };
  elementwise(v, [&](int64_t c, int64_t i0, int64_t n) {
    auto one = [&](int64_t i) { grad(i0 + i, c); };
#ifdef __AVX2__
    if constexpr (kVec8<scalar_t>) {
      const __m256 vm = _mm256_set1_ps(mean[c]), vs = _mm256_set1_ps(invstd[c]), vw = _mm256_set1_ps(w[c]),
                   vmg = _mm256_set1_ps(mean_g[c]), vmgx = _mm256_set1_ps(mean_gx[c]);
      run8(n, dx + i0, stream, one, [&](int64_t i) {
        prefetch_ahead(g + i0 + i);
        prefetch_ahead(x + i0 + i);
        store8(dx + i0 + i, grad8(load8(g + i0 + i), load8(x + i0 + i), vm, vs, vw, vmg, vmgx), stream);
      });
      fence_streams(stream);
      return;
    }
#endif
    run8(n, dx + i0, false, one, [](int64_t) {});
  }, [&](int64_t r0, int64_t r1) {
#ifdef __AVX2__
    if constexpr (kVec8<scalar_t>) {
      run8_rows<scalar_t>(r0, r1, v.C, grad, [&](int64_t i, int64_t c) {
        prefetch_ahead(g + i);
        prefetch_ahead(x + i);
        store8(dx + i, grad8(load8(g + i), load8(x + i), load8(mean + c), load8(invstd + c), load8(w + c),
                             load8(mean_g + c), load8(mean_gx + c)), stream);
      });
      fence_streams(stream);
      return;
    }
#endif
    run8_rows<scalar_t>(r0, r1, v.C, grad, [](int64_t, int64_t) {});
  });
}

// ---------------------------------------------------------------- the ops
at::Tensor like(const at::Tensor& x, at::MemoryFormat fmt) {
  return at::empty(x.sizes(), x.options().memory_format(fmt));
}

at::Tensor per_channel(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(bn_relu_param_dtype(x)));
}

at::Tensor bn_add_relu_forward_cpu(const at::Tensor& x_in, const at::Tensor& residual, const at::Tensor& mean_in,
                                   const at::Tensor& invstd_in, const at::Tensor& weight_in, const at::Tensor& bias_in) {
  check_bn_add_relu_forward_args("bn_add_relu_forward", x_in, residual, mean_in, invstd_in, weight_in, bias_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), r = residual.contiguous(fmt);
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), w = weight_in.contiguous(),
             b = bias_in.contiguous();
  auto y = like(x, fmt);
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_add_relu_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel(in<scalar_t>(x), in<scalar_t>(r), out<scalar_t>(y), view_of(x, fmt), in<acc_t>(mean),
                   in<acc_t>(invstd), in<acc_t>(w), in<acc_t>(b));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& y_in, const at::Tensor& x_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in) {
  check_bn_add_relu_reduce_args("bn_add_relu_backward_reduce", grad_out, y_in, x_in, mean_in, invstd_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), y = y_in.contiguous(fmt), dy = grad_out.contiguous(fmt);
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  auto g = like(x, fmt);
  auto sum_g = per_channel(x), sum_gx = per_channel(x);
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_add_relu_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_reduce_kernel(in<scalar_t>(dy), in<scalar_t>(y), in<scalar_t>(x), out<scalar_t>(g), view_of(x, fmt),
                           in<acc_t>(mean), in<acc_t>(invstd), out<acc_t>(sum_g), out<acc_t>(sum_gx));
  });
  return {g, sum_g, sum_gx};
}

at::Tensor bn_add_relu_backward_elemt_cpu(const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& mean_in,
                                          const at::Tensor& invstd_in, const at::Tensor& weight_in,
                                          const at::Tensor& mean_g_in, const at::Tensor& mean_gx_in) {
  check_bn_add_relu_elemt_args("bn_add_relu_backward_elemt", g_in, x_in, mean_in, invstd_in, weight_in, mean_g_in,
                               mean_gx_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), g = g_in.contiguous(fmt);
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), w = weight_in.contiguous(),
             mg = mean_g_in.contiguous(), mgx = mean_gx_in.contiguous();
  auto dx = like(x, fmt);
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), "bn_add_relu_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_elemt_kernel(in<scalar_t>(g), in<scalar_t>(x), out<scalar_t>(dx), view_of(x, fmt), in<acc_t>(mean),
                          in<acc_t>(invstd), in<acc_t>(w), in<acc_t>(mg), in<acc_t>(mgx));
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("bn_add_relu_forward", &bn_add_relu_forward_cpu);
  m.impl("bn_add_relu_backward_reduce", &bn_add_relu_backward_reduce_cpu);
  m.impl("bn_add_relu_backward_elemt", &bn_add_relu_backward_elemt_cpu);
}

}  // namespace fasthg
