// csrc/cuda/max_pool2x2.cu's kernels (forward, backward) on the CPU (cuda_shim.h), in float32, bfloat16 and float16,
// with both index types and layouts, even and odd H and W, against a double reference of ATen's rule. Windows with ties
// (+0 and -0 among them), one or two NaNs (of different bits) and -inf are planted, and results compared bit for bit:
// a maximum and a routed gradient round nothing, and the outputs start as a NaN no input holds, so an element written
// never, or from the wrong position of a window, shows.
#include "cuda_shim.h"
#include "../../csrc/cuda/max_pool2x2.cu"

#include <cstring>

namespace fasthg {

// The bits of v; and a value of T from bits.
template <typename T>
uint32_t bits(T v) {
  if constexpr (sizeof(T) == 4) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return b;
  } else {
    return v.x;
  }
}

template <typename T>
T from_bits(uint32_t b) {
  if constexpr (sizeof(T) == 4) {
    T v;
    std::memcpy(&v, &b, 4);
    return v;
  } else {
    return T(static_cast<uint16_t>(b), T::from_bits());
  }
}

// Two quiet NaNs of different sign and payload (planted), and a third for the outputs to start as.
template <typename T>
struct NaNs {
  static constexpr uint32_t a = 0x7fc00000, b = 0xffc00001, poison = 0x7fedcba9;
};
template <>
struct NaNs<c10::BFloat16> {
  static constexpr uint32_t a = 0x7fc0, b = 0xffc1, poison = 0x7fee;
};
template <>
struct NaNs<c10::Half> {
  static constexpr uint32_t a = 0x7e00, b = 0xfe01, poison = 0x7f5a;
};

// ATen's rule in double: scan the window row-major from -inf; take an element greater than the best so far, or NaN.
inline int reference_argmax(const double v[4]) {
  double best = -INFINITY;
  int k = 0;
  for (int p = 0; p < 4; ++p)
    if (v[p] > best || std::isnan(v[p])) best = v[p], k = p;
  return k;
}

template <typename T>
void expect_bits(const char* what, const std::vector<T>& ref, const std::vector<T>& got, const char* shape) {
  size_t bad = 0, first = 0;
  for (size_t i = ref.size(); i-- > 0;)
    if (bits(ref[i]) != bits(got[i])) ++bad, first = i;
  if (bad) {
    ++emu::failures;
    std::printf("FAILED %s %s: %zu of %zu elements differ, first at %zu: want %g (bits %x), got %g (bits %x)\n", what,
                shape, bad, ref.size(), first, double(ref[first]), bits(ref[first]), double(got[first]),
                bits(got[first]));
  }
}

