// CPU kernels of the fused BatchNorm+ReLU ops (training statistics, normalise+clamp, and
// the two backward passes), for NCHW and channels_last. Sums run in double per chunk (a
// plane in NCHW, a block of pixels in NHWC) and chunks merge with Chan's formula, so large
// N*H*W and large means keep their precision.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

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
int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(16, 8192 / C); }

// Per-chunk (count, mean, M2) partials of every channel, two passes over each cache-sized
// chunk (mean, then squared deviations), then merged per channel.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void stats_kernel(const scalar_t* x, const View& v, acc_t* mean_out, acc_t* var_out) {
  const int64_t C = v.C;
  std::vector<double> pn, pm, pq;
  int64_t chunks;
  if (!v.channels_last) {
    chunks = v.outer;  // chunk n holds plane (n, c) for every c
    pn.assign(chunks * C, double(v.inner));
    pm.resize(chunks * C);
    pq.resize(chunks * C);
    at::parallel_for(0, v.outer * C, std::max<int64_t>(1, kGrain / v.inner), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const scalar_t* xp = x + p * v.inner;
        double s = 0;
        for (int64_t i = 0; i < v.inner; ++i) s += static_cast<double>(xp[i]);
        const double m = s / v.inner;
        double q = 0;
        for (int64_t i = 0; i < v.inner; ++i) {
          const double d = static_cast<double>(xp[i]) - m;
          q += d * d;
        }
        pm[p] = m;
        pq[p] = q;
      }
    });
  } else {
    const int64_t R = rows_per_chunk(C);
    chunks = (v.outer + R - 1) / R;
    pn.resize(chunks * C);
    pm.resize(chunks * C);
    pq.resize(chunks * C);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * R, r1 = std::min(v.outer, r0 + R);
        double* m = &pm[k * C];
        double* q = &pq[k * C];
        std::fill(m, m + C, 0.0);
        std::fill(q, q + C, 0.0);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = 0; c < C; ++c) m[c] += static_cast<double>(x[r * C + c]);
        for (int64_t c = 0; c < C; ++c) m[c] /= (r1 - r0);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = 0; c < C; ++c) {
            const double d = static_cast<double>(x[r * C + c]) - m[c];
            q[c] += d * d;
          }
        std::fill(&pn[k * C], &pn[k * C] + C, double(r1 - r0));
      }
    });
  }
  at::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      double n = 0, m = 0, q = 0;
      for (int64_t k = 0; k < chunks; ++k) welford_merge(n, m, q, pn[k * C + c], pm[k * C + c], pq[k * C + c]);
      mean_out[c] = static_cast<acc_t>(m);
      var_out[c] = static_cast<acc_t>(q / n);
    }
  });
}

// Calls f(c, begin, end) over runs of elements that share channel c: whole planes in NCHW,
// single elements of each pixel row in NHWC.
template <typename F>
void for_each_channel_run(const View& v, F f) {
  if (!v.channels_last) {
    at::parallel_for(0, v.outer * v.C, std::max<int64_t>(1, kGrain / v.inner), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) f(p % v.C, p * v.inner, (p + 1) * v.inner);
    });
  } else {
    at::parallel_for(0, v.outer, std::max<int64_t>(1, kGrain / v.C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t c = 0; c < v.C; ++c) f(c, r * v.C + c, r * v.C + c + 1);
    });
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const scalar_t* x, scalar_t* y, const View& v, const acc_t* mean,
                    const acc_t* invstd, const acc_t* w, const acc_t* b) {
  if (!v.channels_last) {
    for_each_channel_run(v, [&](int64_t c, int64_t i0, int64_t i1) {
      const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c];
      for (int64_t i = i0; i < i1; ++i) y[i] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(x[i]), m, s, wc, bc));
    });
    return;
  }
  const int64_t C = v.C;
  at::parallel_for(0, v.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t b0, int64_t e0) {
    for (int64_t r = b0; r < e0; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
      for (int64_t c = 0; c < C; ++c)
        yr[c] = static_cast<scalar_t>(bn_relu_value(static_cast<acc_t>(xr[c]), mean[c], invstd[c], w[c], b[c]));
    }
  });
}

