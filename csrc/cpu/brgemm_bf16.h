// The bfloat16 GEMMs of the fused 1x1-convolution unit (conv1x1.cpp) and of the convolution
// backward (conv2d.cpp) on AMX CPUs: oneDNN's batch-reduce GEMM micro-kernel as ATen exposes it
// (at::native::cpublas::brgemm, AMX tiles, float accumulation), fed from L2-sized tiles. Its B
// operand is bf16 in VNNI pairs (two consecutive K rows interleaved per column) and its A
// operand row-major with K contiguous, so the kernels lay their tiles out for it here: pairs
// for B, a transposed gradient tile as the weight gradient's A.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "aligned_buffer.h"

namespace fasthg {
namespace amx {

// Whether the AMX brgemm computes bfloat16 on this CPU (oneDNN's check, which also asks the
// kernel for AMX state), unless FASTHG_GEMM names one of the FMA kernels (avx512, avx2, plain).
bool bf16_available();

// Whether the AMX kernels (conv1x1.cpp, conv2d.cpp) take bfloat16 GEMMs with these channel
// counts here: bf16_available(), bf16_rows.h's AVX-512 passes, and both counts even (the
// GEMMs' K runs along them in VNNI pairs).
bool bf16_runs(int64_t c, int64_t cout);

// B operands are VNNI pairs in column blocks of kBlockN: block q holds columns [q kBlockN,
// q kBlockN + w) (w = kBlockN, or what is left) as [k / 2][w][2] at offset q kBlockN k. A call
// per block ran the forward 10% faster than one brgemm over 128 columns (HISTORY.md).
constexpr int64_t kBlockN = 64;

// C[i][j] (+)= sum_p A[i][p] B[p][j] for i < m, j < n, p < k (k even): A row-major with row
// stride lda; B [k][n] laid out as above; C float, row stride ldc.
void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc, bool accumulate, const c10::BFloat16* a,
          const c10::BFloat16* b, float* c);

// gemm with B a k-row window of a larger B operand: rows [k0, k0 + k) (k0 even) of one laid
// out as above for kb rows, in column blocks of `block`.
void gemm_window(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc, bool accumulate, const c10::BFloat16* a,
                 const c10::BFloat16* b, int64_t kb, int64_t k0, float* c, int64_t block = kBlockN);

// Frees this thread's AMX state: once per parallel chunk, after its last gemm.
void release();

// src [rows][n] (row stride ld) as a B operand (k = rows rounded up to even, the extra row zero).
void vnni_pairs(const c10::BFloat16* src, int64_t rows, int64_t n, int64_t ld, c10::BFloat16* dst);
// The same for a dense src [rows][n], into a new 64-byte aligned buffer.
Buffer<c10::BFloat16> vnni_pairs(const c10::BFloat16* src, int64_t rows, int64_t n);

// B operand rows from pointers: row p is rows[p][0..n) or, where rows[p] is null, zeros;
// count even; column blocks of `block`.
void vnni_pairs_of(const c10::BFloat16* const* rows, int64_t count, int64_t n, c10::BFloat16* dst,
                   int64_t block = kBlockN);

// dst[j * ld_dst + p] = src[p * ld_src + j] for p < rows, j < n, and zero for rows <= p < rows_pad.
void transpose(const c10::BFloat16* src, int64_t rows, int64_t rows_pad, int64_t n, int64_t ld_src,
               c10::BFloat16* dst, int64_t ld_dst);

}  // namespace amx
}  // namespace fasthg
