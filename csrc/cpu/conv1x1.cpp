// CPU kernels of the fused 1x1-convolution unit, fasthg.ops.bn_relu_conv1x1 (the twin of
// kernels/conv1x1.py): y = conv1x1(relu(bn(x))) with the normalised activation formed per
// tile of pixels in an L2-sized buffer as the GEMM reads it (it never reaches memory), and y's
// per-channel sums (the next BatchNorm's statistics) taken from the tile while it is in cache.
// The backward walks the same tiles once: it reads the output gradient and x, and gives the
// masked input gradient with the BN's two sums from the grad-activation GEMM's epilogue, and
// the weight and bias gradients from a second GEMM on the recomputed activation tile; the
// BN's elementwise backward is then bn_relu_backward_elemt's pass (on AMX, a second walk:
// backward_amx). Pixels are the GEMM's rows,
// so the kernels work on channels_last tensors (NCHW ones are converted, at a pass each way).
// Float32, float16 and bfloat16 compute in float32 (gemm_panels.h), float64 in double; on AMX
// CPUs bfloat16's GEMMs run on oneDNN's AMX micro-kernel instead (brgemm_bf16.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../bn_relu.h"
#include "bn_relu_cpu.h"
#include "aligned_buffer.h"
#include "bf16_rows.h"
#include "bn_relu_vec8.h"
#include "brgemm_bf16.h"
#include "channel_passes.h"
#include "gemm_panels.h"
#include "conv1x1_cpu.h"
#include "tiles.h"

