// 64-byte aligned vectors for the AMX kernels' tiles and packed operands (conv1x1.cpp,
// conv2d.cpp): with malloc's 16-byte alignment, AMX tile loads of rows straddling
// cache lines ran the bf16 unit's forward up to 1.8x slower, in some processes and not others
// (benchmarks/results/HISTORY.md).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
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

}  // namespace fasthg
