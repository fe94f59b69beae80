// Equal shares of rows for the threads of an at::parallel_for, in cache-sized tiles.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "aligned_buffer.h"

namespace fasthg {

// The tiles of rows_total rows: each thread's share (parallel_for over count() hands thread p
// the tiles [p k, (p + 1) k)) equal to within `multiple` rows, in k tiles of at most about
// max_rows, a multiple of `multiple` but each share's last. (One run of equal tiles over all
// rows left a short tile at the end: 4x32x32 split 2112/1984 rows between two threads.)
struct Tiles {
  int64_t total, share, k, rows;  // rows: a tile's most
  Tiles(int64_t rows_total, int64_t multiple, int64_t max_rows)
      : total(rows_total), share(round_up((rows_total + at::get_num_threads() - 1) / at::get_num_threads(), multiple)),
        k(std::max<int64_t>(1, (share + max_rows - 1) / max_rows)), rows(round_up((share + k - 1) / k, multiple)) {}
  int64_t count() const { return k * at::get_num_threads(); }
  // Tile t's first row and its rows (none: past the end).
  int64_t first(int64_t t) const { return t / k * share + t % k * rows; }
  int64_t size(int64_t t) const {
    const int64_t m0 = first(t), end = std::min(total, (t / k + 1) * share);
    return std::max<int64_t>(0, std::min(m0 + rows, end) - m0);
  }
};

}  // namespace fasthg
