// csrc/cuda/bn_relu.cu's kernels on the CPU (cuda_shim.h), in float32 and bfloat16, with both
// index types, both layouts and several SM counts and grid sizes, against double references.
#include "cuda_shim.h"
#include "../../csrc/cuda/bn_relu.cu"

namespace fasthg {

template <typename scalar_t, typename index_t>
void check_bn_relu(int64_t N, int64_t C, int64_t H, int64_t W, bool cl, int sms, unsigned most_blocks) {
  char shape[128];
  std::snprintf(shape, sizeof shape, "[%ld,%ld,%ld,%ld] %s %zu-byte values, %d SMs, <= %u blocks, %zu-byte index",
                long(N), long(C), long(H), long(W), cl ? "NHWC" : "NCHW", sizeof(scalar_t), sms, most_blocks,
                sizeof(index_t));
  // Outputs are rounded to scalar_t once; sums and statistics are exact to float32 either way.
  const double out_tol = sizeof(scalar_t) == 2 ? 4e-3 : 1e-6;
  std::mt19937 gen(unsigned(N * 7919 + C * 104729 + H * 31 + W + cl));
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t HW = H * W, M = N * HW, total = M * C;
  auto at = [&](int64_t n, int64_t c, int64_t s) { return cl ? (n * HW + s) * C + c : (n * C + c) * HW + s; };
  std::vector<scalar_t> x(total), dy(total);
  std::vector<float> w(C), b(C);
  for (auto& v : x) v = static_cast<scalar_t>(normal(gen) * 2 + 100.f);  // an offset, as activations may have
  for (auto& v : dy) v = static_cast<scalar_t>(normal(gen));
  for (int64_t c = 0; c < C; ++c) {
    w[c] = 0.5f + std::abs(normal(gen));
    b[c] = normal(gen) * 0.1f;
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto ix = channel_index<index_t>(HW, C, cl);
  const auto g = reduce_grid(C, M, cl, sms);

  std::vector<double> s1(g.splits * C, nan), s2(g.splits * C, nan);
  launch(g.grid, g.block, [&] {
    if (cl)
      stats_nhwc_kernel<scalar_t, index_t>(x.data(), s1.data(), s2.data(), M, C);
    else
      stats_kernel<scalar_t, index_t>(x.data(), s1.data(), s2.data(), M, ix);
  });
  std::vector<float> mean(C, NAN), var(C, NAN), invstd_k(C, NAN);
  const float eps = 1e-5f;
  launch(channel_blocks(C), kThreads, [&] {
    stats_finalize_kernel<scalar_t, float, index_t>(x.data(), s1.data(), s2.data(), mean.data(), var.data(),
                                                 g.splits, M, ix, invstd_k.data(), eps);
  });
  std::vector<float> mean2(C, NAN), var2(C, NAN);  // the statistics op: no invstd asked for
  launch(channel_blocks(C), kThreads, [&] {
    stats_finalize_kernel<scalar_t, float, index_t>(x.data(), s1.data(), s2.data(), mean2.data(), var2.data(),
                                                 g.splits, M, ix, nullptr, eps);
  });
  if (mean2 != mean || var2 != var) {
    ++emu::failures;
    std::printf("FAILED statistics without invstd differ %s\n", shape);
  }
  std::vector<double> rmean(C, 0), rvar(C, 0);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < HW; ++s) rmean[c] += double(x[at(n, c, s)]);
    rmean[c] /= M;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < HW; ++s) rvar[c] += (double(x[at(n, c, s)]) - rmean[c]) * (double(x[at(n, c, s)]) - rmean[c]);
    rvar[c] /= M;
  }
  emu::expect_close("mean", rmean, mean, 1e-7, shape);
  emu::expect_close("var", rvar, var, 1e-6, shape);

  // The rest from the kernels' own statistics, so that only each pass's error counts.
  std::vector<float> invstd(C);
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0f / std::sqrt(var[c] + eps);  // float, as the CPU op
  if (invstd_k != invstd) {
    ++emu::failures;
    std::printf("FAILED invstd %s\n", shape);
  }
  std::vector<double> ry(total), sum_g(C, 0), sum_gx(C, 0), rdx(total);
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t s = 0; s < HW; ++s) {
          const int64_t o = at(n, c, s);
          const double xhat = (double(x[o]) - mean[c]) * double(invstd[c]), v = xhat * w[c] + b[c];
          const double gm = v > 0 ? double(dy[o]) : 0;
          if (pass == 0) {
            ry[o] = v > 0 ? v : 0;
            sum_g[c] += gm;
            sum_gx[c] += gm * xhat;
          } else {
            rdx[o] = w[c] * double(invstd[c]) * (gm - sum_g[c] / M - xhat * sum_gx[c] / M);
          }
        }
  const unsigned blocks = std::min(most_blocks, unrolled_blocks(total, kThreads));
  std::vector<scalar_t> y(total, static_cast<scalar_t>(NAN));
  launch(blocks, kThreads, [&] {
    forward_kernel<scalar_t, float, index_t>(x.data(), y.data(), mean.data(), invstd.data(), w.data(), b.data(), total,
                                          ix);
  });
  emu::expect_close("forward", ry, y, out_tol, shape);

  std::vector<double> pg(g.splits * C, nan), pgx(g.splits * C, nan);
  launch(g.grid, g.block, [&] {
    if (cl)
      backward_reduce_nhwc_kernel<scalar_t, float, index_t>(dy.data(), x.data(), mean.data(), invstd.data(), w.data(),
                                                         b.data(), pg.data(), pgx.data(), M, C);
    else
      backward_reduce_kernel<scalar_t, float, index_t>(dy.data(), x.data(), mean.data(), invstd.data(), w.data(),
                                                    b.data(), pg.data(), pgx.data(), M, ix);
  });
  std::vector<float> sg(C, NAN), sgx(C, NAN), mg_k(C, NAN), mgx_k(C, NAN);
  launch(channel_blocks(C), kThreads, [&] {
    sums_finalize_kernel<float>(pg.data(), pgx.data(), sg.data(), sgx.data(), g.splits, C, mg_k.data(),
                                mgx_k.data(), float(M));
  });
  emu::expect_close("sum of grad", sum_g, sg, 1e-5, shape);
  emu::expect_close("sum of grad * xhat", sum_gx, sgx, 1e-5, shape);
  std::vector<float> sg2(C, NAN), sgx2(C, NAN);  // the reduction op: no means asked for
  launch(channel_blocks(C), kThreads, [&] {
    sums_finalize_kernel<float>(pg.data(), pgx.data(), sg2.data(), sgx2.data(), g.splits, C, nullptr, nullptr,
                                float(M));
  });
  for (int64_t c = 0; c < C; ++c)  // each the kernel's own sum over the count, as the CPU op divides
    if (!(mg_k[c] == sg[c] / float(M) && mgx_k[c] == sgx[c] / float(M) && sg2[c] == sg[c] && sgx2[c] == sgx[c])) {
      ++emu::failures;
      std::printf("FAILED means of the sums, channel %ld %s\n", long(c), shape);
      break;
    }

  std::vector<float> mg(C), mgx(C);
  std::vector<scalar_t> dx(total, static_cast<scalar_t>(NAN));
  for (int64_t c = 0; c < C; ++c) {
    mg[c] = float(sum_g[c] / M);
    mgx[c] = float(sum_gx[c] / M);
  }
  launch(blocks, kThreads, [&] {
    backward_elemt_kernel<scalar_t, float, index_t>(dy.data(), x.data(), dx.data(), mean.data(), invstd.data(), w.data(),
                                                 b.data(), mg.data(), mgx.data(), total, ix);
  });
  emu::expect_close("grad of x", rdx, dx, std::max(out_tol, 1e-5), shape);

  // with a skip gradient (bn_relu_train_backward_skip): grad_x + skip in the same pass
  std::vector<scalar_t> skip(total), dxs(total, static_cast<scalar_t>(NAN));
  std::vector<double> rdxs(total);
  for (int64_t i = 0; i < total; ++i) {
    skip[i] = static_cast<scalar_t>(float(dy[(i * 7 + 3) % total]) * 0.5f);
    rdxs[i] = rdx[i] + double(skip[i]);
  }
  launch(blocks, kThreads, [&] {
    backward_elemt_kernel<scalar_t, float, index_t>(dy.data(), x.data(), dxs.data(), mean.data(), invstd.data(),
                                                 w.data(), b.data(), mg.data(), mgx.data(), total, ix, skip.data());
  });
  emu::expect_close("grad of x + skip", rdxs, dxs, std::max(out_tol, 1e-5), shape);
}

}  // namespace fasthg

int main() {
  // Odd sizes, a single pixel, partial tiles of 32 channels (44, 65), several splits.
  const int64_t shapes[][4] = {{2, 3, 5, 7}, {1, 5, 3, 1}, {3, 2, 1, 1}, {2, 44, 16, 16}, {2, 65, 6, 6}};
  for (const auto& s : shapes)
    for (bool cl : {false, true})
      for (int sms : {1, 132})
        for (unsigned most_blocks : {1u, 1u << 20}) {  // 1 block: the elementwise loops stride
          fasthg::check_bn_relu<float, uint32_t>(s[0], s[1], s[2], s[3], cl, sms, most_blocks);
          fasthg::check_bn_relu<float, int64_t>(s[0], s[1], s[2], s[3], cl, sms, most_blocks);
          fasthg::check_bn_relu<c10::BFloat16, uint32_t>(s[0], s[1], s[2], s[3], cl, sms, most_blocks);
        }
  return emu::finish();
}
