// CUDA adapter forward and backward, built from three tiled kernels:
//   reduce_channels   out[m, k] = sum_c input(m, c) * W(k, c)
//                     (forward: hidden = x D^T + b; backward: the grad of
//                     hidden, (grad_y diag(scale) U) * act'(hidden))
//   expand_channels   out(m, c) = base(m, c) + scale[c] * sum_k P[m, k] W(c, k)
//                     + shift[c] (forward: y; backward: grad_x from grad_h D)
//   reduce_positions  R[k, c] = sum_m P[m, k] * input(m, c)
//                     (grad of D from grad_h and x; G from act(hidden) and grad_y)
// x, base, y and grad_y are [n_outer, C, spatial] tensors; position m is
// (n, s) = (m / spatial, m % spatial). With spatial > 1 consecutive positions
// are adjacent in memory, with spatial == 1 (channels-last) consecutive
// channels are, and every kernel has a variant whose loads and stores walk the
// adjacent index. Weights are read in fp32 through (rank, channel) strides, so
// one kernel serves both a matrix and its transpose. The position reduction
// writes one partial sum per fixed slice of positions and adds the slices in
// order; no float atomics are used, so results are bit-reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "selfheal/activation.h"
#include "selfheal/checks.h"
#include "selfheal/dispatch.h"
#include "selfheal/ops.h"