// sum over N*H*W of g and of g * xhat, g = grad_out masked by the recomputed ReLU.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_reduce_kernel(const scalar_t* dy, const scalar_t* x, const View& v, const acc_t* mean,
                            const acc_t* invstd, const acc_t* w, const acc_t* b, acc_t* sum_g,
                            acc_t* sum_gx) {
  const int64_t C = v.C;
  std::vector<double> ps, px;
  int64_t chunks;
  if (!v.channels_last) {
    chunks = v.outer;
    ps.resize(chunks * C);
    px.resize(chunks * C);
    for_each_channel_run(v, [&](int64_t c, int64_t i0, int64_t i1) {
      const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c];
      double a = 0, ax = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t xi = static_cast<acc_t>(x[i]);
        const double g = bn_relu_masked_grad(static_cast<acc_t>(dy[i]), xi, m, s, wc, bc);
        a += g;
        ax += g * ((xi - m) * s);
      }
      ps[i0 / v.inner] = a;
      px[i0 / v.inner] = ax;
    });
  } else {
    const int64_t R = rows_per_chunk(C);
    chunks = (v.outer + R - 1) / R;
    ps.assign(chunks * C, 0.0);
    px.assign(chunks * C, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t b0, int64_t e0) {
      for (int64_t k = b0; k < e0; ++k) {
        double* a = &ps[k * C];
        double* ax = &px[k * C];
        for (int64_t r = k * R; r < std::min(v.outer, (k + 1) * R); ++r)
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xi = static_cast<acc_t>(x[r * C + c]);
            const double g = bn_relu_masked_grad(static_cast<acc_t>(dy[r * C + c]), xi, mean[c], invstd[c], w[c], b[c]);
            a[c] += g;
            ax[c] += g * ((xi - mean[c]) * invstd[c]);
          }
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, ax = 0;
    for (int64_t k = 0; k < chunks; ++k) {
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
  for_each_channel_run(v, [&](int64_t c, int64_t i0, int64_t i1) {
    const acc_t m = mean[c], s = invstd[c], wc = w[c], bc = b[c], mg = mean_g[c], mgx = mean_gx[c];
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t xi = static_cast<acc_t>(x[i]);
      const acc_t g = bn_relu_masked_grad(static_cast<acc_t>(dy[i]), xi, m, s, wc, bc);
      dx[i] = static_cast<scalar_t>(bn_relu_grad_input(g, xi, m, s, wc, mg, mgx));
    }
  });
}

void check_params(const char* op, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                  const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_input(op, x);
  check_bn_relu_channel(op, "mean", mean, x);
  check_bn_relu_channel(op, "invstd", invstd, x);
  check_bn_relu_channel(op, "weight", weight, x);
  check_bn_relu_channel(op, "bias", bias, x);
}

#define FASTHG_DISPATCH(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> bn_relu_stats_cpu(const at::Tensor& x_in) {
  check_bn_relu_input("bn_relu_stats", x_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  auto mean = at::empty({x.size(1)}, x.options().dtype(bn_relu_param_dtype(x)));
  auto var = at::empty({x.size(1)}, x.options().dtype(bn_relu_param_dtype(x)));
  FASTHG_DISPATCH(x.scalar_type(), "bn_relu_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel(x.const_data_ptr<scalar_t>(), view_of(x, fmt), mean.mutable_data_ptr<acc_t>(),
                 var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

at::Tensor bn_relu_forward_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor& weight, const at::Tensor& bias) {
  check_params("bn_relu_forward", x_in, mean, invstd, weight, bias);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  auto y = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  FASTHG_DISPATCH(x.scalar_type(), "bn_relu_forward_cpu", [&] {
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
  check_params("bn_relu_backward_reduce", x_in, mean, invstd, weight, bias);
  check_same_as_x("bn_relu_backward_reduce", "grad_out", grad_in, x_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), dy = grad_in.contiguous(fmt);
  const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  auto sum_g = at::empty({x.size(1)}, m.options());
  auto sum_gx = at::empty({x.size(1)}, m.options());
  FASTHG_DISPATCH(x.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
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
  check_params("bn_relu_backward_elemt", x_in, mean, invstd, weight, bias);
  check_same_as_x("bn_relu_backward_elemt", "grad_out", grad_in, x_in);
  check_bn_relu_channel("bn_relu_backward_elemt", "mean_g", mean_g, x_in);
  check_bn_relu_channel("bn_relu_backward_elemt", "mean_g_xhat", mean_gx, x_in);
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt), dy = grad_in.contiguous(fmt);
  auto dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  const auto mg = mean_g.contiguous(), mgx = mean_gx.contiguous();
  FASTHG_DISPATCH(x.scalar_type(), "bn_relu_backward_elemt_cpu", [&] {
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
