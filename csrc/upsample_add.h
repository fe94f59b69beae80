// Shared by the CPU and CUDA kernels of upsample_add: the nearest-neighbour index
// map (the same float formula as ATen's upsample_nearest2d, so results match
// F.interpolate(mode="nearest", size=...) bit for bit) and the argument checks.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace fasthg {

// Source index in an axis of length `in` for output index `dst` of an axis of length `out`.
C10_HOST_DEVICE inline int64_t nearest_src(int64_t dst, int64_t in, int64_t out) {
  if (out == in) return dst;
  if (out == 2 * in) return dst >> 1;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const int64_t s = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return s < in - 1 ? s : in - 1;
}

// First output index whose source is >= src (so [begin(s), begin(s+1)) are the outputs
// fed by source s). The map is monotone; start from the exact-ratio guess and correct.
C10_HOST_DEVICE inline int64_t nearest_dst_begin(int64_t src, int64_t in, int64_t out) {
  if (src >= in) return out;
  if (out == in) return src;
  if (out == 2 * in) return src << 1;
  int64_t d = (src * out) / in;
  while (d > 0 && nearest_src(d - 1, in, out) >= src) --d;
  while (d < out && nearest_src(d, in, out) < src) ++d;
  return d;
}

inline void check_upsample_add_args(const at::Tensor& low, const at::Tensor& skip) {
  TORCH_CHECK(low.dim() == 4, "upsample_add: `low` must be a 4-D [N, C, H, W] tensor, got ",
              low.dim(), "-D");
  TORCH_CHECK(skip.dim() == 4, "upsample_add: `skip` must be a 4-D [N, C, H, W] tensor, got ",
              skip.dim(), "-D");
  TORCH_CHECK(low.size(0) == skip.size(0) && low.size(1) == skip.size(1),
              "upsample_add: `low` and `skip` must have the same batch and channel sizes, got ",
              low.sizes(), " and ", skip.sizes());
  TORCH_CHECK(low.scalar_type() == skip.scalar_type(),
              "upsample_add: `low` and `skip` must have the same dtype, got ", low.scalar_type(),
              " and ", skip.scalar_type());
  TORCH_CHECK(low.device() == skip.device(),
              "upsample_add: `low` and `skip` must be on the same device, got ", low.device(),
              " and ", skip.device());
  TORCH_CHECK(at::isFloatingType(low.scalar_type()),
              "upsample_add: expected a floating-point dtype, got ", low.scalar_type());
  TORCH_CHECK(low.numel() > 0 && skip.numel() > 0,
              "upsample_add: empty tensors are not supported, got `low` ", low.sizes(),
              " and `skip` ", skip.sizes());
}

// In place, skip is the output: it must be dense in its own memory format (the layout the
// kernels walk) and apart from low.
inline void check_upsample_add_inplace_args(const at::Tensor& low, const at::Tensor& skip) {
  check_upsample_add_args(low, skip);
  TORCH_CHECK(skip.is_contiguous(skip.suggest_memory_format()),
              "upsample_add_inplace: `skip` must be dense (NCHW or channels_last), got strides ", skip.strides());
  const auto overlap = at::get_overlap_status(low, skip);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Partial && overlap != at::MemOverlapStatus::Full,
              "upsample_add_inplace: `low` must not overlap `skip` in memory (skip is written)");
}

inline void check_upsample_add_backward_args(const at::Tensor& grad_out, int64_t low_h,
                                             int64_t low_w) {
  TORCH_CHECK(grad_out.dim() == 4,
              "upsample_add_backward: `grad_out` must be 4-D, got ", grad_out.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()),
              "upsample_add_backward: expected a floating-point `grad_out`, got ",
              grad_out.scalar_type());
  TORCH_CHECK(low_h > 0 && low_w > 0 && grad_out.numel() > 0,
              "upsample_add_backward: empty sizes are not supported, got `grad_out` ",
              grad_out.sizes(), " and low size ", low_h, "x", low_w);
}

}  // namespace fasthg
