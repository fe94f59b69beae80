// CPU kernels of fasthg.ops.conv2d's float32 3x3 convolution (float64 too, for gradcheck):
// Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, CVPR 2016). Each 2x2 tile of the
// output is A^T [U . V] A, with U = G w G^T the transformed weight and V = B^T d B the 4x4
// input patch around the tile transformed: 16 products per tile and channel pair in place of
// a direct convolution's 36. A block of tiles is transformed into 16 planes, multiplied by 16
// GEMMs (gemm_panels.h) and transformed back while it is in the core's L2, so that the input
// is read and the output written once. The input gradient is the same forward with the weight
// turned by 180 degrees and its channel roles swapped; the weight gradient is the forward's
// adjoint, dW = G^T [sum over tiles (A g A^T) . V] G: 16 GEMMs per block, summed over tiles.
// Stride 1, zero padding 1, one group; data channels_last.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "aligned_buffer.h"
#include "channel_passes.h"
#include "gemm_panels.h"
#include "tiles.h"

namespace fasthg {
namespace {

constexpr const char* kFwd = "conv3x3_winograd";
constexpr const char* kBwd = "conv3x3_winograd_backward";

constexpr int kPoints = 16;  // a tile's transformed 4x4

// Tiles per block of the forward (and input gradient): its 16 planes of transformed input
// (C floats a tile) and of products (Cout) beside the transformed weight (16 C Cout floats,
// 1 MB at 128 channels) in a core's 2 MB L2.
constexpr int64_t kBlockTiles = 48;

// Tiles per block of the weight gradient: its two planes' sets beside the thread's 16 Cout x C
// float sums.
constexpr int64_t kWeightBlockTiles = 48;

// The distance between a block's planes (which a transform writes or reads all 16 of per
// channel): a cache line more than a multiple of 64 bytes, so that they never lie a multiple
// of 4 KiB apart and compete for the same L1 sets.
inline int64_t plane_stride(int64_t n) { return round_up(n, 16) + 16; }

// The output's 2x2 tiles in (image, tile row, tile column) order.
struct Grid {
  int64_t h, w, th, tw;
  Grid(int64_t h, int64_t w) : h(h), w(w), th((h + 1) / 2), tw((w + 1) / 2) {}
  int64_t image(int64_t t) const { return t / (th * tw); }
  int64_t y0(int64_t t) const { return t / tw % th * 2; }
  int64_t x0(int64_t t) const { return t % tw * 2; }
  bool inside(int64_t y, int64_t x) const { return y >= 0 && y < h && x >= 0 && x < w; }
};

// The N x N c-channel pixels of tile t's window, rows y0 + lo .. y0 + lo + N - 1 (likewise
// the columns): p[i][j] the pixel's channels, or outside(i, j) past the map's edge.
template <int N, typename P, typename F>
void window(P data, const Grid& g, int64_t c, int64_t t, int64_t lo, F outside, P (&p)[N][N]) {
  P img = data + g.image(t) * g.h * g.w * c;
  const int64_t y0 = g.y0(t) + lo, x0 = g.x0(t) + lo;
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j)
      p[i][j] = g.inside(y0 + i, x0 + j) ? img + ((y0 + i) * g.w + x0 + j) * c : outside(i, j);
}

// The 4x4 patch of c-channel pixels around tile t (rows y0 - 1 .. y0 + 2, zeros outside).
template <typename T>
void patch(const T* data, const Grid& g, int64_t c, int64_t t, const T* zeros, const T* (&d)[4][4]) {
  window<4>(data, g, c, t, -1, [&](int, int) { return zeros; }, d);
}

// V = B^T d B of channels [k0, k0 + n) of a patch: point e (row-major 4x4) to v[e * plane + k].
template <typename T>
void input_transform(const T* const (&d)[4][4], int64_t k0, int64_t n, T* __restrict v, int64_t plane) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    T r[4][4];
    for (int j = 0; j < 4; ++j) {
      const T d0 = d[0][j][k0 + k], d1 = d[1][j][k0 + k], d2 = d[2][j][k0 + k], d3 = d[3][j][k0 + k];
      r[0][j] = d0 - d2;
      r[1][j] = d1 + d2;
      r[2][j] = d2 - d1;
      r[3][j] = d1 - d3;
    }
    for (int i = 0; i < 4; ++i) {
      v[(4 * i) * plane + k] = r[i][0] - r[i][2];
      v[(4 * i + 1) * plane + k] = r[i][1] + r[i][2];
      v[(4 * i + 2) * plane + k] = r[i][2] - r[i][1];
      v[(4 * i + 3) * plane + k] = r[i][1] - r[i][3];
    }
  }
}

