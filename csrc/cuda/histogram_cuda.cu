// CUDA histogram update. Each block counts a tile of features over a range of
// rows into a private table in shared memory, then adds the non-zero entries
// to the global int64 counts with integer atomics: the result is exact and
// does not depend on the order in which blocks run. Tables too large for
// shared memory fall back to integer atomics on the global counts directly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "selfheal/checks.h"
#include "selfheal/dispatch.h"
#include "selfheal/histogram_bin.h"
#include "selfheal/ops.h"

namespace selfheal {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTileFeatures = 32;
// Fewer rows per block would spend more time clearing and flushing the table
// than counting.
constexpr int64_t kMinRowsPerBlock = 64;
// Keeps every shared 32-bit counter below 2^32: a block adds at most one
// value per row to any counter.
constexpr int64_t kMaxRowsPerBlock = int64_t{1} << 30;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kBlocksPerSm = 4;
constexpr int64_t kMaxFallbackBlocks = 4096;

using Counter = unsigned long long;
static_assert(sizeof(Counter) == sizeof(int64_t),
              "int64 counts are updated through 64-bit unsigned atomics");

template <typename scalar_t>
__device__ __forceinline__ void count_shared(scalar_t raw, double lo, double hi,
                                             int64_t bins, unsigned int* row,
                                             unsigned int* nonfinite) {
  const float value = static_cast<float>(raw);
  if (!::isfinite(value)) {
    atomicAdd(nonfinite, 1u);
    return;
  }
  atomicAdd(row + histogram_column(value, lo, hi, bins), 1u);
}

// Block (blockIdx.x, blockIdx.y) counts features
// [blockIdx.x * kTileFeatures, + kTileFeatures) over rows
// [blockIdx.y * rows_per_block, + rows_per_block). kRowsFast picks which index
// the 32 lanes of a warp walk, so that their loads are adjacent in memory.
template <typename scalar_t, bool kRowsFast>
__global__ void __launch_bounds__(kThreads) histogram_shared_kernel(
    const scalar_t* __restrict__ x, int64_t rows, int64_t features,
    int64_t row_stride, int64_t feature_stride, const float* __restrict__ lo,
    const float* __restrict__ hi, int64_t width, int64_t rows_per_block,
    Counter* __restrict__ counts, Counter* __restrict__ nonfinite) {
  extern __shared__ unsigned int shared_counts[];
  const int64_t table_size = kTileFeatures * width;
  unsigned int* table = shared_counts;
  unsigned int* table_nonfinite = shared_counts + table_size;
  for (int64_t i = threadIdx.x; i < table_size + kTileFeatures; i += kThreads) {
    shared_counts[i] = 0u;
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t bins = width - 2;
  const int64_t first_feature = static_cast<int64_t>(blockIdx.x) * kTileFeatures;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = min(rows, row_begin + rows_per_block);

  if constexpr (kRowsFast) {
    for (int local = warp; local < kTileFeatures; local += kWarps) {
      const int64_t f = first_feature + local;
      if (f >= features) break;
      const double lo_f = lo[f];
      const double hi_f = hi[f];
      const scalar_t* column = x + f * feature_stride;
      for (int64_t n = row_begin + lane; n < row_end; n += kWarpSize) {
        count_shared(column[n * row_stride], lo_f, hi_f, bins,
                     table + local * width, table_nonfinite + local);
      }
    }
  } else {
    const int local = lane;
    const int64_t f = first_feature + local;
    if (f < features) {
      const double lo_f = lo[f];
      const double hi_f = hi[f];
      const scalar_t* column = x + f * feature_stride;
      for (int64_t n = row_begin + warp; n < row_end; n += kWarps) {
        count_shared(column[n * row_stride], lo_f, hi_f, bins,
                     table + local * width, table_nonfinite + local);
      }
    }
  }
  __syncthreads();

  // counts rows are contiguous, so the tile's rows form one contiguous run.
  const int64_t features_here =
      min(static_cast<int64_t>(kTileFeatures), features - first_feature);
  Counter* counts_tile = counts + first_feature * width;
  for (int64_t i = threadIdx.x; i < features_here * width; i += kThreads) {
    const unsigned int value = table[i];
    if (value != 0u) atomicAdd(counts_tile + i, static_cast<Counter>(value));
  }
  for (int64_t i = threadIdx.x; i < features_here; i += kThreads) {
    const unsigned int value = table_nonfinite[i];
    if (value != 0u) {
      atomicAdd(nonfinite + first_feature + i, static_cast<Counter>(value));
    }
  }
}

// One thread per value, atomics straight on the global counts; used when a
// tile's table does not fit in shared memory.
template <typename scalar_t, bool kRowsFast>
__global__ void __launch_bounds__(kThreads) histogram_global_kernel(
    const scalar_t* __restrict__ x, int64_t rows, int64_t features,
    int64_t row_stride, int64_t feature_stride, const float* __restrict__ lo,
    const float* __restrict__ hi, int64_t width, Counter* __restrict__ counts,
    Counter* __restrict__ nonfinite) {
  const int64_t total = rows * features;
  const int64_t bins = width - 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       i < total; i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t n = kRowsFast ? i % rows : i / features;
    const int64_t f = kRowsFast ? i / rows : i % features;
    const float value = static_cast<float>(x[n * row_stride + f * feature_stride]);
    if (!::isfinite(value)) {
      atomicAdd(nonfinite + f, Counter{1});
      continue;
    }
    atomicAdd(counts + f * width + histogram_column(value, lo[f], hi[f], bins),
              Counter{1});
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, bool kRowsFast>
void launch_histogram(at::Tensor& counts, at::Tensor& nonfinite,
                      const at::Tensor& x, const at::Tensor& lo,
                      const at::Tensor& hi) {
  const int64_t rows = x.size(0);
  const int64_t features = x.size(1);
  const int64_t width = counts.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  Counter* counts_data = reinterpret_cast<Counter*>(counts.data_ptr<int64_t>());
  Counter* nonfinite_data = reinterpret_cast<Counter*>(nonfinite.data_ptr<int64_t>());

  const int64_t shared_bytes = (kTileFeatures * width + kTileFeatures) *
                               static_cast<int64_t>(sizeof(unsigned int));
  if (shared_bytes <= static_cast<int64_t>(props->sharedMemPerBlockOptin)) {
    const auto kernel = histogram_shared_kernel<scalar_t, kRowsFast>;
    if (shared_bytes > static_cast<int64_t>(props->sharedMemPerBlock)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
          static_cast<int>(shared_bytes)));
    }
    const int64_t feature_tiles = ceil_div(features, kTileFeatures);
    const int64_t target_blocks = kBlocksPerSm * props->multiProcessorCount;
    int64_t splits = std::clamp<int64_t>(ceil_div(target_blocks, feature_tiles), 1,
                                         ceil_div(rows, kMinRowsPerBlock));
    int64_t rows_per_block = ceil_div(rows, splits);
    rows_per_block = std::max(rows_per_block, ceil_div(rows, kMaxGridY));
    TORCH_CHECK(rows_per_block <= kMaxRowsPerBlock,
                "selfheal: argument 'x' must have at most ",
                kMaxGridY * kMaxRowsPerBlock, " rows, got ", rows);
    splits = ceil_div(rows, rows_per_block);
    const dim3 grid(static_cast<unsigned int>(feature_tiles),
                    static_cast<unsigned int>(splits));
    kernel<<<grid, kThreads, static_cast<size_t>(shared_bytes), stream>>>(
        x_data, rows, features, x.stride(0), x.stride(1), lo.data_ptr<float>(),
        hi.data_ptr<float>(), width, rows_per_block, counts_data, nonfinite_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t blocks =
        std::min(kMaxFallbackBlocks, ceil_div(rows * features, kThreads));
    histogram_global_kernel<scalar_t, kRowsFast>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
            x_data, rows, features, x.stride(0), x.stride(1),
            lo.data_ptr<float>(), hi.data_ptr<float>(), width, counts_data,
            nonfinite_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void histogram_update_cuda(at::Tensor& counts, at::Tensor& nonfinite,
                           const at::Tensor& x, const at::Tensor& lo,
                           const at::Tensor& hi) {
  check_histogram_update(counts, nonfinite, x, lo, hi);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t features = x.size(1);
  if (rows == 0 || features == 0) return;
  const at::Tensor lo_c = lo.contiguous();
  const at::Tensor hi_c = hi.contiguous();
  // Lanes of a warp walk rows when x is column-major, or when there are too
  // few features to fill a warp; otherwise they walk features.
  const bool rows_fast =
      features < kWarpSize / 2 || x.stride(0) < x.stride(1);
  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      x.scalar_type(), "histogram_update_cuda", [&] {
        if (rows_fast) {
          launch_histogram<scalar_t, true>(counts, nonfinite, x, lo_c, hi_c);
        } else {
          launch_histogram<scalar_t, false>(counts, nonfinite, x, lo_c, hi_c);
        }
      });
}

// The count sketch as two ATen kernels (float64 accumulation in input order
// within each bucket, as the CPU kernel and reference.sketch compute it), then
// the fused histogram. Bucket values out of [0, F) trip index_add_'s device
// assert rather than a host check, which would need a synchronisation.
void sketch_histogram_update_cuda(at::Tensor& counts, at::Tensor& nonfinite,
                                  const at::Tensor& x, const at::Tensor& bucket,
                                  const at::Tensor& weight,
                                  const at::Tensor& lo, const at::Tensor& hi) {
  check_sketch_histogram_update(counts, nonfinite, x, bucket, weight, lo, hi);
  SELFHEAL_NO_AUTOCAST;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor sketch =
      at::zeros({x.size(0), counts.size(0)}, x.options().dtype(at::kDouble))
          .index_add_(1, bucket, x.to(at::kFloat).to(at::kDouble) * weight.to(at::kDouble))
          .to(at::kFloat);
  histogram_update_cuda(counts, nonfinite, sketch, lo, hi);
}

}  // namespace selfheal