namespace selfheal {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

// reduce_channels: a block owns kReducePositions positions x kRankTile ranks
// and walks the channels kChannelStep at a time. Every block reads all of its
// ranks of W, so the more positions a block owns, the less weight traffic per
// input element.
constexpr int kReducePositions = 128;
constexpr int kChannelStep = 32;

// expand_channels: a block owns kExpandTile positions x kExpandTile channels
// and walks the ranks kRankStep at a time.
constexpr int kExpandTile = 64;
constexpr int kRankStep = 16;

// reduce_positions: a block owns kRankTile ranks x kPositionTileChannels
// channels of one slice of positions, kPositionStep positions at a time.
constexpr int kPositionTileChannels = 64;
constexpr int kPositionStep = 32;
// Slices are sized so that about kTargetBlocks blocks run, each with at least
// kMinPositionsPerSlice positions. The slicing depends only on the shapes.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinPositionsPerSlice = 256;

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxSumBlocks = 4096;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Offset of element (m, 0) of a [n_outer, channels, spatial] tensor; channel c
// is c * spatial further on. The channels-last variant has spatial == 1.
template <bool kPositionsContiguous>
__device__ __forceinline__ int64_t position_offset(int64_t m, int64_t channels,
                                                   int64_t spatial) {
  if constexpr (kPositionsContiguous) {
    return (m / spatial) * channels * spatial + m % spatial;
  } else {
    return m * channels;
  }
}

// out[m, k] for kReducePositions positions and kRankTile ranks; W(k, c) is
// weight[k * weight_rank_stride + c * weight_channel_stride]. Epilogue:
//   hidden == nullptr: out = sum + bias[k] (bias optional), the pre-activation;
//   otherwise:         out = sum * act'(hidden[m, k]), the grad of it;
// and, when activated is given, activated[m, k] = act(pre-activation).
template <typename scalar_t, int kRankTile, bool kPositionsContiguous>
__global__ void __launch_bounds__(kThreads) reduce_channels_kernel(
    const scalar_t* __restrict__ input, int64_t positions, int64_t channels,
    int64_t spatial, const float* __restrict__ weight, int64_t weight_rank_stride,
    int64_t weight_channel_stride, int64_t rank, const float* __restrict__ bias,
    const float* __restrict__ hidden, Activation act, float* __restrict__ out,
    float* __restrict__ activated) {
  constexpr int kPositionsPerThread = kReducePositions / 16;
  constexpr int kRanksPerThread = kRankTile / 16;
  constexpr int kInputLoads = kReducePositions * kChannelStep / kThreads;
  constexpr int kWeightLoads = kRankTile * kChannelStep / kThreads;
  // +1 column: the transposing stores hit 32 different banks.
  __shared__ float input_tile[kChannelStep][kReducePositions + 1];
  __shared__ float weight_tile[kChannelStep][kRankTile + 1];

  const int tid = threadIdx.x;
  const int rank_lane = tid % 16;
  const int position_lane = tid / 16;
  const int64_t first_position = static_cast<int64_t>(blockIdx.x) * kReducePositions;
  const int64_t first_rank = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const bool weight_channels_adjacent = weight_channel_stride == 1;

  // With adjacent positions a thread always loads the same position, so its
  // offset is computed once.
  const int own_position = tid % kReducePositions;
  const int64_t own_m = first_position + own_position;
  const bool own_valid = own_m < positions;
  const int64_t own_offset =
      kPositionsContiguous && own_valid
          ? position_offset<true>(own_m, channels, spatial)
          : 0;

  float acc[kPositionsPerThread][kRanksPerThread] = {};
  for (int64_t c0 = 0; c0 < channels; c0 += kChannelStep) {
#pragma unroll
    for (int j = 0; j < kInputLoads; ++j) {
      if constexpr (kPositionsContiguous) {
        const int cl = tid / kReducePositions + j * (kThreads / kReducePositions);
        const int64_t c = c0 + cl;
        input_tile[cl][own_position] =
            own_valid && c < channels
                ? static_cast<float>(input[own_offset + c * spatial])
                : 0.f;
      } else {
        const int cl = tid % kChannelStep;
        const int pl = tid / kChannelStep + j * (kThreads / kChannelStep);
        const int64_t m = first_position + pl;
        const int64_t c = c0 + cl;
        input_tile[cl][pl] = m < positions && c < channels
                                 ? static_cast<float>(input[m * channels + c])
                                 : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < kWeightLoads; ++j) {
      const int i = tid + j * kThreads;
      const int cl = weight_channels_adjacent ? i % kChannelStep : i / kRankTile;
      const int kl = weight_channels_adjacent ? i / kChannelStep : i % kRankTile;
      const int64_t c = c0 + cl;
      const int64_t k = first_rank + kl;
      weight_tile[cl][kl] =
          c < channels && k < rank
              ? weight[k * weight_rank_stride + c * weight_channel_stride]
              : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int step = 0; step < kChannelStep; ++step) {
      float a[kPositionsPerThread];
      float w[kRanksPerThread];
#pragma unroll
      for (int i = 0; i < kPositionsPerThread; ++i) {
        a[i] = input_tile[step][position_lane + 16 * i];
      }
#pragma unroll
      for (int j = 0; j < kRanksPerThread; ++j) {
        w[j] = weight_tile[step][rank_lane + 16 * j];
      }
#pragma unroll
      for (int i = 0; i < kPositionsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kRanksPerThread; ++j) acc[i][j] += a[i] * w[j];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kPositionsPerThread; ++i) {
    const int64_t m = first_position + position_lane + 16 * i;
    if (m >= positions) continue;
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) {
      const int64_t k = first_rank + rank_lane + 16 * j;
      if (k >= rank) continue;
      const int64_t index = m * rank + k;
      if (hidden == nullptr) {
        float value = acc[i][j];
        if (bias != nullptr) value += bias[k];
        out[index] = value;
        if (activated != nullptr) activated[index] = activate(act, value);
      } else {
        const float pre = hidden[index];
        out[index] = acc[i][j] * activate_grad(act, pre);
        if (activated != nullptr) activated[index] = activate(act, pre);
      }
    }
  }
}

// out(m, c) = base(m, c) + channel_scale[c] * sum_k projected[m, k] * W(c, k)
// + channel_shift[c] over kExpandTile positions x kExpandTile channels;
// W(c, k) is weight[c * weight_channel_stride + k * weight_rank_stride] and
// base, channel_scale and channel_shift are optional. The 32 lanes of a warp
// own 32 adjacent elements of out (positions, or channels for channels-last),
// so the stores coalesce.
template <typename scalar_t, bool kPositionsContiguous>
__global__ void __launch_bounds__(kThreads) expand_channels_kernel(
    const float* __restrict__ projected, int64_t positions, int64_t rank,
    const float* __restrict__ weight, int64_t weight_channel_stride,
    int64_t weight_rank_stride, const float* __restrict__ channel_scale,
    const float* __restrict__ channel_shift, const scalar_t* __restrict__ base,
    scalar_t* __restrict__ out, int64_t channels, int64_t spatial) {
  constexpr int kAdjacentPerThread = kExpandTile / kWarpSize;
  constexpr int kOtherPerThread = kExpandTile / kWarps;
  constexpr int kLoads = kRankStep * kExpandTile / kThreads;
  // Both tiles have one shape so either can feed the lanes.
  __shared__ float projected_tile[kRankStep][kExpandTile + 1];
  __shared__ float weight_tile[kRankStep][kExpandTile + 1];

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int64_t first_position = static_cast<int64_t>(blockIdx.x) * kExpandTile;
  const int64_t first_channel = static_cast<int64_t>(blockIdx.y) * kExpandTile;
  const bool weight_ranks_adjacent = weight_rank_stride == 1;

  // acc[a][o]: element lane + 32 a along the adjacent index, warp + 8 o along
  // the other one.
  float acc[kAdjacentPerThread][kOtherPerThread] = {};
  for (int64_t r0 = 0; r0 < rank; r0 += kRankStep) {
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int i = tid + j * kThreads;
      const int kl = i % kRankStep;
      const int pl = i / kRankStep;
      const int64_t m = first_position + pl;
      const int64_t k = r0 + kl;
      projected_tile[kl][pl] =
          m < positions && k < rank ? projected[m * rank + k] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int i = tid + j * kThreads;
      const int kl = weight_ranks_adjacent ? i % kRankStep : i / kExpandTile;
      const int cl = weight_ranks_adjacent ? i / kRankStep : i % kExpandTile;
      const int64_t c = first_channel + cl;
      const int64_t k = r0 + kl;
      weight_tile[kl][cl] =
          c < channels && k < rank
              ? weight[c * weight_channel_stride + k * weight_rank_stride]
              : 0.f;
    }
    __syncthreads();
    const auto& adjacent_tile = kPositionsContiguous ? projected_tile : weight_tile;
    const auto& other_tile = kPositionsContiguous ? weight_tile : projected_tile;
#pragma unroll
    for (int step = 0; step < kRankStep; ++step) {
      float adjacent[kAdjacentPerThread];
      float other[kOtherPerThread];
#pragma unroll
      for (int a = 0; a < kAdjacentPerThread; ++a) {
        adjacent[a] = adjacent_tile[step][lane + kWarpSize * a];
      }
#pragma unroll
      for (int o = 0; o < kOtherPerThread; ++o) {
        other[o] = other_tile[step][warp + kWarps * o];
      }
#pragma unroll
      for (int a = 0; a < kAdjacentPerThread; ++a) {
#pragma unroll
        for (int o = 0; o < kOtherPerThread; ++o) acc[a][o] += adjacent[a] * other[o];
      }
    }
    __syncthreads();
  }

  // Same order of operations as the CPU kernel.
  const auto store = [&](float value, int64_t c, int64_t offset) {
    if (channel_scale != nullptr) value *= channel_scale[c];
    if (channel_shift != nullptr) value += channel_shift[c];
    if (base != nullptr) value += static_cast<float>(base[offset]);
    out[offset] = static_cast<scalar_t>(value);
  };
  if constexpr (kPositionsContiguous) {
#pragma unroll
    for (int a = 0; a < kAdjacentPerThread; ++a) {
      const int64_t m = first_position + lane + kWarpSize * a;
      if (m >= positions) continue;
      const int64_t m_offset = position_offset<true>(m, channels, spatial);
#pragma unroll
      for (int o = 0; o < kOtherPerThread; ++o) {
        const int64_t c = first_channel + warp + kWarps * o;
        if (c < channels) store(acc[a][o], c, m_offset + c * spatial);
      }
    }
  } else {
#pragma unroll
    for (int o = 0; o < kOtherPerThread; ++o) {
      const int64_t m = first_position + warp + kWarps * o;
      if (m >= positions) continue;
#pragma unroll
      for (int a = 0; a < kAdjacentPerThread; ++a) {
        const int64_t c = first_channel + lane + kWarpSize * a;
        if (c < channels) store(acc[a][o], c, m * channels + c);
      }
    }
  }
}

// partial[slice, k, c] = sum over the positions m of the slice of
// projected[m, k] * input(m, c), for kRankTile ranks x kPositionTileChannels
// channels; slice blockIdx.z holds positions
// [blockIdx.z * positions_per_slice, + positions_per_slice).
template <typename scalar_t, int kRankTile, bool kPositionsContiguous>
__global__ void __launch_bounds__(kThreads) reduce_positions_kernel(
    const float* __restrict__ projected, int64_t rank,
    const scalar_t* __restrict__ input, int64_t positions, int64_t channels,
    int64_t spatial, int64_t positions_per_slice, float* __restrict__ partial) {
  constexpr int kRanksPerThread = kRankTile / 16;
  constexpr int kChannelsPerThread = kPositionTileChannels / 16;
  constexpr int kInputLoads = kPositionStep * kPositionTileChannels / kThreads;
  constexpr int kProjectedLoads = kPositionStep * kRankTile / kThreads;
  __shared__ float input_tile[kPositionStep][kPositionTileChannels + 1];
  __shared__ float projected_tile[kPositionStep][kRankTile + 1];

  const int tid = threadIdx.x;
  const int channel_lane = tid % 16;
  const int rank_lane = tid / 16;
  const int64_t first_channel =
      static_cast<int64_t>(blockIdx.x) * kPositionTileChannels;
  const int64_t first_rank = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t slice = blockIdx.z;
  const int64_t slice_begin = slice * positions_per_slice;
  const int64_t slice_end = min(positions, slice_begin + positions_per_slice);

  float acc[kRanksPerThread][kChannelsPerThread] = {};
  for (int64_t p0 = slice_begin; p0 < slice_end; p0 += kPositionStep) {
    if constexpr (kPositionsContiguous) {
      // A thread loads one position of the step at several channels.
      const int pl = tid % kPositionStep;
      const int64_t m = p0 + pl;
      const bool valid = m < slice_end;
      const int64_t m_offset =
          valid ? position_offset<true>(m, channels, spatial) : 0;
#pragma unroll
      for (int j = 0; j < kInputLoads; ++j) {
        const int cl = tid / kPositionStep + j * (kThreads / kPositionStep);
        const int64_t c = first_channel + cl;
        input_tile[pl][cl] = valid && c < channels
                                 ? static_cast<float>(input[m_offset + c * spatial])
                                 : 0.f;
      }
    } else {
      const int cl = tid % kPositionTileChannels;
      const int64_t c = first_channel + cl;
#pragma unroll
      for (int j = 0; j < kInputLoads; ++j) {
        const int pl = tid / kPositionTileChannels +
                       j * (kThreads / kPositionTileChannels);
        const int64_t m = p0 + pl;
        input_tile[pl][cl] = m < slice_end && c < channels
                                 ? static_cast<float>(input[m * channels + c])
                                 : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < kProjectedLoads; ++j) {
      const int i = tid + j * kThreads;
      const int kl = i % kRankTile;
      const int pl = i / kRankTile;
      const int64_t m = p0 + pl;
      const int64_t k = first_rank + kl;
      projected_tile[pl][kl] =
          m < slice_end && k < rank ? projected[m * rank + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int step = 0; step < kPositionStep; ++step) {
      float p[kRanksPerThread];
      float q[kChannelsPerThread];
#pragma unroll
      for (int i = 0; i < kRanksPerThread; ++i) {
        p[i] = projected_tile[step][rank_lane + 16 * i];
      }
#pragma unroll
      for (int j = 0; j < kChannelsPerThread; ++j) {
        q[j] = input_tile[step][channel_lane + 16 * j];
      }
#pragma unroll
      for (int i = 0; i < kRanksPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kChannelsPerThread; ++j) acc[i][j] += p[i] * q[j];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kRanksPerThread; ++i) {
    const int64_t k = first_rank + rank_lane + 16 * i;
    if (k >= rank) continue;
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {
      const int64_t c = first_channel + channel_lane + 16 * j;
      if (c < channels) partial[(slice * rank + k) * channels + c] = acc[i][j];
    }
  }
}

// out[i] = sum over slices s, in order, of partial[s, i].
__global__ void __launch_bounds__(kThreads)
    sum_slices_kernel(const float* __restrict__ partial, int64_t slices,
                      int64_t count, float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float total = 0.f;
    for (int64_t s = 0; s < slices; ++s) total += partial[s * count + i];
    out[i] = total;
  }
}

// Calls fn(std::integral_constant<int, tile>) with the smallest rank tile of
// 16, 32 or 64 that covers rank (64 for larger ranks, in several tiles).
template <typename Fn>
void with_rank_tile(int64_t rank, Fn&& fn) {
  if (rank <= 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (rank <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else {
    fn(std::integral_constant<int, 64>{});
  }
}

template <typename Fn>
void with_layout(const AdapterShape& shape, Fn&& fn) {
  if (shape.spatial > 1) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

unsigned int grid_x(int64_t tiles) {
  TORCH_CHECK(tiles <= kMaxGridX, "selfheal: the CUDA adapter needs ", tiles,
              " blocks along the grid's x dimension, more than its limit of ",
              kMaxGridX);
  return static_cast<unsigned int>(tiles);
}

const float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

at::Tensor float_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// input is a contiguous [n_outer, channels, spatial] tensor; out (and
// activated, when given) are fp32 [positions, rank].
template <typename scalar_t>
void launch_reduce_channels(const at::Tensor& input, int64_t channels,
                            const AdapterShape& shape, const float* weight,
                            int64_t weight_rank_stride,
                            int64_t weight_channel_stride, const float* bias,
                            const float* hidden, Activation act,
                            const at::Tensor& out, float* activated) {
  const int64_t positions = shape.positions();
  const int64_t rank = shape.rank;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_rank_tile(rank, [&](auto rank_tile) {
    constexpr int kRankTile = decltype(rank_tile)::value;
    const dim3 grid(grid_x(ceil_div(positions, kReducePositions)),
                    static_cast<unsigned int>(ceil_div(rank, kRankTile)));
    with_layout(shape, [&](auto layout) {
      constexpr bool kPositionsContiguous = decltype(layout)::value;
      reduce_channels_kernel<scalar_t, kRankTile, kPositionsContiguous>
          <<<grid, kThreads, 0, stream>>>(
              input.data_ptr<scalar_t>(), positions, channels, shape.spatial,
              weight, weight_rank_stride, weight_channel_stride, rank, bias,
              hidden, act, out.data_ptr<float>(), activated);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// out is a contiguous [n_outer, channels, spatial] tensor, base (optional)
// one of the same shape; projected is fp32 [positions, rank].
template <typename scalar_t>
void launch_expand_channels(const at::Tensor& projected, const AdapterShape& shape,
                            const float* weight, int64_t weight_channel_stride,
                            int64_t weight_rank_stride, const float* channel_scale,
                            const float* channel_shift, const scalar_t* base,
                            const at::Tensor& out, int64_t channels) {
  const int64_t channel_tiles = ceil_div(channels, kExpandTile);
  TORCH_CHECK(channel_tiles <= kMaxGridY,
              "selfheal: the CUDA adapter supports at most ",
              kMaxGridY * kExpandTile, " channels, got ", channels);
  const dim3 grid(grid_x(ceil_div(shape.positions(), kExpandTile)),
                  static_cast<unsigned int>(channel_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_layout(shape, [&](auto layout) {
    constexpr bool kPositionsContiguous = decltype(layout)::value;
    expand_channels_kernel<scalar_t, kPositionsContiguous>
        <<<grid, kThreads, 0, stream>>>(
            projected.data_ptr<float>(), shape.positions(), shape.rank, weight,
            weight_channel_stride, weight_rank_stride, channel_scale,
            channel_shift, base, out.data_ptr<scalar_t>(), channels,
            shape.spatial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Returns fp32 [rank, channels]: sum over positions of projected[m, k] *
// input(m, c). input is a contiguous [n_outer, channels, spatial] tensor and
// there is at least one position.
template <typename scalar_t>
at::Tensor launch_reduce_positions(const at::Tensor& projected,
                                   const at::Tensor& input, int64_t channels,
                                   const AdapterShape& shape) {
  const int64_t positions = shape.positions();
  const int64_t rank = shape.rank;
  const auto f32 = input.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor result;
  with_rank_tile(rank, [&](auto rank_tile) {
    constexpr int kRankTile = decltype(rank_tile)::value;
    const int64_t channel_tiles = ceil_div(channels, kPositionTileChannels);
    const int64_t rank_tiles = ceil_div(rank, kRankTile);
    int64_t slices = std::clamp<int64_t>(
        ceil_div(kTargetBlocks, channel_tiles * rank_tiles), 1,
        ceil_div(positions, kMinPositionsPerSlice));
    const int64_t positions_per_slice =
        ceil_div(ceil_div(positions, slices), kPositionStep) * kPositionStep;
    slices = ceil_div(positions, positions_per_slice);
    at::Tensor partial = at::empty({slices, rank, channels}, f32);
    const dim3 grid(grid_x(channel_tiles),
                    static_cast<unsigned int>(rank_tiles),
                    static_cast<unsigned int>(slices));
    with_layout(shape, [&](auto layout) {
      constexpr bool kPositionsContiguous = decltype(layout)::value;
      reduce_positions_kernel<scalar_t, kRankTile, kPositionsContiguous>
          <<<grid, kThreads, 0, stream>>>(
              projected.data_ptr<float>(), rank, input.data_ptr<scalar_t>(),
              positions, channels, shape.spatial, positions_per_slice,
              partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (slices == 1) {
      result = partial.view({rank, channels});
      return;
    }
    result = at::empty({rank, channels}, f32);
    const int64_t count = rank * channels;
    const int64_t blocks = std::min(kMaxSumBlocks, ceil_div(count, kThreads));
    sum_slices_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        partial.data_ptr<float>(), slices, count, result.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adapter_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& base,
    const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, c10::string_view activation,
    bool channels_first) {
  SELFHEAL_NO_AUTOCAST;
  const AdapterShape shape = check_adapter_forward(
      x, base, down_weight, down_bias, up_weight, scale, shift, channels_first);
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t positions = shape.positions();
  const int64_t rank = shape.rank;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty(
      adapter_output_sizes(x, shape.channels_out, channels_first), x.options());
  at::Tensor hidden = at::empty({positions, rank}, f32);
  if (positions == 0) return {y, hidden};

  const at::Tensor x_c = x.contiguous();
  const at::Tensor base_c = base.has_value() ? base->contiguous() : x_c;
  const at::Tensor down = down_weight.to(at::kFloat).contiguous();
  const at::Tensor up = up_weight.to(at::kFloat).contiguous();
  const at::Tensor bias = float_or_undefined(down_bias);
  const at::Tensor scale_f = float_or_undefined(scale);
  const at::Tensor shift_f = float_or_undefined(shift);
  // The up projection reads act(hidden); identity needs no second buffer.
  const bool identity = act == Activation::kIdentity;
  const at::Tensor activated =
      identity ? hidden : at::empty({positions, rank}, f32);

  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      x.scalar_type(), "adapter_forward_cuda", [&] {
        // hidden[m, k] = sum_c x(m, c) D[k, c] + b[k]
        launch_reduce_channels<scalar_t>(
            x_c, shape.channels_in, shape, down.data_ptr<float>(),
            /*weight_rank_stride=*/shape.channels_in, /*weight_channel_stride=*/1,
            data_or_null(bias), /*hidden=*/nullptr, act, hidden,
            identity ? nullptr : activated.data_ptr<float>());
        // y(m, c) = base(m, c) + s[c] sum_k act(hidden[m, k]) U[c, k] + t[c]
        launch_expand_channels<scalar_t>(
            activated, shape, up.data_ptr<float>(),
            /*weight_channel_stride=*/rank, /*weight_rank_stride=*/1,
            data_or_null(scale_f), data_or_null(shift_f),
            base_c.data_ptr<scalar_t>(), y, shape.channels_out);
      });
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                      const at::Tensor& hidden, const at::Tensor& down_weight,
                      const at::Tensor& up_weight,
                      const std::optional<at::Tensor>& scale,
                      c10::string_view activation, bool channels_first,
                      bool base_is_x, bool compute_grad_x) {
  SELFHEAL_NO_AUTOCAST;
  const AdapterShape shape =
      check_adapter_backward(grad_y, x, hidden, down_weight, up_weight, scale,
                             channels_first, base_is_x);
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t positions = shape.positions();
  const int64_t rank = shape.rank;
  const int64_t c_in = shape.channels_in;
  const int64_t c_out = shape.channels_out;
  const auto f32 = x.options().dtype(at::kFloat);

  const at::Tensor x_c = x.contiguous();
  const at::Tensor g_c = grad_y.contiguous();
  const at::Tensor hidden_c = hidden.contiguous();
  const at::Tensor down = down_weight.to(at::kFloat).contiguous();
  const at::Tensor up = up_weight.to(at::kFloat).contiguous();
  const at::Tensor scale_f = float_or_undefined(scale);
  // d(loss)/d(act(hidden)) = grad_y (scale * U): fold the scale in once.
  const at::Tensor scaled_up =
      scale.has_value() ? (up * scale_f.unsqueeze(1)).contiguous() : up;

  at::Tensor grad_x = compute_grad_x
                          ? at::empty_like(x, at::MemoryFormat::Contiguous)
                          : at::empty({0}, x.options());
  const at::Tensor grad_h = at::empty({positions, rank}, f32);
  const bool identity = act == Activation::kIdentity;
  const at::Tensor activated =
      identity ? hidden_c : at::empty({positions, rank}, f32);
  at::Tensor down_total;  // [rank, C_in]
  at::Tensor g_total_t;   // G^T, [rank, C_out]

  if (positions == 0) {
    down_total = at::zeros({rank, c_in}, f32);
    g_total_t = at::zeros({rank, c_out}, f32);
  } else {
    SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
        x.scalar_type(), "adapter_backward_cuda", [&] {
          // grad_h[m, k] = sum_c grad_y(m, c) s[c] U[c, k] * act'(hidden[m, k])
          launch_reduce_channels<scalar_t>(
              g_c, c_out, shape, scaled_up.data_ptr<float>(),
              /*weight_rank_stride=*/1, /*weight_channel_stride=*/rank,
              /*bias=*/nullptr, hidden_c.data_ptr<float>(), act, grad_h,
              identity ? nullptr : activated.data_ptr<float>());
          if (compute_grad_x) {
            // grad_x(m, c) = grad_y(m, c) [base is x] + sum_k grad_h[m, k] D[k, c]
            launch_expand_channels<scalar_t>(
                grad_h, shape, down.data_ptr<float>(),
                /*weight_channel_stride=*/1, /*weight_rank_stride=*/c_in,
                /*channel_scale=*/nullptr, /*channel_shift=*/nullptr,
                base_is_x ? g_c.data_ptr<scalar_t>() : nullptr, grad_x, c_in);
          }
          down_total = launch_reduce_positions<scalar_t>(grad_h, x_c, c_in, shape);
          g_total_t = launch_reduce_positions<scalar_t>(activated, g_c, c_out, shape);
        });
  }

  const at::Tensor bias_total = grad_h.sum(0);
  const at::Tensor shift_total =
      g_c.view({shape.n_outer, c_out, shape.spatial})
          .sum(at::IntArrayRef{0, 2}, /*keepdim=*/false, at::kFloat);
  const at::Tensor g_total = g_total_t.t();  // G, [C_out, rank]
  const auto wdtype = down_weight.scalar_type();
  const at::Tensor grad_up =
      scale.has_value() ? g_total * scale_f.unsqueeze(1) : g_total;
  at::Tensor grad_scale = scale.has_value() ? (g_total * up).sum(1).to(wdtype)
                                            : at::empty({0}, x.options());
  return {grad_x,
          down_total.to(wdtype),
          bias_total.to(wdtype),
          grad_up.to(wdtype).contiguous(),
          grad_scale,
          shift_total.to(wdtype)};
}

}  // namespace selfheal
