// CPU kernel of fasthg.ops.conv2d's backward for bfloat16 on AMX CPUs. There oneDNN's bf16
// weight gradient takes 2-3x its own forward (1x1 and 3x3, benchmarks/results/HISTORY.md);
// here it is k^2 GEMMs on the AMX micro-kernel oneDNN's forward runs (brgemm_bf16.h), per band
// of output rows: dW[kh][kw] += G^T X_(kh,kw), A the band's output gradient transposed (Cout x
// pixels), B the band's input shifted by (kh - p, kw - p) in VNNI pairs. Accumulation in float
// per thread (the bias in double), rounded once into the weight's dtype. A 1x1's input
// gradient comes from the same band pass; a kxk's is oneDNN's (as fast as its forward).
// Stride 1, zero padding k / 2, dilation 1, one group: the hourglass's convolutions. Other
// dtypes and CPUs without AMX take ATen's convolution_backward, so that the op is defined
// everywhere; fasthg.ops.conv2d calls it only where it runs on AMX and pays. A float32 1x1's
// gradients come from the 1x1 unit's float kernel without its BN-ReLU (conv1x1_cpu.h) on CPUs
// with AVX2 or AVX-512: one pass over the output gradient for the three.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "aligned_buffer.h"
#include "bf16_rows.h"
#include "brgemm_bf16.h"
#include "channel_passes.h"
#include "conv1x1_cpu.h"
#include "gemm_panels.h"

