// CUDA KL and Jensen-Shannon divergences between count tables, per row, in
// float64 with pseudo-count smoothing (the math of divergence_cpu.cpp). A warp
// handles a row of up to a few thousand bins, a whole block a longer one; the
// partial sums are combined in a fixed tree, so results are reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "selfheal/checks.h"
#include "selfheal/ops.h"

namespace selfheal {
namespace {

enum class Divergence { kKL, kJS };

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
// Rows this long or longer get a block each; shorter rows get a warp each.
constexpr int64_t kBlockRowBins = 2048;
constexpr int64_t kMaxBlocks = 65535;

// Sum of one value per thread of a row group (a warp, or the whole block),
// returned to every thread of the group. The tree is fixed, so the result
// does not depend on scheduling.
template <int kGroupThreads>
__device__ __forceinline__ double group_sum(double value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if constexpr (kGroupThreads == kWarpSize) {
    return __shfl_sync(0xffffffffu, value, 0);
  } else {
    constexpr int kWarps = kGroupThreads / kWarpSize;
    __shared__ double warp_sums[kWarps];
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    if (lane == 0) warp_sums[warp] = value;
    __syncthreads();
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    // warp_sums is reused by the next call.
    __syncthreads();
    return total;
  }
}

template <typename count_t, int kGroupThreads>
__global__ void __launch_bounds__(kBlockThreads)
    divergence_kernel(const count_t* __restrict__ p_counts,
                      const count_t* __restrict__ q_counts, int64_t rows,
                      int64_t bins, double pseudo_count, Divergence kind,
                      float* __restrict__ out) {
  constexpr int kRowsPerBlock = kBlockThreads / kGroupThreads;
  const int lane = threadIdx.x % kGroupThreads;
  const int group = threadIdx.x / kGroupThreads;
  // Every thread of a group walks the same rows, so the group reductions
  // inside the loop are reached by all of them.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + group;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const count_t* p = p_counts + row * bins;
    const count_t* q = q_counts + row * bins;
    double p_sum = 0.0;
    double q_sum = 0.0;
    for (int64_t b = lane; b < bins; b += kGroupThreads) {
      const double pv = static_cast<double>(p[b]);
      const double qv = static_cast<double>(q[b]);
      CUDA_KERNEL_ASSERT(::isfinite(pv) && pv >= 0.0 && ::isfinite(qv) &&
                         qv >= 0.0);
      p_sum += pv + pseudo_count;
      q_sum += qv + pseudo_count;
    }
    const double p_total = group_sum<kGroupThreads>(p_sum);
    const double q_total = group_sum<kGroupThreads>(q_sum);
    // A row whose smoothed total overflows float64 is refused, like the CPU
    // kernel's TORCH_CHECK (pseudo_count * bins is checked on the host).
    CUDA_KERNEL_ASSERT(::isfinite(p_total) && ::isfinite(q_total));
    // An empty row (no counts, no pseudo-count) has nothing to compare.
    const bool empty = p_total <= 0.0 || q_total <= 0.0;
    // log(pp / qq) = log(p + c) - log(q + c) + log(q_total / p_total): finite
    // even where pp or qq underflows to 0.
    const double log_total_ratio = empty ? 0.0 : log(q_total) - log(p_total);
    double partial = 0.0;
    if (!empty) {
      for (int64_t b = lane; b < bins; b += kGroupThreads) {
        const double p_smoothed = static_cast<double>(p[b]) + pseudo_count;
        const double q_smoothed = static_cast<double>(q[b]) + pseudo_count;
        const double pp = p_smoothed / p_total;
        const double qq = q_smoothed / q_total;
        if (kind == Divergence::kKL) {
          if (pp > 0.0) {
            partial += pp * (log(p_smoothed) - log(q_smoothed) + log_total_ratio);
          }
        } else {
          const double mm = 0.5 * (pp + qq);
          if (pp > 0.0) partial += 0.5 * pp * (log(pp) - log(mm));
          if (qq > 0.0) partial += 0.5 * qq * (log(qq) - log(mm));
        }
      }
    }
    const double total = group_sum<kGroupThreads>(partial);
    if (lane == 0) {
      const double value =
          empty ? 0.0 : (kind == Divergence::kJS ? fmax(total, 0.0) : total);
      out[row] = static_cast<float>(value);
    }
  }
}

template <typename count_t, int kGroupThreads>
void launch_divergence(const at::Tensor& p, const at::Tensor& q,
                       double pseudo_count, Divergence kind, at::Tensor& out) {
  const int64_t rows = p.size(0);
  const int64_t bins = p.size(1);
  constexpr int64_t kRowsPerBlock = kBlockThreads / kGroupThreads;
  const int64_t blocks =
      std::min(kMaxBlocks, (rows + kRowsPerBlock - 1) / kRowsPerBlock);
  divergence_kernel<count_t, kGroupThreads>
      <<<static_cast<unsigned int>(blocks), kBlockThreads, 0,
         at::cuda::getCurrentCUDAStream()>>>(
          p.data_ptr<count_t>(), q.data_ptr<count_t>(), rows, bins,
          pseudo_count, kind, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor divergence_cuda(const at::Tensor& p_counts, const at::Tensor& q_counts,
                           double pseudo_count, Divergence kind) {
  check_divergence(p_counts, q_counts, pseudo_count, kind == Divergence::kJS);
  const c10::cuda::CUDAGuard guard(p_counts.device());
  const at::Tensor p = p_counts.contiguous();
  const at::Tensor q = q_counts.contiguous();
  at::Tensor out = at::empty({p.size(0)}, p.options().dtype(at::kFloat));
  if (p.size(0) == 0) return out;
  const bool block_per_row = p.size(1) >= kBlockRowBins;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kLong, p.scalar_type(), "divergence_cuda", [&] {
    if (block_per_row) {
      launch_divergence<scalar_t, kBlockThreads>(p, q, pseudo_count, kind, out);
    } else {
      launch_divergence<scalar_t, kWarpSize>(p, q, pseudo_count, kind, out);
    }
  });
  return out;
}

}  // namespace

at::Tensor kl_divergence_cuda(const at::Tensor& p_counts,
                              const at::Tensor& q_counts, double pseudo_count) {
  return divergence_cuda(p_counts, q_counts, pseudo_count, Divergence::kKL);
}

at::Tensor js_divergence_cuda(const at::Tensor& p_counts,
                              const at::Tensor& q_counts, double pseudo_count) {
  return divergence_cuda(p_counts, q_counts, pseudo_count, Divergence::kJS);
}

}  // namespace selfheal