template <typename scalar_t, typename index_t, bool kChannelsLast>
void check_max_pool2x2(int64_t N, int64_t C, int64_t H, int64_t W, unsigned most_blocks) {
  char shape[128];
  std::snprintf(shape, sizeof shape, "[%ld,%ld,%ld,%ld] %s %zu-byte values, <= %u blocks, %zu-byte index", long(N),
                long(C), long(H), long(W), kChannelsLast ? "NHWC" : "NCHW", sizeof(scalar_t), most_blocks,
                sizeof(index_t));
  const int64_t Ho = H / 2, Wo = W / 2;
  auto at = [&](int64_t n, int64_t c, int64_t h, int64_t w, int64_t Hd, int64_t Wd) {
    return kChannelsLast ? ((n * Hd + h) * Wd + w) * C + c : ((n * C + c) * Hd + h) * Wd + w;
  };
  std::mt19937 gen(unsigned(N * 7919 + C * 104729 + H * 31 + W));
  std::normal_distribution<float> normal(0.f, 1.f);
  auto uniform = [&](int n) { return int(gen() % unsigned(n)); };
  const int64_t n_in = N * C * H * W, n_out = N * C * Ho * Wo;
  const auto poison = from_bits<scalar_t>(NaNs<scalar_t>::poison);
  const auto nan_a = from_bits<scalar_t>(NaNs<scalar_t>::a), nan_b = from_bits<scalar_t>(NaNs<scalar_t>::b);
  const auto inf = static_cast<scalar_t>(INFINITY);
  std::vector<scalar_t> x(n_in), grad(n_out), y(n_out, poison), grad_x(n_in, poison);
  for (auto& e : x) e = static_cast<scalar_t>(normal(gen));
  for (auto& e : grad) e = static_cast<scalar_t>(normal(gen));
  for (int64_t i = 0; i < n_in; i += 1 + uniform(23)) x[i] = uniform(2) ? nan_a : -inf;  // the odd row and column too
  // Plant in about half the windows: ties, NaNs, infinities.
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          scalar_t* v[4] = {&x[at(n, c, 2 * i, 2 * j, H, W)], &x[at(n, c, 2 * i, 2 * j + 1, H, W)],
                            &x[at(n, c, 2 * i + 1, 2 * j, H, W)], &x[at(n, c, 2 * i + 1, 2 * j + 1, H, W)]};
          const int p = uniform(4), q = (p + 1 + uniform(3)) % 4;  // two different positions
          const auto top = static_cast<scalar_t>(3.f + float(uniform(3)));  // above every normal value but 3-sigma
          switch (uniform(16)) {
            case 0:  // all equal
              for (auto* e : v) *e = *v[0];
              break;
            case 1:  // two equal maxima
              *v[p] = *v[q] = top;
              break;
            case 2:  // +0 and -0 tie above negatives
              for (auto* e : v) *e = static_cast<scalar_t>(-1.f - float(uniform(4)));
              *v[p] = static_cast<scalar_t>(0.f), *v[q] = static_cast<scalar_t>(-0.f);
              break;
            case 3:  // one NaN
              *v[p] = nan_a;
              break;
            case 4:  // two NaNs of different bits: the last one
              *v[p] = nan_a, *v[q] = nan_b;
              break;
            case 5:  // all -inf: the first
              for (auto* e : v) *e = -inf;
              break;
            case 6:  // -inf and one finite value
              for (auto* e : v) *e = -inf;
              *v[p] = top;
              break;
            case 7:  // +inf twice
              *v[p] = *v[q] = inf;
              break;
            default:
              break;
          }
        }
  const auto in = dims<index_t>(N, C, H, W), out = dims<index_t>(N, C, Ho, Wo);
  const unsigned blocks = std::min(most_blocks, unrolled_blocks(n_out, kThreads));
  launch(blocks, kThreads, [&] {
    forward_kernel<scalar_t, kChannelsLast, index_t>(x.data(), y.data(), in, out, index_t(n_out));
  });
  launch(blocks, kThreads, [&] {
    backward_kernel<scalar_t, kChannelsLast, index_t>(grad.data(), x.data(), grad_x.data(), in, out, index_t(n_out));
  });
  std::vector<scalar_t> ry(n_out), rgrad_x(n_in, static_cast<scalar_t>(0.f));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          const int64_t o[4] = {at(n, c, 2 * i, 2 * j, H, W), at(n, c, 2 * i, 2 * j + 1, H, W),
                                at(n, c, 2 * i + 1, 2 * j, H, W), at(n, c, 2 * i + 1, 2 * j + 1, H, W)};
          const double v[4] = {double(x[o[0]]), double(x[o[1]]), double(x[o[2]]), double(x[o[3]])};
          const int k = reference_argmax(v);
          ry[at(n, c, i, j, Ho, Wo)] = x[o[k]];
          rgrad_x[o[k]] = grad[at(n, c, i, j, Ho, Wo)];
        }
  expect_bits("forward", ry, y, shape);
  expect_bits("backward", rgrad_x, grad_x, shape);

  // with a skip gradient (max_pool2x2_backward_skip): every element, the odd last row and
  // column included, gets skip's value added, rounded once as an add would
  std::vector<scalar_t> skip(n_in), grad_xs(n_in, static_cast<scalar_t>(NAN)), rskip(n_in);
  for (int64_t e = 0; e < n_in; ++e) {
    skip[e] = static_cast<scalar_t>(0.25f * float((e * 7) % 13) - 1.f);
    rskip[e] = static_cast<scalar_t>(float(rgrad_x[e]) + float(skip[e]));
  }
  launch(blocks, kThreads, [&] {
    backward_kernel<scalar_t, kChannelsLast, index_t>(grad.data(), x.data(), grad_xs.data(), in, out, index_t(n_out),
                                                      skip.data());
  });
  expect_bits("backward + skip", rskip, grad_xs, shape);
}

template <typename scalar_t>
void check_all(int64_t N, int64_t C, int64_t H, int64_t W, unsigned most_blocks) {
  check_max_pool2x2<scalar_t, uint32_t, false>(N, C, H, W, most_blocks);
  check_max_pool2x2<scalar_t, uint32_t, true>(N, C, H, W, most_blocks);
  check_max_pool2x2<scalar_t, int64_t, false>(N, C, H, W, most_blocks);
  check_max_pool2x2<scalar_t, int64_t, true>(N, C, H, W, most_blocks);
}

}  // namespace fasthg

int main() {
  // N, C, H, W: odd H and W, one window, odd H only, many channels, odd W only, even.
  const int64_t cases[][4] = {{2, 3, 5, 7}, {1, 5, 2, 2}, {2, 4, 9, 8}, {1, 40, 16, 16}, {2, 3, 3, 2}, {1, 6, 6, 11},
                              {2, 3, 6, 8}};
  for (const auto& k : cases)
    for (unsigned most_blocks : {1u, 1u << 20}) {  // 1 block: the loop strides
      fasthg::check_all<float>(k[0], k[1], k[2], k[3], most_blocks);
      fasthg::check_all<c10::BFloat16>(k[0], k[1], k[2], k[3], most_blocks);
      fasthg::check_all<c10::Half>(k[0], k[1], k[2], k[3], most_blocks);
    }
  return emu::finish();
}
