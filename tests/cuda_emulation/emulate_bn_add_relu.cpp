// csrc/cuda/bn_add_relu.cu's kernels on the CPU (cuda_shim.h), in float32 and bfloat16, with both index types,
// both layouts and several SM counts and grid sizes, against double references. Outputs and partial sums start
// as NaN, so an element never written shows; the y the backward takes holds the forward's zeros and planted
// -0s (masked) and NaNs (which pass grad_out, as relu's backward does).
#include "cuda_shim.h"
#include "../../csrc/cuda/bn_add_relu.cu"

namespace fasthg {

template <typename scalar_t, typename index_t>
void check_bn_add_relu(int64_t N, int64_t C, int64_t H, int64_t W, bool cl, int sms, unsigned most_blocks) {
  char shape[128];
  std::snprintf(shape, sizeof shape, "[%ld,%ld,%ld,%ld] %s %zu-byte values, %d SMs, <= %u blocks, %zu-byte index",
                long(N), long(C), long(H), long(W), cl ? "NHWC" : "NCHW", sizeof(scalar_t), sms, most_blocks,
                sizeof(index_t));
  // Outputs are rounded to scalar_t once; sums are exact to float32 either way.
  const double out_tol = sizeof(scalar_t) == 2 ? 4e-3 : 1e-6;
  std::mt19937 gen(unsigned(N * 7919 + C * 104729 + H * 31 + W + cl));
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t HW = H * W, M = N * HW, total = M * C;
  auto at = [&](int64_t n, int64_t c, int64_t s) { return cl ? (n * HW + s) * C + c : (n * C + c) * HW + s; };
  std::vector<scalar_t> x(total), residual(total), dy(total);
  for (auto& v : x) v = static_cast<scalar_t>(normal(gen) * 2 + 100.f);  // an offset, as activations may have
  for (auto& v : residual) v = static_cast<scalar_t>(normal(gen));
  for (auto& v : dy) v = static_cast<scalar_t>(normal(gen));
  // The statistics in double, rounded to float (the op takes bn_relu_stats's), and the parameters.
  std::vector<float> mean(C), invstd(C), w(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, q = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < HW; ++i) s += double(x[at(n, c, i)]);
    const double m = s / M;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < HW; ++i) q += (double(x[at(n, c, i)]) - m) * (double(x[at(n, c, i)]) - m);
    mean[c] = float(m);
    invstd[c] = float(1 / std::sqrt(q / M + 1e-5));
    w[c] = 0.5f + std::abs(normal(gen));
    b[c] = normal(gen) * 0.1f;
  }
  auto xhat = [&](int64_t o, int64_t c) { return (double(x[o]) - mean[c]) * double(invstd[c]); };
  const auto ix = channel_index<index_t>(HW, C, cl);
  const unsigned blocks = std::min(most_blocks, unrolled_blocks(total, kThreads));

  std::vector<double> ry(total);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < HW; ++s) {
        const int64_t o = at(n, c, s);
        ry[o] = std::max(0.0, xhat(o, c) * w[c] + b[c] + double(residual[o]));
      }
  std::vector<scalar_t> y(total, static_cast<scalar_t>(NAN));
  launch(blocks, kThreads, [&] {
    forward_kernel<scalar_t, float, index_t>(x.data(), residual.data(), y.data(), mean.data(), invstd.data(), w.data(),
                                             b.data(), total, ix);
  });
  emu::expect_close("forward", ry, y, out_tol, shape);

  // The backward from the forward's y, with planted NaNs and -0s.
  for (int64_t o = 5; o < total; o += 53) y[o] = static_cast<scalar_t>(NAN);
  for (int64_t o = 7; o < total; o += 59) y[o] = static_cast<scalar_t>(-0.0f);
  std::vector<double> rg(total), sum_g(C, 0), sum_gx(C, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < HW; ++s) {
        const int64_t o = at(n, c, s);
        rg[o] = double(y[o]) <= 0 ? 0.0 : double(dy[o]);
        sum_g[c] += rg[o];
        sum_gx[c] += rg[o] * xhat(o, c);
      }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto grid = reduce_grid(C, M, cl, sms);
  std::vector<double> pg(grid.splits * C, nan), pgx(grid.splits * C, nan);
  std::vector<scalar_t> g(total, static_cast<scalar_t>(NAN));
  launch(grid.grid, grid.block, [&] {
    if (cl)
      backward_reduce_nhwc_kernel<scalar_t, float, index_t>(dy.data(), y.data(), x.data(), mean.data(), invstd.data(),
                                                            g.data(), pg.data(), pgx.data(), M, C);
    else
      backward_reduce_kernel<scalar_t, float, index_t>(dy.data(), y.data(), x.data(), mean.data(), invstd.data(),
                                                       g.data(), pg.data(), pgx.data(), M, ix);
  });
  for (int64_t o = 0; o < total; ++o)  // g is grad_out or 0: exact
    if (!(double(g[o]) == rg[o])) {
      ++emu::failures;
      std::printf("FAILED masked grad at %ld: %g, expected %g %s\n", long(o), double(g[o]), rg[o], shape);
      break;
    }
  std::vector<float> sg(C, NAN), sgx(C, NAN);
  launch(channel_blocks(C), kThreads, [&] {
    sums_finalize_kernel<float>(pg.data(), pgx.data(), sg.data(), sgx.data(), grid.splits, C, nullptr, nullptr,
                                float(M));
  });
  emu::expect_close("sum of grad", sum_g, sg, 1e-6, shape);
  emu::expect_close("sum of grad * xhat", sum_gx, sgx, 1e-5, shape);

  // grad_x from the exact g and the reference means, so that only this pass's error counts.
  std::vector<float> mg(C), mgx(C);
  for (int64_t c = 0; c < C; ++c) {
    mg[c] = float(sum_g[c] / M);
    mgx[c] = float(sum_gx[c] / M);
  }
  std::vector<double> rdx(total);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < HW; ++s) {
        const int64_t o = at(n, c, s);
        rdx[o] = w[c] * double(invstd[c]) * (rg[o] - mg[c] - xhat(o, c) * mgx[c]);
      }
  std::vector<scalar_t> dx(total, static_cast<scalar_t>(NAN));
  launch(blocks, kThreads, [&] {
    backward_elemt_kernel<scalar_t, float, index_t>(g.data(), x.data(), dx.data(), mean.data(), invstd.data(), w.data(),
                                                    mg.data(), mgx.data(), total, ix);
  });
  emu::expect_close("grad of x", rdx, dx, std::max(out_tol, 1e-5), shape);
}

}  // namespace fasthg

