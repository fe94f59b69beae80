// 64-byte aligned vectors for the AMX kernels' tiles, packed operands and per-thread sums
// (conv1x1.cpp, conv2d.cpp): with malloc's 16-byte alignment, AMX tile loads of rows straddling
// cache lines ran the bf16 unit's forward up to 1.8x slower, in some processes and not others
// (benchmarks/results/HISTORY.md).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

namespace fasthg {

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, static_cast<size_t>(round_up(static_cast<int64_t>(n * sizeof(T)), 64)));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
template <typename T>
using Buffer = std::vector<T, Aligned64<T>>;

// Aligned64 that leaves a new vector's elements unset (no zero fill): for scratch that a
// kernel writes before it reads, where the fill was a measurable share of a small call.
template <typename T>
struct Aligned64Unset : Aligned64<T> {
  template <typename U>
  struct rebind {
    using other = Aligned64Unset<U>;
  };
  Aligned64Unset() = default;
  template <typename U>
  Aligned64Unset(const Aligned64Unset<U>&) {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Scratch = std::vector<T, Aligned64Unset<T>>;

// The threads' partial sums of n values (an empty one: a thread that had no work) added into
// the first in thread order, which is returned (null if every one is empty).
template <typename Vec>
typename Vec::value_type* sum_into_first(std::vector<Vec>& parts, int64_t n) {
  using T = typename Vec::value_type;
  T* total = nullptr;
  for (auto& part : parts) {
    if (part.empty()) continue;
    if (!total) {
      total = part.data();
      continue;
    }
    const T* __restrict p = part.data();
    T* __restrict t = total;
    for (int64_t i = 0; i < n; ++i) t[i] += p[i];
  }
  return total;
}

}  // namespace fasthg