namespace fasthg {
namespace {

constexpr const char* kOp = "conv2d_backward";

// Output pixels per band: the two copies of A (Cout x 768 bf16), B and the k^2 float
// accumulators stay in a core's 2 MB L2 at the hourglass's widths (128 channels, 3x3: 1.4 MB);
// 512 and 1024 ran within noise, 256 and 2048 slower (HISTORY.md).
constexpr int64_t kBandPixels = 768;

// B's column block: up to 256 channels in one brgemm call, so that A (the larger operand) is
// read once per tap (HISTORY.md).
constexpr int64_t kBlockN = 256;

// Rows of the input gradient's GEMM per call (its float tile: 192 x 256 x 4 bytes).
constexpr int64_t kDxRows = 192;

// K per AMX bf16 tile: a band's K rounded up to it, so that brgemm runs no K tail.
constexpr int64_t kAmxK = 32;

using bf16 = c10::BFloat16;

const uint16_t* bits(const bf16* p) { return reinterpret_cast<const uint16_t*>(p); }
uint16_t* bits(bf16* p) { return reinterpret_cast<uint16_t*>(p); }

// The threads' float sums (summed into the first in thread order) into gw [cout][c][k][k] in
// its layout and dtype by ATen's vectorised copy (the weight's dtype, or float32 for float32
// parameters under autocast: their gradient then skips a bf16 rounding and autograd's cast
// back); their double bias sums into gb, through float.
void store_weight_grads(std::vector<Scratch<float>>& acc, const std::vector<std::vector<double>>& bias_acc,
                        int64_t cout, int64_t c, int64_t k, bool swap, const at::Tensor& gw, const at::Tensor& gb) {
  float* total = sum_into_first(acc, k * k * cout * c);
  TORCH_INTERNAL_ASSERT(total, kOp, ": no thread summed a weight gradient");
  const auto f = at::TensorOptions().dtype(at::kFloat);
  if (swap)  // dW^T [c][cout]
    gw.copy_(at::from_blob(total, {c, cout}, f).t().unsqueeze(2).unsqueeze(3));
  else  // [kh][kw][cout][c]
    gw.copy_(at::from_blob(total, {k, k, cout, c}, f).permute({2, 3, 0, 1}));
  at::Tensor bias = at::empty({cout}, f);
  for (int64_t j = 0; j < cout; ++j) {
    double v = 0.0;
    for (const auto& part : bias_acc)
      if (!part.empty()) v += part[j];
    out<float>(bias)[j] = static_cast<float>(v);
  }
  gb.copy_(bias);
}

// gw [cout][c][k][k] and gb [cout] (bf16 or float: store_weight_grads) from g [n][h][w][cout]
// and x [n][h][w][c].
// A band of r output rows takes r + 2p input rows, each padded with p zero pixels on both
// sides to an even width wq, in VNNI pairs once: B, pixel (yy, xs) at row yy wq + xs + p.
// Tap (kh, kw) pairs output pixel (y, x) with B's row (y + kh) wq + x + kw: a window of B from
// row kh wq + kw against A_0, the band's gradient transposed with output pixel (y, x) at
// column y wq + x (zeros between). VNNI windows start at even rows, so odd kw take A_1 (A_0
// shifted by one column, one aligned copy) and the window from row kh wq + kw - 1.
// A 1x1 convolution with more output than input channels swaps the roles (dW^T = X^T G): the
// transpose costs about twice the pairing per byte, so the smaller tensor is transposed.
// With gx (1x1 only), the input gradient too, per band while its gradient rows are in cache:
// gx = G W (A the gradient's rows as they lie, B the weight in pairs), rounded once.
void backward_amx(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gw,
                  const at::Tensor& gb, const at::Tensor* gx) {
  const int64_t k = weight.size(2);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), cout = g.size(1), p = k / 2;
  const bool swap = k == 1 && cout > c;
  const bf16* ap = in<bf16>(swap ? x : g);  // transposed into A: M = ma channels
  const bf16* bp = in<bf16>(swap ? g : x);  // paired into B: N = nb channels
  const int64_t ma = swap ? c : cout, nb = swap ? cout : c;
  const int64_t wq = round_up(w + 2 * p, 2), band = std::clamp(kBandPixels / wq, int64_t(1), h);
  const int64_t bands = (h + band - 1) / band, taps = k * k;
  // A's columns and B's rows (pixels), at most: K a multiple of AMX's 32 (A's extra columns zero,
  // B's extra rows zero, never NaN times zero).
  const int64_t ka = round_up(band * wq, kAmxK), kb_max = round_up((k - 1) * (wq + 1) + ka, 2);
  const int64_t copies = k > 1 ? 2 : 1;
  const bf16* gp = in<bf16>(g);
  bf16* gxp = gx ? out<bf16>(*gx) : nullptr;
  const Buffer<bf16> wpairs = gx ? amx::vnni_pairs(in<bf16>(weight), cout, c) : Buffer<bf16>();  // W [cout][c] as B
  const std::vector<float> zeros(c, 0.f);
  // Read before the parallel loop: inside it, get_num_threads is the nested one.
  std::vector<Scratch<float>> acc(at::get_num_threads());  // (each thread's first band writes it all)
  std::vector<std::vector<double>> bias_acc(acc.size());
  at::parallel_for(0, n * bands, 1, [&](int64_t t0, int64_t t1) {
    // A thread's sums start with its first band (the parallel backend may hand it several ranges).
    Scratch<float>& dw = acc[at::get_thread_num()];
    std::vector<double>& db = bias_acc[at::get_thread_num()];
    bool started = !dw.empty();
    if (!started) {
      dw.resize(taps * ma * nb);
      db.assign(cout, 0.0);
    }
    Scratch<bf16> a(copies * ma * ka), b(kb_max * nb);  // (each band writes what its GEMMs read)
    Buffer<float> dx(gx ? kDxRows * c : 0);
    std::vector<const bf16*> rows(kb_max);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t img = t / bands, y0 = (t % bands) * band, r = std::min(band, h - y0);
      const int64_t kk = round_up(r * wq, kAmxK), kb = round_up((k - 1) * (wq + 1) + kk, 2);
      const bf16* ai = ap + (img * h + y0) * w * ma;
      const bf16* bi = bp + img * h * w * nb;
      for (int64_t y = 0; y < r; ++y) amx::transpose(ai + y * w * ma, w, wq, ma, ma, a.data() + y * wq, kk);
      for (int64_t j = 0; j < ma; ++j) {
        bf16* a0 = a.data() + j * kk;
        std::fill(a0 + r * wq, a0 + kk, bf16(0.f));
        if (!swap) db[j] += bf16rows::sum(bits(a0), r * wq);
        if (copies > 1) {
          bf16* dst = a.data() + (ma + j) * kk;
          dst[0] = bf16(0.f);
          std::memcpy(dst + 1, a0, (kk - 1) * sizeof(bf16));
        }
      }
      if (swap) {  // the band's gradient rows, in float for kFloatRows rows, then double
        const bf16* gi = bi + y0 * w * cout;
        in_float_groups(r * w, [&](int64_t q, int64_t n) { bf16rows::add(bits(gi + q * cout), n, cout, db.data()); });
      }
      for (int64_t i = 0; i < kb; ++i) {
        const int64_t ys = y0 + i / wq - p, xs = i % wq - p;
        rows[i] = i < (r + 2 * p) * wq && ys >= 0 && ys < h && xs >= 0 && xs < w ? bi + (ys * w + xs) * nb : nullptr;
      }
      amx::vnni_pairs_of(rows.data(), kb, nb, b.data(), kBlockN);
      for (int64_t kh = 0; kh < k; ++kh)
        for (int64_t kw = 0; kw < k; ++kw)
          amx::gemm_window(ma, nb, kk, kk, nb, started, a.data() + (kw % 2) * ma * kk, b.data(), kb,
                           kh * wq + kw - kw % 2, dw.data() + (kh * k + kw) * ma * nb, kBlockN);
      started = true;
      if (gxp) {
        const int64_t m_end = r * w, row0 = (img * h + y0) * w;
        for (int64_t m0 = 0; m0 < m_end; m0 += kDxRows) {
          const int64_t mr = std::min(kDxRows, m_end - m0);
          amx::gemm(mr, c, cout, cout, c, false, gp + (row0 + m0) * cout, wpairs.data(), dx.data());
          bf16rows::store(dx.data(), zeros.data(), mr, c, bits(gxp + (row0 + m0) * c), nullptr, nullptr);
        }
      }
    }
    amx::release();
  });
  store_weight_grads(acc, bias_acc, cout, c, k, swap, gw, gb);
}

