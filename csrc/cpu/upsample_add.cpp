// CPU kernels of fasthg::upsample_add: out = skip + nearest_upsample(low) in one pass,
// and its backward (grad_low = block sum of grad_out), for NCHW and channels_last.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../upsample_add.h"
#include "channel_passes.h"
#include "vec8.h"

namespace fasthg {
namespace {

// Half the forward's traffic is its output: big float outputs stream (vec8.h's streams),
// where the read-for-ownership of each line made it move 5/4 of the bytes it needs. The
// 8-wide paths compute 16-bit values as floats, each sum rounded once, as scalar_t's + does.

// One output row of the exact 2x NCHW forward: o[w] = s[w] + l[w / 2], w < 2 * Wi.
template <typename scalar_t>
C10_ALWAYS_INLINE void add_row_2x(const scalar_t* l, const scalar_t* s, scalar_t* o, int64_t Wi, bool stream) {
  int64_t j = 0;
#ifdef __AVX2__
  if constexpr (kVec8<scalar_t>) {
    const __m256i lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    for (; j + 8 <= Wi; j += 8) {
      const __m256 v = load8(l + j);
      prefetch_ahead(s + 2 * j);
      prefetch_ahead(s + 2 * j + 8);
      store8(o + 2 * j, _mm256_add_ps(load8(s + 2 * j), _mm256_permutevar8x32_ps(v, lo)), stream);
      store8(o + 2 * j + 8, _mm256_add_ps(load8(s + 2 * j + 8), _mm256_permutevar8x32_ps(v, hi)), stream);
    }
  }
#endif
  for (; j < Wi; ++j) {
    const scalar_t v = l[j];
    o[2 * j] = s[2 * j] + v;
    o[2 * j + 1] = s[2 * j + 1] + v;
  }
}

std::vector<int64_t> src_map(int64_t in, int64_t out) {
  std::vector<int64_t> m(out);
  for (int64_t d = 0; d < out; ++d) m[d] = nearest_src(d, in, out);
  return m;
}

template <typename scalar_t>
void forward_nchw(const scalar_t* low, const scalar_t* skip, scalar_t* out, int64_t NC,
                  int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo) {
  const auto src_w = src_map(Wi, Wo);
  const bool twice = Wo == 2 * Wi;
  const bool stream = twice && streams(out, NC * Ho * Wo * int64_t(sizeof(scalar_t)), Wo % 8 == 0);
  const int64_t grain = std::max<int64_t>(1, kGrain / Wo);
  at::parallel_for(0, NC * Ho, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nc = r / Ho, h = r % Ho;
      const scalar_t* l = low + (nc * Hi + nearest_src(h, Hi, Ho)) * Wi;
      const scalar_t* s = skip + r * Wo;
      scalar_t* o = out + r * Wo;
      if (twice) {
        add_row_2x(l, s, o, Wi, stream);
      } else {
        for (int64_t w = 0; w < Wo; ++w) o[w] = s[w] + l[src_w[w]];
      }
    }
    fence_streams(stream);
  });
}

template <typename scalar_t>
void forward_nhwc(const scalar_t* low, const scalar_t* skip, scalar_t* out, int64_t N, int64_t C,
                  int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo) {
  const auto src_w = src_map(Wi, Wo);
  const bool stream = streams(out, N * Ho * Wo * C * int64_t(sizeof(scalar_t)), C % 8 == 0);
  const int64_t grain = std::max<int64_t>(1, kGrain / C);
  at::parallel_for(0, N * Ho * Wo, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t w = p % Wo, h = (p / Wo) % Ho, n = p / (Wo * Ho);
      const scalar_t* l = low + ((n * Hi + nearest_src(h, Hi, Ho)) * Wi + src_w[w]) * C;
      const scalar_t* s = skip + p * C;
      scalar_t* o = out + p * C;
      run8(C, o, stream, [&](int64_t c) { o[c] = s[c] + l[c]; }, [&](auto c) {  // generic: compiled only for the 8-wide types
#ifdef __AVX2__
        prefetch_ahead(s + c);
        store8(o + c, _mm256_add_ps(load8(s + c), load8(l + c)), stream);
#endif
      });
    }
    fence_streams(stream);
  });
}

