// CUDA softmax entropy. Each row is read once: every thread keeps the running
// maximum m, S = sum exp(z - m) and T = sum exp(z - m) * (z - m) of the values
// it visits (rescaled when its maximum grows), and the states of a row's
// threads are merged in a fixed tree. Then
//   logsumexp = m + log S,  entropy = log S - T / S,  max_prob = 1 / S.
// A warp handles a row of fewer than kBlockRowClasses classes, a whole block a
// longer one. The backward pass reads the row twice: once for the first
// argmax, once to write the gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "selfheal/checks.h"
#include "selfheal/dispatch.h"
#include "selfheal/ops.h"

namespace selfheal {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int64_t kBlockRowClasses = 2048;
constexpr int64_t kMaxBlocks = 65536;
constexpr int64_t kRowsPerWarpBlock = kThreads / kWarpSize;
// exp(-87) is about 1.6e-38, still a normal float: the CPU kernels clamp
// exponents here, and so do these, so both count far-away logits the same.
constexpr float kExpFloor = -87.0f;
constexpr float kInfinity = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// 16-byte aligned group of values, for one wide load or store.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t values[kSize];
};

// Calls visit(j, z) for the values z = row[j] that thread `lane` of a group of
// kGroupThreads owns, in increasing j. With `vectorized`, row is 16-byte
// aligned and whole packs are read at once.
template <typename scalar_t, int kGroupThreads, typename Visit>
__device__ __forceinline__ void for_each_in_row(const scalar_t* row,
                                                int64_t classes, int lane,
                                                bool vectorized, Visit&& visit) {
  constexpr int kPack = Pack<scalar_t>::kSize;
  int64_t tail_begin = 0;
  if (vectorized) {
    const int64_t packs = classes / kPack;
    const auto* packed = reinterpret_cast<const Pack<scalar_t>*>(row);
    for (int64_t i = lane; i < packs; i += kGroupThreads) {
      const Pack<scalar_t> pack = packed[i];
#pragma unroll
      for (int v = 0; v < kPack; ++v) {
        visit(i * kPack + v, static_cast<float>(pack.values[v]));
      }
    }
    tail_begin = packs * kPack;
  }
  for (int64_t j = tail_begin + lane; j < classes; j += kGroupThreads) {
    visit(j, static_cast<float>(row[j]));
  }
}

// out[j] = value(j, in[j]) over the part of a row that thread `lane` owns.
template <typename scalar_t, int kGroupThreads, typename Value>
__device__ __forceinline__ void transform_row(const scalar_t* in, scalar_t* out,
                                              int64_t classes, int lane,
                                              bool vectorized, Value&& value) {
  constexpr int kPack = Pack<scalar_t>::kSize;
  int64_t tail_begin = 0;
  if (vectorized) {
    const int64_t packs = classes / kPack;
    const auto* packed_in = reinterpret_cast<const Pack<scalar_t>*>(in);
    auto* packed_out = reinterpret_cast<Pack<scalar_t>*>(out);
    for (int64_t i = lane; i < packs; i += kGroupThreads) {
      const Pack<scalar_t> pack = packed_in[i];
      Pack<scalar_t> result;
#pragma unroll
      for (int v = 0; v < kPack; ++v) {
        result.values[v] = static_cast<scalar_t>(
            value(i * kPack + v, static_cast<float>(pack.values[v])));
      }
      packed_out[i] = result;
    }
    tail_begin = packs * kPack;
  }
  for (int64_t j = tail_begin + lane; j < classes; j += kGroupThreads) {
    out[j] = static_cast<scalar_t>(value(j, static_cast<float>(in[j])));
  }
}

__device__ __forceinline__ float clamp_exponent(float d) {
  // Written like std::max(d, kExpFloor) on the CPU: a NaN stays NaN.
  return d < kExpFloor ? kExpFloor : d;
}

// Running softmax statistics of the values seen so far; sum == 0 means no
// finite value yet.
struct EntropyState {
  float max;
  float sum;       // S
  float weighted;  // T
};

// Adds one value that is finite or -inf.
__device__ __forceinline__ void accumulate(EntropyState& state, float z) {
  if (z > state.max) {
    if (state.sum > 0.f) {
      // delta < 0, -inf when the maxima are more than FLT_MAX apart: the
      // old terms then weigh exactly 0 (0 * inf would be NaN).
      const float delta = state.max - z;
      const float factor = expf(delta);
      state.weighted = factor > 0.f ? factor * (state.weighted + delta * state.sum) : 0.f;
      state.sum *= factor;
    }
    state.max = z;
  }
  // Only -inf so far: nothing to add, and z - max would be NaN.
  if (state.max == -kInfinity) return;
  const float d = clamp_exponent(z - state.max);
  const float e = expf(d);
  state.sum += e;
  state.weighted += e * d;
}

