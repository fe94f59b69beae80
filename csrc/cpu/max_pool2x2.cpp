// CPU kernels of fasthg::max_pool2x2 and its backward, for NCHW and channels_last. The
// backward finds each window's maximum again from x (csrc/max_pool2x2.h) instead of reading
// saved int64 indices: one pass that reads x and grad_out and writes every element of grad_x
// once, where ATen's backward zero-fills grad_x, then scatters into it from the indices, and a
// recomputing caller had to run the pooling a second time to get them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../max_pool2x2.h"
#include "channel_passes.h"
#include "vec8.h"

namespace fasthg {
namespace {

// 8 windows at a time, as floats (exact for every 8-wide storage type). v0..v3 are the
// windows' elements in scan order; taken() is window_argmax's test, in which a NaN compares
// unordered.
#ifdef __AVX2__
C10_ALWAYS_INLINE __m256 taken(__m256 v, __m256 best) {
  return _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

C10_ALWAYS_INLINE __m256 max8(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  __m256 best = _mm256_blendv_ps(v0, v1, taken(v1, v0));
  best = _mm256_blendv_ps(best, v2, taken(v2, best));
  return _mm256_blendv_ps(best, v3, taken(v3, best));
}

// g where each window's maximum is, 0 elsewhere: out[k] for window position k.
C10_ALWAYS_INLINE void route8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 g, __m256 out[4]) {
  const __m256 t1 = taken(v1, v0);
  __m256 best = _mm256_blendv_ps(v0, v1, t1);
  const __m256 t2 = taken(v2, best);
  best = _mm256_blendv_ps(best, v2, t2);
  const __m256 t3 = taken(v3, best);
  out[3] = _mm256_and_ps(t3, g);
  out[2] = _mm256_andnot_ps(t3, _mm256_and_ps(t2, g));
  out[1] = _mm256_andnot_ps(_mm256_or_ps(t2, t3), _mm256_and_ps(t1, g));
  out[0] = _mm256_andnot_ps(_mm256_or_ps(t1, _mm256_or_ps(t2, t3)), g);
}

// The even- and odd-indexed elements of the 16 at p, in order.
template <typename T>
C10_ALWAYS_INLINE void split_pairs(const T* p, __m256& even, __m256& odd) {
  const __m256 a = load8(p), b = load8(p + 8);
  auto ordered = [](__m256 v) { return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8)); };
  even = ordered(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
  odd = ordered(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

// split_pairs' inverse: even and odd interleaved into the 16 elements at p.
template <typename T>
C10_ALWAYS_INLINE void store_pairs(T* p, __m256 even, __m256 odd, bool stream) {
  const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
  store8(p, _mm256_permute2f128_ps(lo, hi, 0x20), stream);
  store8(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31), stream);
}
#endif

template <typename scalar_t>
C10_ALWAYS_INLINE int argmax_at(const scalar_t* r0, const scalar_t* r1, int64_t a, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  return window_argmax<acc_t>(r0[a], r0[b], r1[a], r1[b]);
}

template <typename scalar_t>
C10_ALWAYS_INLINE scalar_t pick(const scalar_t* r0, const scalar_t* r1, int64_t a, int64_t b) {
  switch (argmax_at(r0, r1, a, b)) {
    case 0: return r0[a];
    case 1: return r0[b];
    case 2: return r1[a];
    default: return r1[b];
  }
}

// Grad of one window: g at its maximum, 0 at the others.
template <typename scalar_t>
C10_ALWAYS_INLINE void route(const scalar_t* r0, const scalar_t* r1, int64_t a, int64_t b, scalar_t g,
                             scalar_t* g0, scalar_t* g1) {
  const int k = argmax_at(r0, r1, a, b);
  g0[a] = k == 0 ? g : scalar_t(0);
  g0[b] = k == 1 ? g : scalar_t(0);
  g1[a] = k == 2 ? g : scalar_t(0);
  g1[b] = k == 3 ? g : scalar_t(0);
}

// NCHW: a task is a run of output rows; output row r reads input rows 2i and 2i+1 of its plane.
template <typename scalar_t>
void forward_nchw(const scalar_t* x, scalar_t* y, int64_t NC, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, NC * Ho, std::max<int64_t>(1, kGrain / (4 * Wo)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* r0 = x + ((r / Ho) * H + 2 * (r % Ho)) * W;
      const scalar_t* r1 = r0 + W;
      scalar_t* o = y + r * Wo;
      int64_t j = 0;
#ifdef __AVX2__
      if constexpr (kVec8<scalar_t>) {
        for (; j + 8 <= Wo; j += 8) {
          __m256 v0, v1, v2, v3;
          split_pairs(r0 + 2 * j, v0, v1);
          split_pairs(r1 + 2 * j, v2, v3);
          store8(o + j, max8(v0, v1, v2, v3), false);
        }
      }
#endif
      for (; j < Wo; ++j) o[j] = pick(r0, r1, 2 * j, 2 * j + 1);
    }
  });
}