#ifdef __AVX2__
// Sums of adjacent pairs of the 16 floats a, b: {a0+a1, a2+a3, ..., b6+b7}, each as the
// scalar backward adds it. (hadd pairs within 128-bit lanes; the permute restores order.)
C10_ALWAYS_INLINE __m256 pair_sums(__m256 a, __m256 b) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(a, b)), 0xD8));
}
#endif

// Exact 2x (the hourglass): each low element sums a 2x2 block, one pass, no buffer.
template <typename scalar_t>
void backward_nchw_2x(const scalar_t* g, scalar_t* gl, int64_t NC, int64_t Hi, int64_t Wi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Wo = 2 * Wi;
  const int64_t grain = std::max<int64_t>(1, kGrain / (4 * Wi));
  const bool stream = streams(gl, NC * Hi * Wi * int64_t(sizeof(scalar_t)), Wi % 8 == 0);
  at::parallel_for(0, NC * Hi, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g0 = g + 2 * r * Wo;  // rows 2i and 2i+1 of plane r / Hi
      const scalar_t* g1 = g0 + Wo;
      scalar_t* o = gl + r * Wi;
      run8(Wi, o, stream, [&](int64_t j) {
        o[j] = static_cast<scalar_t>(
            (static_cast<acc_t>(g0[2 * j]) + static_cast<acc_t>(g0[2 * j + 1])) +
            (static_cast<acc_t>(g1[2 * j]) + static_cast<acc_t>(g1[2 * j + 1])));
      }, [&](auto j) {  // 8 outputs from 16 elements of each row
#ifdef __AVX2__
        prefetch_ahead(g0 + 2 * j);
        prefetch_ahead(g1 + 2 * j);
        store8(o + j, _mm256_add_ps(pair_sums(load8(g0 + 2 * j), load8(g0 + 2 * j + 8)),
                                    pair_sums(load8(g1 + 2 * j), load8(g1 + 2 * j + 8))), stream);
#endif
      });
    }
    fence_streams(stream);
  });
}

template <typename scalar_t>
void backward_nchw(const scalar_t* g, scalar_t* gl, int64_t NC, int64_t Hi, int64_t Wi,
                   int64_t Ho, int64_t Wo) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto src_w = src_map(Wi, Wo);
  const int64_t grain = std::max<int64_t>(1, kGrain / (4 * Wi));
  at::parallel_for(0, NC * Hi, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(Wi);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nc = r / Hi, i = r % Hi;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t h_end = nearest_dst_begin(i + 1, Hi, Ho);
      for (int64_t h = nearest_dst_begin(i, Hi, Ho); h < h_end; ++h) {
        const scalar_t* row = g + (nc * Ho + h) * Wo;
        for (int64_t w = 0; w < Wo; ++w) acc[src_w[w]] += static_cast<acc_t>(row[w]);
      }
      scalar_t* o = gl + r * Wi;
      for (int64_t j = 0; j < Wi; ++j) o[j] = static_cast<scalar_t>(acc[j]);
    }
  });
}

template <typename scalar_t>
void backward_nhwc_2x(const scalar_t* g, scalar_t* gl, int64_t N, int64_t C, int64_t Hi,
                      int64_t Wi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Wo = 2 * Wi, row = Wo * C;
  const int64_t grain = std::max<int64_t>(1, kGrain / (4 * C));
  const bool stream = streams(gl, N * Hi * Wi * C * int64_t(sizeof(scalar_t)), C % 8 == 0);
  at::parallel_for(0, N * Hi * Wi, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j = p % Wi, ni = p / Wi;  // ni = n * Hi + i
      const scalar_t* g00 = g + (2 * ni * Wo + 2 * j) * C;
      const scalar_t* g01 = g00 + C;
      const scalar_t* g10 = g00 + row;
      const scalar_t* g11 = g10 + C;
      scalar_t* o = gl + p * C;
      run8(C, o, stream, [&](int64_t c) {
        o[c] = static_cast<scalar_t>(
            (static_cast<acc_t>(g00[c]) + static_cast<acc_t>(g01[c])) +
            (static_cast<acc_t>(g10[c]) + static_cast<acc_t>(g11[c])));
      }, [&](auto c) {  // generic: compiled only for the 8-wide types
#ifdef __AVX2__
        prefetch_ahead(g00 + c);
        prefetch_ahead(g10 + c);
        store8(o + c, _mm256_add_ps(_mm256_add_ps(load8(g00 + c), load8(g01 + c)),
                                    _mm256_add_ps(load8(g10 + c), load8(g11 + c))), stream);
#endif
      });
    }
    fence_streams(stream);
  });
}

