// CUDA kernels of fasthg::max_pool2x2 and its backward; which element of a window is its
// maximum is csrc/max_pool2x2.h's window_argmax, shared with the CPU twin, so ties and NaN go
// where ATen sends them. Both kernels take one thread per pooled element (4 a thread, loaded
// before any is stored: index.cuh), so each divides its index into coordinates once for the 4
// elements of its window. The forward stores the element it picked, not a rounded opmath
// value: the maximum is exact in every dtype. The backward recomputes the argmax from x
// instead of reading saved int64 indices, and writes all 4 elements of its window (grad_out
// at the argmax, 0 elsewhere) rather than zero-filling grad_x and scattering into it: grad_x
// is written once, in one pass. The odd last row and column (in no window) are zeroed by the
// threads of the windows beside them, so no element is written twice and no memset is needed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#ifndef FASTHG_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#endif

#include <cstdint>

#include "../max_pool2x2.h"
#include "index.cuh"

namespace fasthg {
namespace {

constexpr int kThreads = 256;

// The offset in x (and grad_x) of the first element of pooled element i's window, whose pooled
// row and column are h and w.
template <bool kChannelsLast, typename index_t>
__device__ __forceinline__ index_t window_at(index_t i, const Dims<index_t>& in, const Dims<index_t>& out,
                                             index_t& h, index_t& w) {
  index_t n, c;
  unravel<kChannelsLast>(i, out, n, c, h, w);
  return offset<kChannelsLast>(in, n, c, 2 * h, 2 * w);
}

// From an element of x to the next one along its row (dw) and down its column (dh).
template <bool kChannelsLast, typename index_t>
__device__ __forceinline__ void steps(const Dims<index_t>& in, index_t& dw, index_t& dh) {
  dw = kChannelsLast ? in.C.divisor : index_t(1);
  dh = in.W.divisor * dw;
}

template <typename scalar_t, typename index_t>
__device__ __forceinline__ int argmax_at(const scalar_t* x, index_t o, index_t dw, index_t dh) {
  using acc_t = at::opmath_type<scalar_t>;
  return window_argmax<acc_t>(x[o], x[o + dw], x[o + dh], x[o + dh + dw]);
}

// y[i] = x at the maximum of window i, as stored (no round trip through opmath).
template <typename scalar_t, bool kChannelsLast, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Dims<index_t> in,
                               Dims<index_t> out, index_t total) {
  index_t dw, dh;
  steps<kChannelsLast>(in, dw, dh);
  unrolled_grid_loop(total, [&](index_t i) {
    index_t h, w;
    const index_t o = window_at<kChannelsLast>(i, in, out, h, w);
    const int k = argmax_at(x, o, dw, dh);
    return x[o + (k & 1 ? dw : index_t(0)) + (k & 2 ? dh : index_t(0))];
  }, [&](index_t i, scalar_t v) { y[i] = v; });
}

// What a backward thread stores for its window: where it is in grad_x, grad_out there, the
// argmax, and whether the window borders the odd last column or row.
template <typename scalar_t, typename index_t>
struct Routed {
  index_t o;
  scalar_t g;
  int k;
  bool last_col, last_row;
};

// skip (may be null): max_pool2x2_backward_skip's gradient of another branch, added to each
// element written (the pool's gradient is grad_out's value or 0: the sum rounds as autograd's).
template <typename scalar_t, bool kChannelsLast, typename index_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                scalar_t* __restrict__ grad_x, Dims<index_t> in, Dims<index_t> out, index_t total,
                                const scalar_t* __restrict__ skip = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  index_t dw, dh;
  steps<kChannelsLast>(in, dw, dh);
  const bool odd_h = in.H.divisor % 2, odd_w = in.W.divisor % 2;
  const index_t last_h = out.H.divisor - 1, last_w = out.W.divisor - 1;
  unrolled_grid_loop(total, [&](index_t i) {
    index_t h, w;
    const index_t o = window_at<kChannelsLast>(i, in, out, h, w);
    return Routed<scalar_t, index_t>{o, grad[i], argmax_at(x, o, dw, dh), odd_w && w == last_w, odd_h && h == last_h};
  }, [&](index_t, const Routed<scalar_t, index_t>& r) {
    const scalar_t zero(0);
    auto put = [&](index_t at, scalar_t v) {
      grad_x[at] = skip ? static_cast<scalar_t>(static_cast<acc_t>(v) + static_cast<acc_t>(skip[at])) : v;
    };
    const index_t o1 = r.o + dh, o2 = o1 + dh;
    put(r.o, r.k == 0 ? r.g : zero);
    put(r.o + dw, r.k == 1 ? r.g : zero);
    put(o1, r.k == 2 ? r.g : zero);
    put(o1 + dw, r.k == 3 ? r.g : zero);
    if (r.last_col) put(r.o + 2 * dw, zero), put(o1 + 2 * dw, zero);
    if (r.last_row) {
      put(o2, zero);
      put(o2 + dw, zero);
      if (r.last_col) put(o2 + 2 * dw, zero);
    }
  });
}