namespace fasthg {
namespace gemm {

const Kernel<float>& best_float_kernel() {
  static const Kernel<float> chosen = [] {
    const char* env = std::getenv("FASTHG_GEMM");
    const std::string want = env ? env : "";
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (want != "plain" && want != "avx2" && kAvx512.run && __builtin_cpu_supports("avx512f")) return kAvx512;
    if (want != "plain" && kAvx2.run && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
    return plain_kernel<float>();
  }();
  return chosen;
}

template <>
Kernel<float> kernel_for<float>() { return best_float_kernel(); }
template <>
Kernel<double> kernel_for<double>() { return plain_kernel<double>(); }

}  // namespace gemm

namespace {

constexpr const char* kFwd = "bn_relu_conv1x1_forward";
constexpr const char* kBwd = "bn_relu_conv1x1_backward";

// Rows (pixels) per tile: the activation tile and the output tile (C channels and Cout
// columns of floats each) stay in a core's L2 at the hourglass's widths (256).
constexpr int64_t kTileRows = 192;

// Whether a call's GEMMs run on AMX: bfloat16 where amx::bf16_runs says so.
template <typename scalar_t>
constexpr bool kAmxType = std::is_same_v<scalar_t, c10::BFloat16>;

template <typename scalar_t>
bool on_amx(int64_t c, int64_t cout) {
  return kAmxType<scalar_t> && amx::bf16_runs(c, cout);
}

inline const uint16_t* bits(const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }
inline uint16_t* bits(c10::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }

// The BN's per-channel constants in the math type, once per call.
template <typename T>
struct BnParams {
  Buffer<T> mean, invstd, weight, bias, scale;  // scale = invstd * weight
  BnParams(const at::Tensor& m, const at::Tensor& s, const at::Tensor& w, const at::Tensor& b)
      : mean(vec(m)), invstd(vec(s)), weight(vec(w)), bias(vec(b)), scale(invstd.size()) {
    for (size_t k = 0; k < scale.size(); ++k) scale[k] = invstd[k] * weight[k];
  }
  bf16rows::Channels channels() const {
    if constexpr (std::is_same_v<T, float>) return {mean.data(), scale.data(), bias.data(), invstd.data()};
    TORCH_INTERNAL_ASSERT(false, "bf16rows takes float constants");
  }
  static Buffer<T> vec(const at::Tensor& t) {
    const T* p = in<T>(t);
    return Buffer<T>(p, p + t.numel());
  }
};

// After row r: two sets of partials (null totals: none kept) folded when due (channel_passes.h).
template <typename T>
void fold_two(int64_t r, int64_t rows, T* p0, T* p1, double* t0, double* t1, int64_t n) {
  if (t0 && fold_due(r, rows)) {
    fold(p0, t0, n);
    fold(p1, t1, n);
  }
}

// Whether the 8-wide paths take this storage and math type (float math on a vec8.h type).
template <typename scalar_t, typename T>
constexpr bool kWide =
#ifdef __AVX2__
    std::is_same_v<T, float> && kVec8<scalar_t>;
#else
    false;
#endif

// relu(bn(x)) for n channels of one NHWC row (the BN's constants from channel k0 on) into dst,
// rounded to x's dtype as the stored activation is (so that the unit computes what BN-ReLU
// followed by the convolution computes, in every dtype).
template <typename scalar_t, typename T>
C10_ALWAYS_INLINE void activation_row(const scalar_t* __restrict x, int64_t n, const BnParams<T>& bn, int64_t k0,
                                      T* __restrict dst) {
  const T *__restrict mean = bn.mean.data() + k0, *__restrict invstd = bn.invstd.data() + k0,
          *__restrict w = bn.weight.data() + k0, *__restrict b = bn.bias.data() + k0;
  int64_t k = 0;
#ifdef __AVX2__
  if constexpr (kWide<scalar_t, T>)
    for (; k + 8 <= n; k += 8) {
      const __m256 v = value8(load8(x + k), load8(mean + k), load8(invstd + k), load8(w + k), load8(b + k));
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm256_storeu_ps(dst + k, v);
      } else {
        scalar_t rounded[8];
        store8(rounded, v, false);
        _mm256_storeu_ps(dst + k, load8(rounded));
      }
    }
#endif
  for (; k < n; ++k)
    dst[k] = static_cast<T>(static_cast<scalar_t>(bn_relu_value<T>(static_cast<T>(x[k]), mean[k], invstd[k], w[k], b[k])));
}

// The activation of `rows` NHWC rows of c channels as the kernel's row-major A (stride c).
template <typename scalar_t, typename T>
void activation_rows(const scalar_t* x, int64_t rows, int64_t c, const BnParams<T>& bn, T* dst) {
  for (int64_t r = 0; r < rows; ++r) activation_row(x + r * c, c, bn, 0, dst + r * c);
}

// The same activation packed as a B operand: panels of nr channels, [rows][nr] each (zero
// channels beyond c); with bn null, x itself (a plain convolution's input).
template <typename scalar_t, typename T>
void activation_panels(const scalar_t* x, int64_t rows, int64_t c, int64_t nr, const BnParams<T>* bn, T* dst) {
  for (int64_t q = 0; q < round_up(c, nr) / nr; ++q) {
    const int64_t k0 = q * nr, width = std::min(nr, c - k0);
    for (int64_t r = 0; r < rows; ++r) {
      T* pr = dst + (q * rows + r) * nr;
      if (bn)
        activation_row(x + r * c + k0, width, *bn, k0, pr);
      else
        std::copy(x + r * c + k0, x + r * c + k0 + width, pr);
      std::fill(pr + width, pr + nr, T(0));
    }
  }
}

// One output row: C + bias rounded to the output dtype, and (s non-null) the stored values'
// sum and sum of squares added into the partials s and s2.
template <typename scalar_t, typename T>
C10_ALWAYS_INLINE void store_row(const T* __restrict cr, const T* __restrict bias, scalar_t* __restrict yr,
                                 int64_t n, T* __restrict s, T* __restrict s2, bool stream) {
  int64_t j = 0;
#ifdef __AVX2__
  if constexpr (kWide<scalar_t, T>)
    for (; j + 8 <= n; j += 8) {
      const __m256 sum = _mm256_add_ps(_mm256_loadu_ps(cr + j), _mm256_loadu_ps(bias + j));
      store8(yr + j, sum, stream);
      if (s) {
        // the value as stored (a float is stored exactly; no reading back a streamed line)
        const __m256 v = std::is_same_v<scalar_t, float> ? sum : load8(yr + j);
        _mm256_storeu_ps(s + j, _mm256_add_ps(_mm256_loadu_ps(s + j), v));
        _mm256_storeu_ps(s2 + j, _mm256_add_ps(_mm256_loadu_ps(s2 + j), _mm256_mul_ps(v, v)));
      }
    }
#endif
  for (; j < n; ++j) {
    yr[j] = static_cast<scalar_t>(cr[j] + bias[j]);
    if (s) {
      const T v = static_cast<T>(yr[j]);
      s[j] += v;
      s2[j] += v * v;
    }
  }
}

// One row of the activation's gradient: dA masked by the recomputed ReLU, rounded to x's
// dtype into g, and the stored values' sums (g and g * xhat) added into the partials sg, sgx.
template <typename scalar_t, typename T>
C10_ALWAYS_INLINE void masked_grad_row(const T* __restrict da, const scalar_t* __restrict x, const BnParams<T>& bn,
                                       int64_t n, scalar_t* __restrict g, T* __restrict sg, T* __restrict sgx) {
  const T *__restrict mean = bn.mean.data(), *__restrict invstd = bn.invstd.data(),
          *__restrict w = bn.weight.data(), *__restrict b = bn.bias.data();
  int64_t k = 0;
#ifdef __AVX2__
  if constexpr (kWide<scalar_t, T>)
    for (; k + 8 <= n; k += 8) {
      const __m256 d = _mm256_sub_ps(load8(x + k), load8(mean + k)), s = load8(invstd + k);
      const __m256 m = masked8(_mm256_loadu_ps(da + k), d, s, load8(w + k), load8(b + k));
      store8(g + k, m, false);
      const __m256 gv = std::is_same_v<scalar_t, float> ? m : load8(g + k);
      _mm256_storeu_ps(sg + k, _mm256_add_ps(_mm256_loadu_ps(sg + k), gv));
      _mm256_storeu_ps(sgx + k, _mm256_add_ps(_mm256_loadu_ps(sgx + k), _mm256_mul_ps(gv, _mm256_mul_ps(d, s))));
    }
#endif
  for (; k < n; ++k) {
    const T xv = static_cast<T>(x[k]);
    g[k] = static_cast<scalar_t>(bn_relu_masked_grad<T>(da[k], xv, mean[k], invstd[k], w[k], b[k]));
    const T gv = static_cast<T>(g[k]);
    sg[k] += gv;
    sgx[k] += gv * ((xv - mean[k]) * invstd[k]);
  }
}

// One row of the output gradient in the math type (zero-padded from n to n_pad), its values
// added into the partials sb (the conv bias's gradient).
template <typename scalar_t, typename T>
C10_ALWAYS_INLINE void grad_row(const scalar_t* __restrict src, int64_t n, int64_t n_pad, T* __restrict dst,
                                T* __restrict sb) {
  int64_t j = 0;
#ifdef __AVX2__
  if constexpr (kWide<scalar_t, T>)
    for (; j + 8 <= n; j += 8) {
      const __m256 v = load8(src + j);
      _mm256_storeu_ps(dst + j, v);
      _mm256_storeu_ps(sb + j, _mm256_add_ps(_mm256_loadu_ps(sb + j), v));
    }
#endif
  for (; j < n; ++j) {
    dst[j] = static_cast<T>(src[j]);
    sb[j] += dst[j];
  }
  std::fill(dst + n, dst + n_pad, T(0));
}

// A [k][n] matrix (element (p, j) at src[p * rs + j * cs]) as B panels of nr columns (zero
// columns beyond n): the weight W [Cout][C] as the forward's W^T (rs 1, cs C) and the
// backward's W (rs C, cs 1).
template <typename scalar_t, typename T>
Buffer<T> weight_panels(const scalar_t* src, int64_t k, int64_t n, int64_t rs, int64_t cs, int64_t nr) {
  Buffer<T> dst(round_up(n, nr) * k, T(0));
  for (int64_t q = 0; q * nr < n; ++q)  // row p of panel q: up to nr values
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = q * nr; j < std::min(n, q * nr + nr); ++j)
        dst[q * k * nr + p * nr + (j - q * nr)] = static_cast<T>(src[p * rs + j * cs]);
  return dst;
}

// W [Cout][C] as the AMX GEMM's B in VNNI pairs: W^T (the forward's, K = C) or W (the
// backward's, K = Cout); empty for the types that do not run on AMX.
template <typename scalar_t>
Buffer<scalar_t> weight_pairs(const scalar_t* w, int64_t cout, int64_t c, bool transposed) {
  if constexpr (kAmxType<scalar_t>) {
    if (!transposed) return amx::vnni_pairs(w, cout, c);
    Buffer<scalar_t> wt(c * cout);
    amx::transpose(w, cout, cout, c, c, wt.data(), cout);
    return amx::vnni_pairs(wt.data(), c, cout);
  }
  return Buffer<scalar_t>();
}

// The weight gradient [Cout][C] into gw (dense, in its dtype: x's, or the math type's for a
// weight given so) from the threads' partials (row stride ld; empty: a thread that had no
// tile), summed into the first one in thread order, then converted by ATen's vectorised copy.
template <typename Vec>
void store_weight_grad(std::vector<Vec>& dw, int64_t cout, int64_t c, int64_t ld, const at::Tensor& gw) {
  using T = typename Vec::value_type;
  T* total = sum_into_first(dw, cout * ld);
  TORCH_INTERNAL_ASSERT(total, "bn_relu_conv1x1: no thread summed a weight gradient");
  const auto type = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  gw.view({cout, c}).copy_(at::from_blob(total, {cout, ld}, at::TensorOptions().dtype(type)).narrow(1, 0, c));
}

// Per-thread double sums over channels, `sets` of `width`, each set laid out as sum_parts
// reads it ([thread][width]). The thread count is read before the parallel loop: inside it,
// get_num_threads is the nested one.
struct ThreadSums {
  int64_t width;
  std::vector<std::vector<double>> sets;
  ThreadSums(int64_t n_sets, int64_t width)
      : width(width), sets(n_sets, std::vector<double>(width * at::get_num_threads(), 0.0)) {}
  double* mine(int64_t set) { return sets[set].data() + at::get_thread_num() * width; }
  // The first n channels of a set, summed over the threads, into o.
  template <typename T>
  void store(int64_t set, T* o, int64_t n) const {
    for (int64_t k = 0; k < n; ++k) o[k] = static_cast<T>(sum_parts(sets[set], width, k));
  }
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& bn_w,
                    const at::Tensor& bn_b, const at::Tensor& conv_w, const at::Tensor& conv_b, const at::Tensor& y,
                    at::Tensor* sums) {
  using T = at::opmath_type<scalar_t>;
  const gemm::Kernel<T> kern = gemm::kernel_for<T>();
  const int64_t c = x.size(1), cout = conv_w.size(0), rows_total = x.numel() / c;
  const bool amx = on_amx<scalar_t>(c, cout);
  const Tiles tiles(rows_total, amx ? 16 : kern.mr, kTileRows);
  const int64_t np = amx ? cout : round_up(cout, kern.nr), tile = tiles.rows;
  const BnParams<T> bn(mean, invstd, bn_w, bn_b);
  // W^T as B
  const Buffer<T> wp = amx ? Buffer<T>() : weight_panels<scalar_t, T>(in<scalar_t>(conv_w), c, cout, 1, c, kern.nr);
  const Buffer<scalar_t> wv = amx ? weight_pairs(in<scalar_t>(conv_w), cout, c, true) : Buffer<scalar_t>();
  const T* bias = in<T>(conv_b);
  const scalar_t* xp = in<scalar_t>(x);
  scalar_t* yp = out<scalar_t>(y);
  ThreadSums acc(2, sums ? cout : 0);
  // The FMA path streams float y past the cache; AMX's bf16 y stays in it, for the next BN
  // (streamed, the forward took 1.5x as long at 128->256 64x64: benchmarks/results/HISTORY.md).
  const int64_t y_bytes = y.numel() * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = streams(yp, y_bytes, cout % 8 == 0);
  at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
    Buffer<T> a(amx ? 0 : tile * c);
    Scratch<T> cbuf(tile * np);  // (each tile's GEMM writes the rows its store reads)
    Scratch<scalar_t> abf(amx ? tile * c : 0);
    double* s = sums ? acc.mine(0) : nullptr;
    double* s2 = sums ? acc.mine(1) : nullptr;
    // the FMA path's float partials (the AMX path's passes keep their own)
    const bool partials = sums && !amx;
    Buffer<T> part(partials ? 2 * cout : 0, T(0));
    T* ps = partials ? part.data() : nullptr;
    T* ps2 = partials ? part.data() + cout : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = tiles.first(t), rows = tiles.size(t), rows_p = round_up(rows, kern.mr);
      if (rows == 0) continue;
      if (amx) {
        if constexpr (kAmxType<scalar_t>) {
          const bf16rows::Channels ch = bn.channels();
          bf16rows::activation(bits(xp + m0 * c), rows, c, ch, bits(abf.data()));
          amx::gemm(rows, cout, c, c, np, false, abf.data(), wv.data(), cbuf.data());  // (np = cout)
          in_float_groups(rows, [&](int64_t r, int64_t n) {
            bf16rows::store(cbuf.data() + r * np, bias, n, cout, bits(yp + (m0 + r) * cout), s, s2);
          });
        }
        continue;
      }
      activation_rows(xp + m0 * c, rows, c, bn, a.data());
      std::fill(a.begin() + rows * c, a.begin() + rows_p * c, T(0));
      const int64_t next = t + 1 < t1 ? tiles.size(t + 1) : 0;
      kern.run(a.data(), c, 1, wp.data(), cbuf.data(), np, rows_p, np, c, false, xp + tiles.first(t + 1) * c,
               next * c * static_cast<int64_t>(sizeof(scalar_t)));
      for (int64_t r = 0; r < rows; ++r) {
        store_row(cbuf.data() + r * np, bias, yp + (m0 + r) * cout, cout, ps, ps2, stream);
        fold_two(r, rows, ps, ps2, s, s2, cout);
      }
    }
    fence_streams(stream);
    if (amx) amx::release();
  });
  if (sums)
    for (int64_t set = 0; set < 2; ++set) acc.store(set, out<T>(sums[set]), cout);
}