// Whether float32 runs on the FMA GEMM kernels (AVX2 or AVX-512), where a 1x1's backward is
// the BN-ReLU-conv1x1 unit's kernel without its BN-ReLU (conv1x1_cpu.h).
bool float_kernel_runs() {
  const std::string name = gemm::best_float_kernel().name;
  return name == "avx512" || name == "avx2";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& weight, bool input_grad,
                                                            std::optional<at::ScalarType> grad_weight_dtype) {
  TORCH_CHECK(x.dim() == 4, kOp, ": `x` must be 4-D [N, C, H, W], got ", x.sizes());
  const int64_t k = weight.dim() == 4 ? weight.size(2) : 0;
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(3) == k && k % 2 == 1,
              kOp, ": `weight` must be [Cout, ", x.size(1), ", k, k] with k odd (stride 1, padding k // 2), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), kOp,
              ": `weight` must be ", x.scalar_type(), " on ", x.device(), ", got ", weight.scalar_type(), " on ",
              weight.device());
  const at::ScalarType gw_dtype = grad_weight_dtype.value_or(weight.scalar_type());
  TORCH_CHECK(gw_dtype == weight.scalar_type() || gw_dtype == at::kFloat, kOp,
              ": `grad_weight_dtype` must be the weight's dtype (", weight.scalar_type(), ") or float32, got ",
              gw_dtype);
  const int64_t cout = weight.size(0), p = k / 2;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == cout &&
                  grad_out.size(2) == x.size(2) && grad_out.size(3) == x.size(3) &&
                  grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              kOp, ": `grad_out` must be [", x.size(0), ", ", cout, ", ", x.size(2), ", ", x.size(3), "] ",
              x.scalar_type(), " on ", x.device(), ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const auto fmt = x.suggest_memory_format();
  const at::Tensor none = x.new_empty({0});
  if (x.scalar_type() == at::kFloat && k == 1 && x.numel() > 0 && cout > 0 && float_kernel_runs()) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor xc = x.contiguous(cl), gc = grad_out.contiguous(cl);
    at::Tensor gx = input_grad ? at::empty(x.sizes(), x.options().memory_format(cl)) : at::Tensor();
    at::Tensor gw = at::empty(weight.sizes(), weight.options()), gb = at::empty({cout}, weight.options());
    conv1x1_backward(gc, xc, weight, gx, gw, gb);
    return {input_grad ? gx.contiguous(fmt) : none, gw.contiguous(weight.suggest_memory_format()), gb};
  }
  if (x.scalar_type() != at::kBFloat16 || !amx::bf16_runs(x.size(1), cout) || x.numel() == 0) {
    auto grads = at::convolution_backward(grad_out, x, weight, at::IntArrayRef{cout}, {1, 1}, {p, p}, {1, 1}, false,
                                          {0, 0}, 1, {input_grad, true, true});
    return {input_grad ? std::get<0>(grads).contiguous(fmt) : none,
            std::get<1>(grads).to(gw_dtype).contiguous(weight.suggest_memory_format()),
            std::get<2>(grads).to(gw_dtype)};
  }
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor gc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  // the weight's layout (channels_last in a channels_last model): no copy after
  const auto gw_options = weight.options().dtype(gw_dtype);
  at::Tensor gw = at::empty(weight.sizes(), gw_options.memory_format(weight.suggest_memory_format()));
  at::Tensor gb = at::empty({cout}, gw_options);
  at::Tensor gx = none;
  if (input_grad && k == 1) gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // (the weight's values are read for a 1x1's input gradient only)
  backward_amx(gc, xc, k == 1 ? weight.contiguous() : weight, gw, gb, input_grad && k == 1 ? &gx : nullptr);
  if (input_grad && k != 1)  // oneDNN's, at the speed of its forward
    gx = std::get<0>(at::convolution_backward(gc, xc, weight, at::OptionalIntArrayRef{}, {1, 1}, {p, p}, {1, 1},
                                              false, {0, 0}, 1, {true, false, false}));
  return {input_grad ? gx.contiguous(fmt) : none, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthg, CPU, m) { m.impl("conv2d_backward", &backward_cpu); }

}  // namespace fasthg
