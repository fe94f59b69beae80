// The per-channel reductions the BatchNorm ops' CUDA kernels share (bn_relu.cu, bn_add_relu.cu):
// where a channel's elements lie, the (channels, splits) grid that lets few channels with large
// H*W still fill the GPU, block and column sums of double accumulators, and the finalize of the
// double partials. In an anonymous namespace, as the kernels of the .cu files are: each
// includer gets its own copy.
#pragma once

#include <ATen/core/Tensor.h>
#ifndef FASTHG_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#endif

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "index.cuh"

namespace fasthg {
namespace {

constexpr int kReduceThreads = 512;
constexpr int kThreads = 256;

// Where element i (0 <= i < N*H*W) of channel c lies in dense NCHW or NHWC memory, and
// which channel an offset holds, dividing by H*W and C with IntDividers.
template <typename index_t>
struct ChannelIndex {
  IntDivider<index_t> hw, c;
  bool channels_last;

  __device__ __forceinline__ index_t offset(index_t i, index_t ch) const {
    if (channels_last) return i * c.divisor + ch;
    const auto q = hw.divmod(i);  // i = n * HW + s
    return (q.div * c.divisor + ch) * hw.divisor + q.mod;
  }

  __device__ __forceinline__ index_t channel(index_t off) const {
    return channels_last ? c.mod(off) : c.mod(hw.div(off));
  }
};

using BlockReduce = cub::BlockReduce<double, kReduceThreads>;

// Both block sums, on thread 0.
__device__ __forceinline__ void block_sums(double& a, double& b, typename BlockReduce::TempStorage& tmp) {
  a = BlockReduce(tmp).Sum(a);
  __syncthreads();  // the temporary storage is reused
  b = BlockReduce(tmp).Sum(b);
}

// This block's [begin, end) of the M = N*H*W elements of its channel (blockIdx.y of gridDim.y).
template <typename index_t>
__device__ __forceinline__ void split_range(index_t M, index_t& begin, index_t& end) {
  const index_t per = (M + gridDim.y - 1) / gridDim.y;
  begin = blockIdx.y * per;
  end = min(M, begin + per);
}

// channels_last: a block of kTileC x kTileRows threads takes 32 adjacent channels (a warp reads
// 32 neighbours in one row: coalesced, where one channel per block would read one element
// per row) over its split of the M rows, then adds up its row lanes per channel.
constexpr int kTileC = 32, kTileRows = kReduceThreads / kTileC;

// Each channel's sums of its kTileRows lanes, on the lanes of threadIdx.y == 0: a fixed-order
// loop of 16 additions per column (what cub::BlockReduce cannot do: it reduces a whole block).
__device__ __forceinline__ void column_sums(double& a, double& b) {
  __shared__ double sa[kTileRows][kTileC], sb[kTileRows][kTileC];
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int r = 1; r < kTileRows; ++r) {
      a += sa[r][threadIdx.x];
      b += sb[r][threadIdx.x];
    }
  }
}

// With `mean_g` (the training backward), also the means over `count` values, sum / count in
// acc_t as the CPU op computes them: two launches fewer.
template <typename acc_t>
__global__ void sums_finalize_kernel(const double* __restrict__ part_g, const double* __restrict__ part_gx,
                                     acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gx, int64_t splits,
                                     int64_t C, acc_t* __restrict__ mean_g, acc_t* __restrict__ mean_gx,
                                     acc_t count) {
  const int64_t c = thread_in_grid<int64_t>();
  if (c >= C) return;
  double a = 0, ax = 0;
  for (int64_t k = 0; k < splits; ++k) {
    a += part_g[k * C + c];
    ax += part_gx[k * C + c];
  }
  const acc_t g = static_cast<acc_t>(a), gx = static_cast<acc_t>(ax);
  sum_g[c] = g;
  sum_gx[c] = gx;
  if (mean_g) {
    mean_g[c] = g / count;
    mean_gx[c] = gx / count;
  }
}

unsigned int channel_blocks(int64_t C) { return static_cast<unsigned int>((C + kThreads - 1) / kThreads); }

template <typename index_t>
ChannelIndex<index_t> channel_index(int64_t HW, int64_t C, bool channels_last) {
  return {IntDivider<index_t>(HW), IntDivider<index_t>(C), channels_last};
}

// The reductions' launch: blocks of one channel (NCHW) or of 32 (channels_last) times `splits`
// blocks per column, about 4 blocks per SM in all, none with less than 4 elements a thread.
struct ReduceGrid {
  dim3 grid, block;
  int64_t splits;
};

ReduceGrid reduce_grid(int64_t C, int64_t M, bool channels_last, int sms) {
  const int64_t columns = channels_last ? (C + kTileC - 1) / kTileC : C;
  const int64_t lanes = channels_last ? kTileRows : kReduceThreads;  // threads along a column
  const int64_t want = (4 * int64_t(sms) + columns - 1) / columns;
  const int64_t most = std::max<int64_t>(1, M / (4 * lanes));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, most, 65535}));
  const dim3 block = channels_last ? dim3(kTileC, kTileRows) : dim3(kReduceThreads);
  return {dim3(static_cast<unsigned int>(columns), static_cast<unsigned int>(splits)), block, splits};
}

#ifndef FASTHG_HOST_EMULATION

// x made dense in its own memory format, and the facts the kernels need about it.
struct Dense {
  at::Tensor t;
  at::MemoryFormat fmt;
  int64_t M, C, HW;
  bool channels_last;

  template <typename index_t>
  ChannelIndex<index_t> index() const {
    return channel_index<index_t>(HW, C, channels_last);
  }

  ReduceGrid reduction(c10::DeviceIndex device) const {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return reduce_grid(C, M, channels_last, sms);
  }
};

Dense dense(const at::Tensor& x) {
  const auto fmt = x.suggest_memory_format();
  const int64_t HW = x.size(2) * x.size(3);
  return {x.contiguous(fmt), fmt, x.size(0) * HW, x.size(1), HW, fmt == at::MemoryFormat::ChannelsLast};
}

#endif  // FASTHG_HOST_EMULATION

}  // namespace
}  // namespace fasthg