// Fills g (x's sizes, NHWC) with the ReLU-masked gradient of the activation and returns, in
// the math type, the BN's sums of g and g * xhat and the convolution's weight and bias
// gradients. With bn null, a plain 1x1 convolution's backward (conv1x1_backward): the
// activation is x, g the input gradient G W (none where g is undefined), no BN sums.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const BnParams<at::opmath_type<scalar_t>>* bn,
                     const at::Tensor& conv_w, const at::Tensor& g, const at::Tensor& sum_g, const at::Tensor& sum_gx,
                     const at::Tensor& grad_w, const at::Tensor& grad_b) {
  using T = at::opmath_type<scalar_t>;
  const gemm::Kernel<T> kern = gemm::kernel_for<T>();
  const int64_t c = x.size(1), cout = conv_w.size(0), rows_total = x.numel() / c;
  const Tiles tiles(rows_total, kern.mr, kTileRows);
  const int64_t tile = tiles.rows;
  const int64_t nc = round_up(c, kern.nr);     // grad-activation columns (and dW's)
  const int64_t ga = round_up(cout, kern.mr);  // gradient tile's row stride: dW's A rows
  const Buffer<T> wp = weight_panels<scalar_t, T>(in<scalar_t>(conv_w), cout, c, c, 1, kern.nr);  // W as B
  const scalar_t* xp = in<scalar_t>(x);
  const scalar_t* gyp = in<scalar_t>(grad_y);
  scalar_t* gp = g.defined() ? out<scalar_t>(g) : nullptr;
  const int nthreads = at::get_num_threads();
  std::vector<Buffer<T>> dw(nthreads);  // dW [ga][nc] per thread, summed after
  ThreadSums acc(3, std::max(c, cout));
  at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
    Buffer<T>& dwt = dw[at::get_thread_num()];
    if (dwt.empty()) dwt.assign(ga * nc, T(0));
    Buffer<T> gt(tile * ga), act(tile * nc), cbuf(tile * nc);
    double *sg = acc.mine(0), *sgx = acc.mine(1), *sb = acc.mine(2);
    Buffer<T> part(2 * c + cout, T(0));
    T *psg = part.data(), *psgx = psg + c, *psb = psgx + c;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = tiles.first(t), rows = tiles.size(t), rows_p = round_up(rows, kern.mr);
      if (rows == 0) continue;
      // The gradient tile in the math type, zero-padded to ga columns and rows_p rows; the
      // conv bias's gradient summed on the way.
      for (int64_t r = 0; r < rows; ++r) {
        grad_row(gyp + (m0 + r) * cout, cout, ga, gt.data() + r * ga, psb);
        if (fold_due(r, rows)) fold(psb, sb, cout);
      }
      std::fill(gt.begin() + rows * ga, gt.begin() + rows_p * ga, T(0));
      // dW[co][k] += sum_r G[r][co] * act[r][k]: G read column-major, the activation recomputed.
      activation_panels(xp + m0 * c, rows, c, kern.nr, bn, act.data());
      const int64_t next = t + 1 < t1 ? tiles.size(t + 1) : 0, m1 = tiles.first(t + 1);
      kern.run(gt.data(), 1, ga, act.data(), dwt.data(), nc, ga, nc, rows, true, gyp + m1 * cout,
               next * cout * static_cast<int64_t>(sizeof(scalar_t)));
      if (!gp) continue;
      // dA = G W, masked by the recomputed ReLU; the BN's sums from the masked values as stored.
      kern.run(gt.data(), ga, 1, wp.data(), cbuf.data(), nc, rows_p, nc, cout, false, xp + m1 * c,
               next * c * static_cast<int64_t>(sizeof(scalar_t)));
      for (int64_t r = 0; r < rows && !bn; ++r)
        std::copy(cbuf.data() + r * nc, cbuf.data() + r * nc + c, gp + (m0 + r) * c);
      for (int64_t r = 0; r < rows && bn; ++r) {
        masked_grad_row(cbuf.data() + r * nc, xp + (m0 + r) * c, *bn, c, gp + (m0 + r) * c, psg, psgx);
        fold_two(r, rows, psg, psgx, sg, sgx, c);
      }
    }
  });
  if (bn) {
    acc.store(0, out<T>(sum_g), c);
    acc.store(1, out<T>(sum_gx), c);
  }
  acc.store(2, out<T>(grad_b), cout);
  store_weight_grad(dw, cout, c, nc, grad_w);
}