// A 2x2 tile of the output, A^T m A + bias, from its 16 products m[e * plane + k], channels
// [0, n); y[i][j] the pixel's channels (a dump buffer past the output's edge).
template <typename T>
void output_transform(const T* __restrict m, int64_t plane, int64_t n, const T* __restrict bias,
                      T* const (&y)[2][2]) {
  T* __restrict y00 = y[0][0];
  T* __restrict y01 = y[0][1];
  T* __restrict y10 = y[1][0];
  T* __restrict y11 = y[1][1];
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    T r[2][4];
    for (int j = 0; j < 4; ++j) {
      const T m1 = m[(4 + j) * plane + k], m2 = m[(8 + j) * plane + k];
      r[0][j] = m[j * plane + k] + m1 + m2;
      r[1][j] = m1 - m2 - m[(12 + j) * plane + k];
    }
    y00[k] = r[0][0] + r[0][1] + r[0][2] + bias[k];
    y01[k] = r[0][1] - r[0][2] - r[0][3] + bias[k];
    y10[k] = r[1][0] + r[1][1] + r[1][2] + bias[k];
    y11[k] = r[1][1] - r[1][2] - r[1][3] + bias[k];
  }
}

// A g A^T of a tile's 2x2 output gradient g (zeros past the edge), channels [0, n): the
// weight gradient's left operand, point e to v[e * plane + k].
template <typename T>
void grad_transform(const T* const (&g)[2][2], int64_t n, T* __restrict v, int64_t plane) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    T r[4][2];
    for (int j = 0; j < 2; ++j) {
      const T g0 = g[0][j][k], g1 = g[1][j][k];
      r[0][j] = g0;
      r[1][j] = g0 + g1;
      r[2][j] = g0 - g1;
      r[3][j] = -g1;
    }
    for (int i = 0; i < 4; ++i) {
      v[(4 * i) * plane + k] = r[i][0];
      v[(4 * i + 1) * plane + k] = r[i][0] + r[i][1];
      v[(4 * i + 2) * plane + k] = r[i][0] - r[i][1];
      v[(4 * i + 3) * plane + k] = -r[i][1];
    }
  }
}

// U = G g G^T of a 3x3 kernel.
C10_ALWAYS_INLINE void weight_transform(const double (&g)[3][3], double (&u)[4][4]) {
  double r[4][3];
  for (int j = 0; j < 3; ++j) {
    r[0][j] = g[0][j];
    r[1][j] = 0.5 * (g[0][j] + g[1][j] + g[2][j]);
    r[2][j] = 0.5 * (g[0][j] - g[1][j] + g[2][j]);
    r[3][j] = g[2][j];
  }
  for (int i = 0; i < 4; ++i) {
    u[i][0] = r[i][0];
    u[i][1] = 0.5 * (r[i][0] + r[i][1] + r[i][2]);
    u[i][2] = 0.5 * (r[i][0] - r[i][1] + r[i][2]);
    u[i][3] = r[i][2];
  }
}