int main() {
  // Odd sizes, a single pixel, partial tiles of 32 channels (44, 65), several splits in either layout (the last
  // two: N*H*W of 4230 and 8827 split NCHW's 512-thread blocks 2 and 4 ways, unevenly).
  const int64_t shapes[][4] = {{2, 3, 5, 7},   {1, 5, 3, 1},   {3, 2, 1, 1},
                               {2, 44, 16, 16}, {2, 65, 6, 6}, {2, 3, 47, 45}, {1, 2, 91, 97}};
  for (const auto& s : shapes)
    for (bool cl : {false, true})
      for (int sms : {1, 132})
        for (unsigned most_blocks : {1u, 1u << 20}) {  // 1 block: the elementwise loops stride
          fasthg::check_bn_add_relu<float, uint32_t>(s[0], s[1], s[2], s[3], cl, sms, most_blocks);
          fasthg::check_bn_add_relu<float, int64_t>(s[0], s[1], s[2], s[3], cl, sms, most_blocks);
          fasthg::check_bn_add_relu<c10::BFloat16, uint32_t>(s[0], s[1], s[2], s[3], cl, sms, most_blocks);
          fasthg::check_bn_add_relu<c10::BFloat16, int64_t>(s[0], s[1], s[2], s[3], cl, sms, most_blocks);
        }
  return emu::finish();
}