// dst[i] += skip[i], n elements of grad_x just written (still in cache): a residual branch's
// gradient for the pool's input, added here instead of by autograd in a pass of its own. The
// pool's gradient is grad_out's values or 0, so the sum rounds as autograd's add would.
template <typename scalar_t>
void add_skip(scalar_t* __restrict__ dst, const scalar_t* __restrict__ skip, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>)
    for (; i + 8 <= n; i += 8) store8(dst + i, _mm256_add_ps(load8(dst + i), load8(skip + i)), false);
#endif
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(static_cast<acc_t>(dst[i]) + static_cast<acc_t>(skip[i]));
}

// skip (may be null): add_skip's, over each task's rows once they are written.
template <typename scalar_t>
void backward_nchw(const scalar_t* go, const scalar_t* x, scalar_t* gx, int64_t NC, int64_t H, int64_t W,
                   const scalar_t* skip) {
  const int64_t Ho = H / 2, Wo = W / 2;
  const bool stream = !skip && streams(gx, NC * H * W * int64_t(sizeof(scalar_t)), W % 8 == 0);
  at::parallel_for(0, NC * Ho, std::max<int64_t>(1, kGrain / (4 * Wo)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nc = r / Ho, i = r % Ho;
      const int64_t off = (nc * H + 2 * i) * W;
      const scalar_t *r0 = x + off, *r1 = r0 + W, *g = go + r * Wo;
      scalar_t *g0 = gx + off, *g1 = g0 + W;
      int64_t j = 0;
#ifdef __AVX2__
      if constexpr (kVec8<scalar_t>) {
        for (; j + 8 <= Wo; j += 8) {
          __m256 v0, v1, v2, v3, out[4];
          split_pairs(r0 + 2 * j, v0, v1);
          split_pairs(r1 + 2 * j, v2, v3);
          route8(v0, v1, v2, v3, load8(g + j), out);
          store_pairs(g0 + 2 * j, out[0], out[1], stream);
          store_pairs(g1 + 2 * j, out[2], out[3], stream);
        }
      }
#endif
      for (; j < Wo; ++j) route(r0, r1, 2 * j, 2 * j + 1, g[j], g0, g1);
      if (W % 2) g0[W - 1] = g1[W - 1] = scalar_t(0);       // the odd last column is in no window
      const bool last_row = H % 2 && i == Ho - 1;
      if (last_row) std::fill(g1 + W, g1 + 2 * W, scalar_t(0));  // nor the odd last row
      if (skip) add_skip(g0, skip + off, (last_row ? 3 : 2) * W);
    }
    fence_streams(stream);
  });
}

// channels_last: a task is a run of output pixels, each 8 channels at a time.
template <typename scalar_t>
void forward_nhwc(const scalar_t* x, scalar_t* y, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, N * Ho * Wo, std::max<int64_t>(1, kGrain / (4 * C)), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j = p % Wo, i = (p / Wo) % Ho, n = p / (Wo * Ho);
      const scalar_t* r0 = x + ((n * H + 2 * i) * W + 2 * j) * C;
      const scalar_t* r1 = r0 + W * C;
      scalar_t* o = y + p * C;
      run8(C, o, false, [&](int64_t c) { o[c] = pick(r0, r1, c, C + c); }, [&](auto c) {
#ifdef __AVX2__
        prefetch_ahead(r0 + c);
        prefetch_ahead(r1 + c);
        store8(o + c, max8(load8(r0 + c), load8(r0 + C + c), load8(r1 + c), load8(r1 + C + c)), false);
#endif
      });
    }
  });
}