__device__ __forceinline__ EntropyState merge(const EntropyState& a,
                                              const EntropyState& b) {
  if (b.sum == 0.f) return a;
  if (a.sum == 0.f) return b;
  const float max = fmaxf(a.max, b.max);
  const float delta_a = a.max - max;
  const float delta_b = b.max - max;
  const float factor_a = expf(delta_a);
  const float factor_b = expf(delta_b);
  // A factor of 0 (maxima more than FLT_MAX apart) drops that side's terms
  // instead of multiplying 0 by inf.
  const float weighted_a = factor_a > 0.f ? factor_a * (a.weighted + delta_a * a.sum) : 0.f;
  const float weighted_b = factor_b > 0.f ? factor_b * (b.weighted + delta_b * b.sum) : 0.f;
  return {max, factor_a * a.sum + factor_b * b.sum, weighted_a + weighted_b};
}

__device__ __forceinline__ EntropyState shuffle_down(const EntropyState& state,
                                                     int offset) {
  return {__shfl_down_sync(kFullMask, state.max, offset),
          __shfl_down_sync(kFullMask, state.sum, offset),
          __shfl_down_sync(kFullMask, state.weighted, offset)};
}

template <typename scalar_t, int kGroupThreads>
__global__ void __launch_bounds__(kThreads) softmax_entropy_kernel(
    const scalar_t* __restrict__ logits, int64_t rows, int64_t classes,
    int64_t row_stride, bool vectorized, float* __restrict__ entropy,
    float* __restrict__ max_prob, float* __restrict__ logsumexp) {
  constexpr int kRowsPerBlock = kThreads / kGroupThreads;
  constexpr int kWarpsPerGroup = kGroupThreads / kWarpSize;
  __shared__ EntropyState warp_states[kWarpsPerGroup];
  __shared__ bool warp_invalid[kWarpsPerGroup];
  const int lane = threadIdx.x % kGroupThreads;
  const int group = threadIdx.x / kGroupThreads;
  // All threads of a group walk the same rows, so every shuffle and barrier
  // below is reached by the whole group.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + group;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    EntropyState state{-kInfinity, 0.f, 0.f};
    bool invalid = false;  // NaN or +inf: the softmax is undefined
    for_each_in_row<scalar_t, kGroupThreads>(
        logits + row * row_stride, classes, lane, vectorized,
        [&](int64_t, float z) {
          if (z < kInfinity) {
            accumulate(state, z);
          } else {
            invalid = true;
          }
        });
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      state = merge(state, shuffle_down(state, offset));
    }
    invalid = __any_sync(kFullMask, invalid);
    if constexpr (kWarpsPerGroup > 1) {
      const int warp = lane / kWarpSize;
      if (lane % kWarpSize == 0) {
        warp_states[warp] = state;
        warp_invalid[warp] = invalid;
      }
      __syncthreads();
      if (lane == 0) {
        for (int w = 1; w < kWarpsPerGroup; ++w) {
          state = merge(state, warp_states[w]);
          invalid = invalid || warp_invalid[w];
        }
      }
      // warp_states is rewritten for the next row.
      __syncthreads();
    }
    if (lane == 0) {
      if (invalid || state.sum == 0.f) {
        // NaN or +inf logits, or a row of -inf.
        entropy[row] = kNaN;
        max_prob[row] = kNaN;
        logsumexp[row] = kNaN;
      } else {
        const float log_sum = logf(state.sum);
        logsumexp[row] = state.max + log_sum;
        entropy[row] = fmaxf(0.f, log_sum - state.weighted / state.sum);
        max_prob[row] = 1.f / state.sum;
      }
    }
  }
}

// First position of the largest value; NaN never wins. index == classes
// means the row had no value other than NaN.
struct ArgMax {
  float value;
  int64_t index;
};

__device__ __forceinline__ ArgMax better(const ArgMax& a, const ArgMax& b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

template <typename scalar_t, int kGroupThreads>
__global__ void __launch_bounds__(kThreads) softmax_entropy_backward_kernel(
    const scalar_t* __restrict__ logits, int64_t rows, int64_t classes,
    int64_t row_stride, bool vectorized, const float* __restrict__ grad_entropy,
    const float* __restrict__ grad_max_prob, const float* __restrict__ entropy,
    const float* __restrict__ logsumexp, scalar_t* __restrict__ grad) {
  constexpr int kRowsPerBlock = kThreads / kGroupThreads;
  constexpr int kWarpsPerGroup = kGroupThreads / kWarpSize;
  __shared__ ArgMax warp_best[kWarpsPerGroup];
  const int lane = threadIdx.x % kGroupThreads;
  const int group = threadIdx.x / kGroupThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + group;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const scalar_t* z = logits + row * row_stride;
    ArgMax best{-kInfinity, classes};
    for_each_in_row<scalar_t, kGroupThreads>(
        z, classes, lane, vectorized,
        [&](int64_t j, float value) { best = better(best, ArgMax{value, j}); });
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const ArgMax other{__shfl_down_sync(kFullMask, best.value, offset),
                         __shfl_down_sync(kFullMask, best.index, offset)};
      best = better(best, other);
    }
    best = {__shfl_sync(kFullMask, best.value, 0),
            __shfl_sync(kFullMask, best.index, 0)};
    if constexpr (kWarpsPerGroup > 1) {
      if (lane % kWarpSize == 0) warp_best[lane / kWarpSize] = best;
      __syncthreads();
      best = warp_best[0];
      for (int w = 1; w < kWarpsPerGroup; ++w) best = better(best, warp_best[w]);
      // warp_best is rewritten for the next row.
      __syncthreads();
    }

    const float lse = logsumexp[row];
    const float row_entropy = entropy[row];
    const float ge = grad_entropy[row];
    const float gm = grad_max_prob[row];
    const float p_max = expf(best.value - lse);
    // From entropy: -p (log p + H); from max_prob: p_max (onehot(argmax) - p).
    transform_row<scalar_t, kGroupThreads>(
        z, grad + row * classes, classes, lane, vectorized,
        [&](int64_t j, float value) {
          const float d = clamp_exponent(value - lse);
          const float p = expf(d);
          float g = -ge * p * (d + row_entropy) - gm * p_max * p;
          if (j == best.index) g += gm * p_max;
          return g;
        });
  }
}

