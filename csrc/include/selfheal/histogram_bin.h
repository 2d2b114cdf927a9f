// The bin rule of histogram_update_, shared by the CPU and CUDA kernels and
// mirrored by reference.histogram_bin_index.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SELFHEAL_BIN_FN __host__ __device__ __forceinline__
#else
#define SELFHEAL_BIN_FN inline
#endif

namespace selfheal {

// Column of counts[f] that finite value x falls in: 0 underflow (x < lo),
// bins + 1 overflow (x >= hi), otherwise 1 + floor((x - lo) * bins / (hi - lo))
// evaluated in float64. For float32 inputs x - lo and the product are exact,
// so a value exactly on an edge lo + k (hi - lo) / bins lands in bin k.
SELFHEAL_BIN_FN int64_t histogram_column(double x, double lo, double hi,
                                          int64_t bins) {
  if (x < lo) return 0;
  if (x >= hi) return bins + 1;
  const double position = (x - lo) * static_cast<double>(bins) / (hi - lo);
  // NaN (from NaN edges) and rounding at the top edge both end up in range.
  if (!(position >= 0.0)) return 1;
  if (position >= static_cast<double>(bins - 1)) return bins;
  return 1 + static_cast<int64_t>(position);
}

}  // namespace selfheal