template <typename scalar_t>
void backward_nhwc(const scalar_t* go, const scalar_t* x, scalar_t* gx, int64_t N, int64_t C, int64_t H, int64_t W,
                   const scalar_t* skip) {
  const int64_t Ho = H / 2, Wo = W / 2;
  const bool stream = !skip && streams(gx, N * H * W * C * int64_t(sizeof(scalar_t)), C % 8 == 0);
  at::parallel_for(0, N * Ho * Wo, std::max<int64_t>(1, kGrain / (4 * C)), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j = p % Wo, i = (p / Wo) % Ho, n = p / (Wo * Ho);
      const int64_t off = ((n * H + 2 * i) * W + 2 * j) * C;
      const scalar_t *r0 = x + off, *r1 = r0 + W * C, *g = go + p * C;
      scalar_t *g0 = gx + off, *g1 = g0 + W * C;
      run8(C, g0, stream, [&](int64_t c) { route(r0, r1, c, C + c, g[c], g0, g1); }, [&](auto c) {
#ifdef __AVX2__
        __m256 out[4];
        prefetch_ahead(r0 + c);
        prefetch_ahead(r1 + c);
        route8(load8(r0 + c), load8(r0 + C + c), load8(r1 + c), load8(r1 + C + c), load8(g + c), out);
        store8(g0 + c, out[0], stream);
        store8(g0 + C + c, out[1], stream);
        store8(g1 + c, out[2], stream);
        store8(g1 + C + c, out[3], stream);
#endif
      });
      // The odd last column and row are in no window: zeroed by the pixels beside them.
      const bool last_col = W % 2 && j == Wo - 1, last_row = H % 2 && i == Ho - 1;
      if (last_col) {
        std::fill(g0 + 2 * C, g0 + 3 * C, scalar_t(0));
        std::fill(g1 + 2 * C, g1 + 3 * C, scalar_t(0));
      }
      if (last_row) {
        scalar_t* g2 = g1 + W * C;
        std::fill(g2, g2 + (last_col ? 3 : 2) * C, scalar_t(0));
      }
      if (skip) {
        const int64_t n = (last_col ? 3 : 2) * C;
        for (int64_t row = 0; row < (last_row ? 3 : 2); ++row) add_skip(g0 + row * W * C, skip + off + row * W * C, n);
      }
    }
    fence_streams(stream);
  });
}

at::Tensor max_pool2x2_cpu(const at::Tensor& x_in) {
  check_max_pool2x2_args(x_in);
  TORCH_CHECK(x_in.device().is_cpu(), "max_pool2x2: expected a CPU tensor `x`");
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto y = at::empty({N, C, H / 2, W / 2}, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_cpu", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast)
      forward_nhwc(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, C, H, W);
    else
      forward_nchw(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N * C, H, W);
  });
  return y;
}

// max_pool2x2_backward, and with grad_skip (not null) max_pool2x2_backward_skip.
at::Tensor backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor* grad_skip) {
  check_max_pool2x2_backward_args(grad_in, x_in, grad_skip);
  TORCH_CHECK(x_in.device().is_cpu(), "max_pool2x2_backward: expected CPU tensors");
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  const auto grad = grad_in.contiguous(fmt);
  const auto skip = grad_skip ? grad_skip->contiguous(fmt) : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_backward_cpu", [&] {
    const scalar_t *g = grad.const_data_ptr<scalar_t>(), *xs = x.const_data_ptr<scalar_t>();
    const scalar_t* s = grad_skip ? skip.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) backward_nhwc(g, xs, gx, N, C, H, W, s);
    else backward_nchw(g, xs, gx, N * C, H, W, s);
  });
  return grad_x;
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  return backward(grad_in, x_in, nullptr);
}

at::Tensor max_pool2x2_backward_skip_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                         const at::Tensor& grad_skip) {
  return backward(grad_in, x_in, &grad_skip);
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
  m.impl("max_pool2x2_backward_skip", &max_pool2x2_backward_skip_cpu);
}

}  // namespace fasthg