// The bfloat16 backward on AMX, grad_x itself rather than the masked gradient g, in two walks
// over the tiles. The first writes g = relu'(G W), rounded to bf16 as the composition stores
// it, into grad_x's memory and takes the conv bias's and the BN's sums and the weight gradient
// (dW += G^T act, the activation in pairs, the gradient tile transposed); the second turns g
// into grad_x in place with the BN's training terms (none in eval). g comes back from the
// last-level cache: reading it costs less than recomputing G W on AMX from the output
// gradient (benchmarks/results/HISTORY.md).
void backward_amx(const at::Tensor& grad_y, const at::Tensor& x, const BnParams<float>& bn, const at::Tensor& conv_w,
                  bool training, const at::Tensor* grad_skip, const at::Tensor& grad_x, const at::Tensor& sum_g,
                  const at::Tensor& sum_gx, const at::Tensor& grad_w, const at::Tensor& grad_b) {
  using scalar_t = c10::BFloat16;
  const int64_t c = x.size(1), cout = conv_w.size(0), rows_total = x.numel() / c;
  const Tiles tiles(rows_total, 16, kTileRows);
  const int64_t tile = tiles.rows, tile2 = round_up(tile, 2);
  const Buffer<scalar_t> wv = weight_pairs(in<scalar_t>(conv_w), cout, c, false);  // W as B
  const scalar_t* xp = in<scalar_t>(x);
  const scalar_t* gyp = in<scalar_t>(grad_y);
  const bf16rows::Channels ch = bn.channels();
  std::vector<Scratch<float>> dw(at::get_num_threads());  // dW [cout][c] per thread
  ThreadSums acc(3, std::max(c, cout));
  scalar_t* gxp = out<scalar_t>(grad_x);  // g, then grad_x in place
  at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
    // A thread's dW starts with its first tile (the parallel backend may hand it several
    // ranges, and a range may hold no rows: then it keeps none).
    Scratch<float>& dwt = dw[at::get_thread_num()];
    bool started = !dwt.empty();
    // (each tile writes what its GEMMs read)
    Scratch<float> da(tile * c);
    Scratch<scalar_t> apairs(tile2 * c), gtr(cout * tile2);
    double *sg = acc.mine(0), *sgx = acc.mine(1), *sb = acc.mine(2);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = tiles.first(t), rows = tiles.size(t), r2 = round_up(rows, 2);
      if (rows == 0) continue;
      if (!started) dwt.resize(cout * c);
      const scalar_t *gy = gyp + m0 * cout, *xt = xp + m0 * c;
      in_float_groups(rows, [&](int64_t r, int64_t n) { bf16rows::add(bits(gy + r * cout), n, cout, sb); });
      amx::gemm(rows, c, cout, cout, c, false, gy, wv.data(), da.data());
      static_assert(kFloatRows % 2 == 0, "masked_grad's activation pairs start on even rows");
      in_float_groups(rows, [&](int64_t r, int64_t n) {
        bf16rows::masked_grad(da.data() + r * c, bits(xt + r * c), n, c, ch, sg, sgx, bits(gxp + (m0 + r) * c),
                              {bits(apairs.data()), r2, amx::kBlockN, r});
      });
      amx::transpose(gy, rows, r2, cout, cout, gtr.data(), r2);
      amx::gemm(cout, c, r2, r2, c, started, gtr.data(), apairs.data(), dwt.data());
      started = true;
    }
    amx::release();
  });
  acc.store(0, out<float>(sum_g), c);
  acc.store(1, out<float>(sum_gx), c);
  acc.store(2, out<float>(grad_b), cout);
  store_weight_grad(dw, cout, c, c, grad_w);
  // The means of g and g * xhat in float, as the FMA path takes them (sum.div(count)).
  Buffer<float> mean_g(c, 0.f), mean_gx(c, 0.f);
  if (training) {
    const float count = static_cast<float>(rows_total);
    for (int64_t k = 0; k < c; ++k) {
      mean_g[k] = in<float>(sum_g)[k] / count;
      mean_gx[k] = in<float>(sum_gx)[k] / count;
    }
  }
  const scalar_t* skp = grad_skip ? in<scalar_t>(*grad_skip) : nullptr;
  at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = tiles.first(t), rows = tiles.size(t);
      if (rows == 0) continue;
      bf16rows::grad_input(bits(gxp + m0 * c), bits(xp + m0 * c), rows, c, ch, mean_g.data(), mean_gx.data(),
                           skp ? bits(skp + m0 * c) : nullptr, bits(gxp + m0 * c));
    }
  });
}