// G^T du G: weight_transform's adjoint, a 3x3 kernel's gradient from its points'.
C10_ALWAYS_INLINE void weight_transform_adjoint(const double (&du)[4][4], double (&g)[3][3]) {
  double r[3][4];
  for (int j = 0; j < 4; ++j) {
    r[0][j] = du[0][j] + 0.5 * (du[1][j] + du[2][j]);
    r[1][j] = 0.5 * (du[1][j] - du[2][j]);
    r[2][j] = 0.5 * (du[1][j] + du[2][j]) + du[3][j];
  }
  for (int i = 0; i < 3; ++i) {
    g[i][0] = r[i][0] + 0.5 * (r[i][1] + r[i][2]);
    g[i][1] = 0.5 * (r[i][1] - r[i][2]);
    g[i][2] = 0.5 * (r[i][1] + r[i][2]) + r[i][3];
  }
}

// A transformed weight as the forward's GEMMs read it: point e's (cin x cout) matrix, in
// gemm_panels' B layout (panels of nr output channels, zero past cout).
template <typename T>
struct Transformed {
  int64_t cin, cout, cp;  // cp: cout rounded up to panels
  Scratch<T> u;
  const T* point(int e) const { return u.data() + e * cin * cp; }
};

// w [cout][cin][3][3]; flip: the input gradient's weight (w turned by 180 degrees, its
// input and output channels swapped).
template <typename T>
Transformed<T> transform_weight(const at::Tensor& w, bool flip, int64_t nr) {
  const T* wp = in<T>(w);  // in its own layout (channels_last in a channels_last model): no copy
  const int64_t co = w.size(0), ci = w.size(1), so = w.stride(0), si = w.stride(1), sa = w.stride(2), sb = w.stride(3);
  Transformed<T> t{flip ? co : ci, flip ? ci : co, 0, {}};
  t.cp = round_up(t.cout, nr);
  t.u.resize(kPoints * t.cin * t.cp);
  // by GEMM rows (input channels), the row's kernels side by side
  at::parallel_for(0, t.cin, 1, [&](int64_t p0, int64_t p1) {
    std::vector<double> g(9 * t.cp, 0.0), u(kPoints * t.cp);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t j = 0; j < t.cout; ++j) {
        const T* k = wp + (flip ? p * so + j * si : j * so + p * si);
        for (int tap = 0; tap < 9; ++tap) {
          const int a = flip ? 2 - tap / 3 : tap / 3, b = flip ? 2 - tap % 3 : tap % 3;
          g[tap * t.cp + j] = k[a * sa + b * sb];
        }
      }
      const int64_t cp = t.cp;
#pragma omp simd
      for (int64_t j = 0; j < cp; ++j) {
        double gj[3][3], uj[4][4];
        for (int tap = 0; tap < 9; ++tap) gj[tap / 3][tap % 3] = g[tap * cp + j];
        weight_transform(gj, uj);
        for (int e = 0; e < kPoints; ++e) u[e * cp + j] = uj[e / 4][e % 4];
      }
      for (int e = 0; e < kPoints; ++e)
        for (int64_t q = 0; q < cp / nr; ++q) {
          T* dst = t.u.data() + e * t.cin * cp + q * t.cin * nr + p * nr;
          const double* src = u.data() + e * cp + q * nr;
          for (int64_t r = 0; r < nr; ++r) dst[r] = static_cast<T>(src[r]);
        }
    }
  });
  return t;
}

