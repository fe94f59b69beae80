// csrc/cuda/upsample_add.cu's kernels (forward, in place, backward) on the CPU (cuda_shim.h), in float32 and bfloat16, with
// both index types and layouts, exact 2x and other ratios, against double references.
#include "cuda_shim.h"
#include "../../csrc/cuda/upsample_add.cu"

namespace fasthg {

template <typename scalar_t, typename index_t, bool kChannelsLast>
void check_upsample_add(int64_t N, int64_t C, int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo, unsigned most_blocks) {
  char shape[128];
  std::snprintf(shape, sizeof shape, "[%ld,%ld,%ld,%ld] -> %ldx%ld %s %zu-byte values, <= %u blocks, %zu-byte index",
                long(N), long(C), long(Hi), long(Wi), long(Ho), long(Wo), kChannelsLast ? "NHWC" : "NCHW",
                sizeof(scalar_t), most_blocks, sizeof(index_t));
  const double tol = sizeof(scalar_t) == 2 ? 4e-3 : 1e-7;  // one rounding to scalar_t
  std::mt19937 gen(unsigned(N * 7919 + C * 104729 + Hi * 31 + Wo));
  std::normal_distribution<float> normal(0.f, 1.f);
  auto at = [&](int64_t n, int64_t c, int64_t h, int64_t w, int64_t H, int64_t W) {
    return kChannelsLast ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
  };
  const int64_t n_low = N * C * Hi * Wi, n_out = N * C * Ho * Wo;
  const auto nan = static_cast<scalar_t>(NAN);
  std::vector<scalar_t> low(n_low), skip(n_out), grad(n_out), out(n_out, nan), grad_low(n_low, nan);
  for (auto* v : {&low, &skip, &grad})
    for (auto& e : *v) e = static_cast<scalar_t>(normal(gen));
  const auto lo = dims<index_t>(N, C, Hi, Wi), hi = dims<index_t>(N, C, Ho, Wo);
  launch(std::min(most_blocks, unrolled_blocks(n_out, kThreads)), kThreads, [&] {
    forward_kernel<scalar_t, kChannelsLast, index_t>(low.data(), skip.data(), out.data(), lo, hi, index_t(n_out));
  });
  std::vector<scalar_t> inplace(skip);
  launch(std::min(most_blocks, unrolled_blocks(n_out, kThreads)), kThreads, [&] {
    inplace_kernel<scalar_t, kChannelsLast, index_t>(low.data(), inplace.data(), lo, hi, index_t(n_out));
  });
  launch(std::min(most_blocks, unrolled_blocks(n_low, kThreads)), kThreads, [&] {
    backward_kernel<scalar_t, kChannelsLast, index_t>(grad.data(), grad_low.data(), lo, hi, index_t(n_low));
  });
  std::vector<double> rout(n_out), rgrad_low(n_low, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < Ho; ++h)
        for (int64_t w = 0; w < Wo; ++w) {
          const int64_t src = at(n, c, nearest_src(h, Hi, Ho), nearest_src(w, Wi, Wo), Hi, Wi);
          rout[at(n, c, h, w, Ho, Wo)] = double(skip[at(n, c, h, w, Ho, Wo)]) + double(low[src]);
          rgrad_low[src] += double(grad[at(n, c, h, w, Ho, Wo)]);
        }
  emu::expect_close("forward", rout, out, tol, shape);
  emu::expect_close("in place", rout, inplace, tol, shape);
  emu::expect_close("backward", rgrad_low, grad_low, std::max(tol, 1e-6), shape);
}

}  // namespace fasthg

int main() {
  // low N, C, H, W -> skip H, W: exact 2x, odd 2x, one pixel, 3x, non-integer, shrinking, 1x.
  const int64_t cases[][6] = {{2, 3, 4, 5, 8, 10}, {1, 5, 3, 7, 6, 14}, {2, 4, 1, 1, 2, 2}, {1, 3, 3, 2, 9, 6},
                              {1, 2, 5, 7, 9, 11}, {2, 3, 6, 8, 3, 5},  {1, 4, 4, 4, 4, 4}, {2, 40, 8, 8, 16, 16}};
  for (const auto& k : cases)
    for (unsigned most_blocks : {1u, 1u << 20}) {  // 1 block: the loops stride
      fasthg::check_upsample_add<float, uint32_t, false>(k[0], k[1], k[2], k[3], k[4], k[5], most_blocks);
      fasthg::check_upsample_add<float, uint32_t, true>(k[0], k[1], k[2], k[3], k[4], k[5], most_blocks);
      fasthg::check_upsample_add<float, int64_t, false>(k[0], k[1], k[2], k[3], k[4], k[5], most_blocks);
      fasthg::check_upsample_add<float, int64_t, true>(k[0], k[1], k[2], k[3], k[4], k[5], most_blocks);
      fasthg::check_upsample_add<c10::BFloat16, uint32_t, false>(k[0], k[1], k[2], k[3], k[4], k[5], most_blocks);
      fasthg::check_upsample_add<c10::BFloat16, uint32_t, true>(k[0], k[1], k[2], k[3], k[4], k[5], most_blocks);
    }
  return emu::finish();
}