void check_unit_args(const char* op, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                     const at::Tensor& bn_w, const at::Tensor& bn_b, const at::Tensor& conv_w) {
  check_bn_relu_params(op, x, mean, invstd, bn_w, bn_b);
  TORCH_CHECK(conv_w.dim() == 4 && conv_w.size(1) == x.size(1) && conv_w.size(2) == 1 && conv_w.size(3) == 1 &&
                  conv_w.size(0) > 0,
              op, ": `conv_weight` must be [Cout, ", x.size(1), ", 1, 1] (a 1x1 convolution of the channels of `x`), got ",
              conv_w.sizes());
  TORCH_CHECK((conv_w.scalar_type() == x.scalar_type() || conv_w.scalar_type() == mean.scalar_type()) &&
                  conv_w.device() == x.device(),
              op, ": `conv_weight` must be ", x.scalar_type(), " (like `x`) or ", mean.scalar_type(),
              " (like the statistics) on ", x.device(), ", got ", conv_w.scalar_type(), " on ", conv_w.device());
}

// The weight as the GEMMs take it: x's dtype (a float32 weight cast here, as autocast would).
at::Tensor compute_weight(const at::Tensor& conv_w, const at::Tensor& x) {
  return conv_w.to(x.scalar_type()).contiguous();
}