bool is_aligned(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0;
}

unsigned int launch_blocks(int64_t rows, int64_t rows_per_block) {
  return static_cast<unsigned int>(
      std::min(kMaxBlocks, (rows + rows_per_block - 1) / rows_per_block));
}

// Logits with unit class stride, as they are or made so.
at::Tensor with_unit_class_stride(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_entropy_cuda(
    const at::Tensor& logits) {
  check_softmax_entropy(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = with_unit_class_stride(logits);
  const int64_t rows = z.size(0);
  const int64_t classes = z.size(1);
  const int64_t row_stride = z.stride(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor entropy = at::empty({rows}, f32);
  at::Tensor max_prob = at::empty({rows}, f32);
  at::Tensor lse = at::empty({rows}, f32);
  if (rows == 0) return {entropy, max_prob, lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      z.scalar_type(), "softmax_entropy_cuda", [&] {
        const scalar_t* data = z.data_ptr<scalar_t>();
        const bool vectorized =
            is_aligned(data) && row_stride % Pack<scalar_t>::kSize == 0;
        if (classes >= kBlockRowClasses) {
          softmax_entropy_kernel<scalar_t, kThreads>
              <<<launch_blocks(rows, 1), kThreads, 0, stream>>>(
                  data, rows, classes, row_stride, vectorized,
                  entropy.data_ptr<float>(), max_prob.data_ptr<float>(),
                  lse.data_ptr<float>());
        } else {
          softmax_entropy_kernel<scalar_t, kWarpSize>
              <<<launch_blocks(rows, kRowsPerWarpBlock), kThreads, 0, stream>>>(
                  data, rows, classes, row_stride, vectorized,
                  entropy.data_ptr<float>(), max_prob.data_ptr<float>(),
                  lse.data_ptr<float>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {entropy, max_prob, lse};
}

at::Tensor softmax_entropy_backward_cuda(const at::Tensor& grad_entropy,
                                         const at::Tensor& grad_max_prob,
                                         const at::Tensor& logits,
                                         const at::Tensor& entropy,
                                         const at::Tensor& logsumexp) {
  check_softmax_entropy_backward(grad_entropy, grad_max_prob, logits, entropy,
                                 logsumexp);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = with_unit_class_stride(logits);
  const int64_t rows = z.size(0);
  const int64_t classes = z.size(1);
  const int64_t row_stride = z.stride(0);
  at::Tensor grad = at::empty({rows, classes}, logits.options());
  if (rows == 0) return grad;
  const at::Tensor ge = grad_entropy.contiguous();
  const at::Tensor gm = grad_max_prob.contiguous();
  const at::Tensor h = entropy.contiguous();
  const at::Tensor l = logsumexp.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      z.scalar_type(), "softmax_entropy_backward_cuda", [&] {
        const scalar_t* data = z.data_ptr<scalar_t>();
        scalar_t* out = grad.data_ptr<scalar_t>();
        constexpr int64_t kPack = Pack<scalar_t>::kSize;
        const bool vectorized = is_aligned(data) && is_aligned(out) &&
                                row_stride % kPack == 0 && classes % kPack == 0;
        if (classes >= kBlockRowClasses) {
          softmax_entropy_backward_kernel<scalar_t, kThreads>
              <<<launch_blocks(rows, 1), kThreads, 0, stream>>>(
                  data, rows, classes, row_stride, vectorized,
                  ge.data_ptr<float>(), gm.data_ptr<float>(),
                  h.data_ptr<float>(), l.data_ptr<float>(), out);
        } else {
          softmax_entropy_backward_kernel<scalar_t, kWarpSize>
              <<<launch_blocks(rows, kRowsPerWarpBlock), kThreads, 0, stream>>>(
                  data, rows, classes, row_stride, vectorized,
                  ge.data_ptr<float>(), gm.data_ptr<float>(),
                  h.data_ptr<float>(), l.data_ptr<float>(), out);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

}  // namespace selfheal