// y [n][h][w][cout] = conv3x3(x [n][h][w][cin], the weight u was transformed from) + bias.
template <typename T>
void forward_tiles(const T* x, int64_t n, int64_t h, int64_t w, const Transformed<T>& u, const T* bias, T* y) {
  const gemm::Kernel<T> kern = gemm::kernel_for<T>();
  const Grid grid(h, w);
  const int64_t c = u.cin, cout = u.cout, cp = u.cp;
  const Tiles tiles(n * grid.th * grid.tw, kern.mr, kBlockTiles);
  const std::vector<T> zeros(std::max(c, cout), T(0));
  const T* b = bias ? bias : zeros.data();
  const int64_t pv = plane_stride(tiles.rows * c), pm = plane_stride(tiles.rows * cp);
  at::parallel_for(0, tiles.count(), 1, [&](int64_t b0, int64_t b1) {
    Scratch<T> v(kPoints * pv), m(kPoints * pm);
    Scratch<T> dump(4 * cout);  // a pixel each
    if (c == 0) std::fill(m.begin(), m.end(), T(0));  // (GEMMs of k = 0 write nothing)
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = tiles.first(blk), nt = tiles.size(blk);
      if (nt == 0) continue;
      const int64_t mp = round_up(nt, kern.mr);
      for (int64_t i = 0; i < nt; ++i) {
        const T* d[4][4];
        patch(x, grid, c, t0 + i, zeros.data(), d);
        input_transform(d, 0, c, v.data() + i * c, pv);
      }
      for (int e = 0; e < kPoints; ++e)  // the GEMM's pad rows: zeros, not stale values
        std::fill(v.data() + e * pv + nt * c, v.data() + e * pv + mp * c, T(0));
      for (int e = 0; e < kPoints; ++e)
        kern.run(v.data() + e * pv, c, 1, u.point(e), m.data() + e * pm, cp, mp, cp, c, false, nullptr, 0);
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i;
        T* out[2][2];
        window<2>(y, grid, cout, t, 0, [&](int a, int bb) { return dump.data() + (2 * a + bb) * cout; }, out);
        output_transform(m.data() + i * cp, pm, cout, b, out);
      }
    }
  });
}