// Above: what tests/cuda_emulation runs on the CPU (the kernels). Below: the ops, which need a GPU.
#ifndef FASTHG_HOST_EMULATION

at::Tensor max_pool2x2_cuda(const at::Tensor& x_in) {
  check_max_pool2x2_args(x_in);
  TORCH_CHECK(x_in.is_cuda(), "max_pool2x2: expected a CUDA tensor `x`");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto y = at::empty({N, C, H / 2, W / 2}, x.options().memory_format(fmt));
  const int64_t total = y.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_cuda", [&] {
    // Indexed by the size of x, the larger tensor, whose offsets the kernel computes.
    with_index_type(x.numel(), [&](auto index) {
      using index_t = decltype(index);
      auto launch = [&](auto kernel) {
        kernel<<<unrolled_blocks(total, kThreads), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), dims_of<index_t>(x), dims_of<index_t>(y),
            static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (fmt == at::MemoryFormat::ChannelsLast) launch(forward_kernel<scalar_t, true, index_t>);
      else launch(forward_kernel<scalar_t, false, index_t>);
    });
  });
  return y;
}

// max_pool2x2_backward, and with grad_skip (not null) max_pool2x2_backward_skip.
at::Tensor backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor* grad_skip) {
  check_max_pool2x2_backward_args(grad_in, x_in, grad_skip);
  TORCH_CHECK(x_in.is_cuda(), "max_pool2x2_backward: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = x_in.suggest_memory_format();
  const auto x = x_in.contiguous(fmt);
  const auto grad = grad_in.contiguous(fmt);
  const auto skip = grad_skip ? grad_skip->contiguous(fmt) : at::Tensor();
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t total = grad.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_backward_cuda", [&] {
    with_index_type(x.numel(), [&](auto index) {
      using index_t = decltype(index);
      auto launch = [&](auto kernel) {
        kernel<<<unrolled_blocks(total, kThreads), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
            dims_of<index_t>(x), dims_of<index_t>(grad), static_cast<index_t>(total),
            grad_skip ? skip.const_data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (fmt == at::MemoryFormat::ChannelsLast) launch(backward_kernel<scalar_t, true, index_t>);
      else launch(backward_kernel<scalar_t, false, index_t>);
    });
  });
  return grad_x;
}

at::Tensor max_pool2x2_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in) {
  return backward(grad_in, x_in, nullptr);
}

at::Tensor max_pool2x2_backward_skip_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                          const at::Tensor& grad_skip) {
  return backward(grad_in, x_in, &grad_skip);
}

#endif  // FASTHG_HOST_EMULATION

}  // namespace

#ifndef FASTHG_HOST_EMULATION
TORCH_LIBRARY_IMPL(fasthg, CUDA, m) {
  m.impl("max_pool2x2", &max_pool2x2_cuda);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cuda);
  m.impl("max_pool2x2_backward_skip", &max_pool2x2_backward_skip_cuda);
}
#endif

}  // namespace fasthg