at::Tensor nhwc(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& mean,
                                                           const at::Tensor& invstd, const at::Tensor& bn_w,
                                                           const at::Tensor& bn_b, const at::Tensor& conv_w,
                                                           const at::Tensor& conv_b, bool /*training*/,
                                                           bool out_stats) {
  check_unit_args(kFwd, x, mean, invstd, bn_w, bn_b, conv_w);
  const int64_t cout = conv_w.size(0);
  TORCH_CHECK(conv_b.dim() == 1 && conv_b.size(0) == cout && conv_b.scalar_type() == mean.scalar_type(), kFwd,
              ": `conv_bias` must be a 1-D ", mean.scalar_type(), " tensor of ", cout,
              " (the output channels), got ", conv_b.scalar_type(), " ", conv_b.sizes());
  const at::Tensor xc = nhwc(x);
  at::Tensor y = at::empty({x.size(0), cout, x.size(2), x.size(3)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto popts = mean.options();
  at::Tensor sums[2] = {at::empty({out_stats ? cout : 0}, popts), at::empty({out_stats ? cout : 0}, popts)};
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), kFwd, [&] {
    forward_kernel<scalar_t>(xc, mean.contiguous(), invstd.contiguous(), bn_w.contiguous(), bn_b.contiguous(),
                             compute_weight(conv_w, x), conv_b.contiguous(), y, out_stats ? sums : nullptr);
  });
  return {y.contiguous(x.suggest_memory_format()), sums[0], sums[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& bn_w, const at::Tensor& bn_b, const at::Tensor& conv_w, bool training,
    const std::optional<at::Tensor>& grad_skip) {
  check_unit_args(kBwd, x, mean, invstd, bn_w, bn_b, conv_w);
  const int64_t c = x.size(1), cout = conv_w.size(0);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == x.size(0) && grad_y.size(1) == cout &&
                  grad_y.size(2) == x.size(2) && grad_y.size(3) == x.size(3) &&
                  grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              kBwd, ": `grad_y` must be [", x.size(0), ", ", cout, ", ", x.size(2), ", ", x.size(3), "] ",
              x.scalar_type(), " on ", x.device(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  if (grad_skip) check_same_as_x(kBwd, "grad_skip", *grad_skip, x);
  const at::Tensor xc = nhwc(x), gyc = nhwc(grad_y);
  const at::Tensor skip = grad_skip ? nhwc(*grad_skip) : at::Tensor();
  const auto popts = mean.options();
  at::Tensor sum_g = at::empty({c}, popts), sum_gx = at::empty({c}, popts), grad_b = at::empty({cout}, popts);
  // The weight's gradient in the weight's dtype: a float32 weight's straight from the float sums.
  at::Tensor grad_w = at::empty(conv_w.sizes(), conv_w.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor m = mean.contiguous(), s = invstd.contiguous(), w = bn_w.contiguous(), b = bn_b.contiguous();
  const at::Tensor cw = compute_weight(conv_w, x);
  if (x.scalar_type() == at::kBFloat16 && on_amx<c10::BFloat16>(c, cout)) {
    at::Tensor grad_x = at::empty(xc.sizes(), xc.options().memory_format(at::MemoryFormat::ChannelsLast));
    backward_amx(gyc, xc, BnParams<float>(m, s, w, b), cw, training, grad_skip ? &skip : nullptr, grad_x, sum_g,
                 sum_gx, grad_w, grad_b);
    return {grad_x.contiguous(x.suggest_memory_format()), sum_gx, sum_g, grad_w, grad_b};
  }
  at::Tensor g = at::empty(xc.sizes(), xc.options().memory_format(at::MemoryFormat::ChannelsLast));
  FASTHG_BN_RELU_DISPATCH(x.scalar_type(), kBwd, [&] {
    const BnParams<at::opmath_type<scalar_t>> bn(m, s, w, b);
    backward_kernel<scalar_t>(gyc, xc, &bn, cw, g, sum_g, sum_gx, grad_w, grad_b);
  });
  // The BN's elementwise backward on the masked gradient (masking again is a no-op). In eval
  // the statistics are constants: no mean terms.
  const double count = static_cast<double>(x.numel() / c);
  const at::Tensor mean_g = training ? sum_g.div(count) : at::zeros({c}, popts);
  const at::Tensor mean_gx = training ? sum_gx.div(count) : at::zeros({c}, popts);
  at::Tensor grad_x = bn_relu_backward_elemt_skip_cpu(g, xc, m, s, w, b, mean_g, mean_gx, grad_skip ? &skip : nullptr);
  return {grad_x.contiguous(x.suggest_memory_format()), sum_gx, sum_g, grad_w, grad_b};
}

}  // namespace

void conv1x1_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& grad_x,
                      const at::Tensor& grad_w, const at::Tensor& grad_b) {
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                        grad_y.is_contiguous(at::MemoryFormat::ChannelsLast) && grad_w.is_contiguous());
  backward_kernel<float>(grad_y, x, nullptr, weight.contiguous(), grad_x, at::Tensor(), at::Tensor(), grad_w, grad_b);
}

namespace {

std::string gemm_kernel_cpu(at::ScalarType dtype) {
  if (dtype == at::kDouble) return gemm::plain_kernel<double>().name;
  if (dtype == at::kBFloat16 && amx::bf16_available()) return "amx";
  return gemm::best_float_kernel().name;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) {
  m.impl("bn_relu_conv1x1_forward", &forward_cpu);
  m.impl("bn_relu_conv1x1_backward", &backward_cpu);
}

TORCH_LIBRARY_IMPL(fasthg, CompositeExplicitAutograd, m) {
  m.impl("cpu_gemm_kernel", &gemm_kernel_cpu);
}

}  // namespace fasthg