// The weight and bias gradients from g [n][h][w][cout] and x [n][h][w][c]: per block, A = the
// tiles' A g A^T (column-major: tile-major rows of cout, padded to the kernel's mr), B = their
// V in panels of nr channels; each thread sums its 16 (cout x c) products in float, the bias
// (every tile's four gradient pixels, point 5 of A g A^T) in double.
template <typename T>
void weight_grad_tiles(const T* g, const T* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t cout,
                       const at::Tensor& grad_weight, T* gb) {
  const gemm::Kernel<T> kern = gemm::kernel_for<T>();
  const Grid grid(h, w);
  const int64_t nr = kern.nr, cp = round_up(c, nr), mp = round_up(cout, kern.mr);
  const Tiles tiles(n * grid.th * grid.tw, 1, kWeightBlockTiles);
  const std::vector<T> zeros(std::max(c, cout), T(0));
  const int64_t pa = plane_stride(tiles.rows * mp), pb = plane_stride(tiles.rows * cp);
  std::vector<Scratch<T>> acc(at::get_num_threads());  // read before the loop: inside, nested counts
  std::vector<std::vector<double>> bias_acc(acc.size());
  at::parallel_for(0, tiles.count(), 1, [&](int64_t b0, int64_t b1) {
    Scratch<T>& du = acc[at::get_thread_num()];
    std::vector<double>& db = bias_acc[at::get_thread_num()];
    bool started = !du.empty();
    Buffer<T> a(kPoints * pa);  // zero: the pad columns past cout stay so
    Scratch<T> bp(kPoints * pb);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = tiles.first(blk), nt = tiles.size(blk);
      if (nt == 0) continue;
      if (!started) {
        du.resize(kPoints * mp * cp);
        db.assign(cout, 0.0);
      }
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i;
        const T* gt[2][2];
        window<2>(g, grid, cout, t, 0, [&](int, int) { return zeros.data(); }, gt);
        grad_transform(gt, cout, a.data() + i * mp, pa);
        const T* sum4 = a.data() + 5 * pa + i * mp;
        for (int64_t k = 0; k < cout; ++k) db[k] += sum4[k];
        const T* d[4][4];
        patch(x, grid, c, t, zeros.data(), d);
        for (int64_t q = 0; q < cp / nr; ++q) {  // panel q: channels [q nr, q nr + nr) of nt tiles
          T* dst = bp.data() + q * nt * nr + i * nr;
          const int64_t len = std::min(nr, c - q * nr);
          input_transform(d, q * nr, len, dst, pb);
          for (int e = 0; e < kPoints && len < nr; ++e) std::fill(dst + e * pb + len, dst + e * pb + nr, T(0));
        }
      }
      for (int e = 0; e < kPoints; ++e)
        kern.run(a.data() + e * pa, 1, mp, bp.data() + e * pb, du.data() + e * mp * cp, cp, mp, cp, nt, started,
                 nullptr, 0);
      started = true;
    }
  });
  const T* total = sum_into_first(acc, kPoints * mp * cp);
  T* gw = out<T>(grad_weight);  // in the weight's layout
  const int64_t so = grad_weight.stride(0), si = grad_weight.stride(1), sa = grad_weight.stride(2),
                sb = grad_weight.stride(3);
  at::parallel_for(0, cout, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t i = 0; i < c; ++i) {
        double du[4][4], dw[3][3];
        for (int e = 0; e < kPoints; ++e) du[e / 4][e % 4] = total ? double(total[(e * mp + o) * cp + i]) : 0.0;
        weight_transform_adjoint(du, dw);
        for (int k = 0; k < 9; ++k) gw[o * so + i * si + k / 3 * sa + k % 3 * sb] = static_cast<T>(dw[k / 3][k % 3]);
      }
  });
  for (int64_t o = 0; o < cout; ++o) {
    double v = 0.0;
    for (const auto& part : bias_acc)
      if (!part.empty()) v += part[o];
    gb[o] = static_cast<T>(v);
  }
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, op, ": `x` must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": `x` must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 3 && weight.size(3) == 3, op,
              ": `weight` must be [Cout, ", x.size(1), ", 3, 3], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op, ": `weight` must be ",
              x.scalar_type(), " on ", x.device(), ", got ", weight.scalar_type(), " on ", weight.device());
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_args(kFwd, x, weight);
  const int64_t cout = weight.size(0);
  if (bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cout && bias->scalar_type() == x.scalar_type(), kFwd,
                ": `bias` must be [", cout, "] ", x.scalar_type(), ", got ", bias->sizes(), " ", bias->scalar_type());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl);
  at::Tensor y = at::empty({x.size(0), cout, x.size(2), x.size(3)}, x.options().memory_format(cl));
  if (y.numel() == 0) return y.contiguous(x.suggest_memory_format());
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kFwd, [&] {
    const auto u = transform_weight<scalar_t>(weight, false, gemm::kernel_for<scalar_t>().nr);
    forward_tiles<scalar_t>(in<scalar_t>(xc), x.size(0), x.size(2), x.size(3), u,
                            b.defined() ? in<scalar_t>(b) : nullptr, out<scalar_t>(y));
  });
  return y.contiguous(x.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& weight, bool input_grad) {
  check_args(kBwd, x, weight);
  const int64_t cout = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == cout &&
                  grad_out.size(2) == x.size(2) && grad_out.size(3) == x.size(3) &&
                  grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              kBwd, ": `grad_out` must be [", x.size(0), ", ", cout, ", ", x.size(2), ", ", x.size(3), "] ",
              x.scalar_type(), " on ", x.device(), ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl), gc = grad_out.contiguous(cl);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor gx = input_grad ? at::empty(x.sizes(), x.options().memory_format(cl)) : x.new_empty({0});
  at::Tensor gw = at::empty(weight.sizes(), weight.options().memory_format(weight.suggest_memory_format()));
  at::Tensor gb = at::empty({cout}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBwd, [&] {
    if (input_grad && gx.numel() > 0) {
      const auto u = transform_weight<scalar_t>(weight, true, gemm::kernel_for<scalar_t>().nr);
      forward_tiles<scalar_t>(in<scalar_t>(gc), n, h, w, u, nullptr, out<scalar_t>(gx));
    }
    weight_grad_tiles<scalar_t>(in<scalar_t>(gc), in<scalar_t>(xc), n, h, w, c, cout, gw, out<scalar_t>(gb));
  });
  return {input_grad ? gx.contiguous(x.suggest_memory_format()) : gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("conv3x3_winograd", &forward_cpu);
  m.impl("conv3x3_winograd_backward", &backward_cpu);
}

}  // namespace fasthg
