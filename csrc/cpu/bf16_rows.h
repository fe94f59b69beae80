// The bfloat16 per-row passes of the AMX kernels (conv1x1.cpp, conv2d.cpp, brgemm_bf16.cpp) on AVX-512 with AVX512_BF16,
// which every AMX CPU has: 16 lanes, bf16 <-> float in one instruction, masked tails. Without
// them the 8-wide AVX2 rows cost more than the AMX GEMMs they feed (benchmarks/results/
// HISTORY.md). The same float operations in the same order as bn_relu.h's per-element math
// (a multiply then an add, no FMA), with round to nearest even; the hardware conversion
// differs from c10's only for float denormals (flushed to zero, as oneDNN's bf16 does).
// ATen-free, bf16 as its bits, for the reason gemm_panels.h gives.
#pragma once

#include <cstdint>

namespace fasthg {
namespace bf16rows {

// The BN's per-channel constants: scale = invstd * weight (the product bn_relu.h forms).
struct Channels {
  const float *mean, *scale, *bias, *invstd;
};

// Whether this CPU has AVX512_BF16 (with AVX512BW and VL).
bool available();

// The passes below take `rows` consecutive rows of n values (row r of each operand at r * n).

// dst = bf16(relu((x - mean) * scale + bias)).
void activation(const uint16_t* x, int64_t rows, int64_t n, const Channels& ch, uint16_t* dst);

// The passes that sum over rows (store with s, masked_grad, add) take one group of at most
// kFloatRows rows (channel_passes.h): each channel's sum in float, row after row, then folded
// into the double totals.

// y = bf16(c + bias); with s non-null, the stored values' sum and their squares' added into s
// and s2 (per channel).
void store(const float* c, const float* bias, int64_t rows, int64_t n, uint16_t* y, double* s, double* s2);

// Where masked_grad puts the activation of its rows, bf16 in VNNI pairs (an AMX B operand,
// brgemm_bf16.h): a tile of `rows` rows (even) in column blocks of `block` channels, block q's
// [rows / 2][w][2] at tile + q * block * rows (w = block, or what is left of n), masked_grad's
// first row at row0 (even).
struct Pairs {
  uint16_t* tile;
  int64_t rows, block, row0;
};

// g = bf16(da where the pre-activation of x is > 0 or NaN, else 0), stored: the sum of its
// values added into sg and of their products with xhat = (x - mean) * invstd into sgx; and
// the activation relu(pre-activation) of the same rows into act (the weight gradient's
// operand, from the x it has read).
void masked_grad(const float* da, const uint16_t* x, int64_t rows, int64_t n, const Channels& ch, double* sg,
                 double* sgx, uint16_t* g, const Pairs& act);

// gx = bf16(scale * ((g - mean_g) - xhat * mean_gx) [+ skip]), g as masked_grad stores it (gx
// may be g): the BN's input gradient (bn_relu.h's bn_relu_grad_input), plus, where skip is not
// null, the gradient of another branch that took x, added before the one rounding (as
// bn_relu.cpp's).
void grad_input(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t n, const Channels& ch, const float* mean_g,
                const float* mean_gx, const uint16_t* skip, uint16_t* gx);

// s[j] += the sum of src[r * n + j] over the rows.
void add(const uint16_t* src, int64_t rows, int64_t n, double* s);

// The sum of src[0..n) in float (16 lanes, then across them).
float sum(const uint16_t* src, int64_t n);

// The AMX operands' layouts (brgemm_bf16.cpp), 32 columns or rows at a time:
// d[2j + i] = ri[j] for j below the returned count (the largest multiple of 32 <= n).
int64_t pair_rows(const uint16_t* r0, const uint16_t* r1, int64_t n, uint16_t* d);
// dst[j * ld_dst + p] = src[p * ld_src + j] for p < 32, j < 16.
void transpose_block(const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst);

}  // namespace bf16rows
}  // namespace fasthg