template <typename scalar_t>
void backward_nhwc(const scalar_t* g, scalar_t* gl, int64_t N, int64_t C, int64_t Hi, int64_t Wi,
                   int64_t Ho, int64_t Wo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, kGrain / (4 * C));
  at::parallel_for(0, N * Hi * Wi, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j = p % Wi, i = (p / Wi) % Hi, n = p / (Wi * Hi);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t h_end = nearest_dst_begin(i + 1, Hi, Ho);
      const int64_t w_begin = nearest_dst_begin(j, Wi, Wo), w_end = nearest_dst_begin(j + 1, Wi, Wo);
      for (int64_t h = nearest_dst_begin(i, Hi, Ho); h < h_end; ++h) {
        for (int64_t w = w_begin; w < w_end; ++w) {
          const scalar_t* px = g + ((n * Ho + h) * Wo + w) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(px[c]);
        }
      }
      scalar_t* o = gl + p * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// out = skip + nearest_upsample(low), skip and low dense in fmt; out may be skip itself (each
// element is read before it is written, by the same thread).
void forward(const at::Tensor& low, const at::Tensor& skip, const at::Tensor& out, at::MemoryFormat fmt) {
  const int64_t N = skip.size(0), C = skip.size(1), Ho = skip.size(2), Wo = skip.size(3);
  const int64_t Hi = low.size(2), Wi = low.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, skip.scalar_type(), "upsample_add_cpu", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      forward_nhwc(low.const_data_ptr<scalar_t>(), skip.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), N, C, Hi, Wi, Ho, Wo);
    } else {
      forward_nchw(low.const_data_ptr<scalar_t>(), skip.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), N * C, Hi, Wi, Ho, Wo);
    }
  });
}

at::Tensor upsample_add_cpu(const at::Tensor& low_in, const at::Tensor& skip_in) {
  check_upsample_add_args(low_in, skip_in);
  TORCH_CHECK(skip_in.device().is_cpu(), "upsample_add: expected CPU tensors");
  const auto fmt = skip_in.suggest_memory_format();
  const auto skip = skip_in.contiguous(fmt);
  auto out = at::empty(skip.sizes(), skip.options().memory_format(fmt));
  forward(low_in.contiguous(fmt), skip, out, fmt);
  return out;
}

void upsample_add_inplace_cpu(const at::Tensor& low, const at::Tensor& skip) {
  check_upsample_add_inplace_args(low, skip);
  TORCH_CHECK(skip.device().is_cpu(), "upsample_add_inplace: expected CPU tensors");
  const auto fmt = skip.suggest_memory_format();
  forward(low.contiguous(fmt), skip, skip, fmt);
}

at::Tensor upsample_add_backward_cpu(const at::Tensor& grad_in, int64_t low_h, int64_t low_w) {
  check_upsample_add_backward_args(grad_in, low_h, low_w);
  const auto fmt = grad_in.suggest_memory_format();
  const auto grad = grad_in.contiguous(fmt);
  const int64_t N = grad.size(0), C = grad.size(1), Ho = grad.size(2), Wo = grad.size(3);
  auto grad_low = at::empty({N, C, low_h, low_w}, grad.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_add_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* gl = grad_low.mutable_data_ptr<scalar_t>();
    const bool twice = Ho == 2 * low_h && Wo == 2 * low_w;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      if (twice) backward_nhwc_2x(g, gl, N, C, low_h, low_w);
      else backward_nhwc(g, gl, N, C, low_h, low_w, Ho, Wo);
    } else if (twice) {
      backward_nchw_2x(g, gl, N * C, low_h, low_w);
    } else {
      backward_nchw(g, gl, N * C, low_h, low_w, Ho, Wo);
    }
  });
  return grad_low;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("upsample_add", &upsample_add_cpu);
  m.impl("upsample_add_inplace", &upsample_add_inplace_cpu);
  m.impl("upsample_add_backward", &upsample_add_backward_cpu);
}

}  // namespace fasthg
