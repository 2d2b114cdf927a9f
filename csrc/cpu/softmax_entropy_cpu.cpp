// CPU softmax entropy: one online pass per row keeps the running maximum m,
// S = sum exp(z - m) and T = sum exp(z - m) * (z - m), rescaled whenever the
// maximum grows (per block of values, not per value). Then
//   logsumexp = m + log S,  entropy = log S - T / S,  max_prob = 1 / S.
// No [N, C] temporary is made; half-precision rows are widened a block at a
// time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "selfheal/checks.h"
#include "selfheal/dispatch.h"
#include "selfheal/fast_exp.h"
#include "selfheal/ops.h"
#include "selfheal/vector_clones.h"

namespace selfheal {
namespace {

constexpr int64_t kBlock = 256;
constexpr float kExpFloor = -87.0f;

struct RowState {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.f;           // S
  float weighted = 0.f;      // T
  bool saw_nan = false;
};

// Adds one block of fp32 values to the running state of a row.
SELFHEAL_VECTOR_CLONES
void accumulate_block(RowState& state, const float* z, int64_t count) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Float8 max_lanes = Float8{} + neg_inf;
  Int8 nan_lanes = {};
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const Float8 v = load8(z + j);
    max_lanes = max8(max_lanes, v);
    nan_lanes |= (v != v);
  }
  float block_max = neg_inf;
  bool saw_nan = false;
  for (int lane = 0; lane < 8; ++lane) {
    block_max = std::max(block_max, max_lanes[lane]);
    saw_nan |= nan_lanes[lane] != 0;
  }
  for (; j < count; ++j) {
    block_max = std::max(block_max, z[j]);
    saw_nan |= z[j] != z[j];
  }
  state.saw_nan |= saw_nan;
  if (block_max > state.max) {
    if (state.sum > 0.f) {
      // delta < 0; it is -inf when the maxima are more than FLT_MAX apart
      // (e.g. -3e38 then 3e38), where the old terms weigh exactly 0 (and
      // factor * delta * sum would be 0 * inf = NaN).
      const float delta = state.max - block_max;
      const float factor = std::exp(delta);
      state.weighted = factor > 0.f ? factor * (state.weighted + delta * state.sum) : 0.f;
      state.sum *= factor;
    }
    state.max = block_max;
  }
  if (state.max == neg_inf) return;
  const float m = state.max;
  const Float8 floor8 = Float8{} + kExpFloor;
  Float8 sum_lanes = {};
  Float8 weighted_lanes = {};
  j = 0;
  for (; j + 8 <= count; j += 8) {
    const Float8 d = max8(load8(z + j) - m, floor8);
    const Float8 e = exp_nonpositive(d);
    sum_lanes += e;
    weighted_lanes += e * d;
  }
  float sum = sum8(sum_lanes);
  float weighted = sum8(weighted_lanes);
  for (; j < count; ++j) {
    const float d = std::max(z[j] - m, kExpFloor);
    const float e = exp_nonpositive(d);
    sum += e;
    weighted += e * d;
  }
  state.sum += sum;
  state.weighted += weighted;
}

// grad_logits for one fp32 row: from entropy, -p (log p + H); from max_prob,
// p_max (onehot(argmax) - p).
SELFHEAL_VECTOR_CLONES
void entropy_grad_row(float* out, const float* z, int64_t count, float lse,
                      float entropy, float grad_entropy, float grad_max_prob,
                      int64_t argmax) {
  const float p_max = std::exp(z[argmax] - lse);
  const float max_term = grad_max_prob * p_max;
  const Float8 floor8 = Float8{} + kExpFloor;
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const Float8 d = max8(load8(z + j) - lse, floor8);
    const Float8 p = exp_nonpositive(d);
    store8(out + j, -grad_entropy * p * (d + entropy) - max_term * p);
  }
  for (; j < count; ++j) {
    const float d = std::max(z[j] - lse, kExpFloor);
    const float p = exp_nonpositive(d);
    out[j] = -grad_entropy * p * (d + entropy) - max_term * p;
  }
  out[argmax] += max_term;
}

template <typename scalar_t>
const float* row_as_float(const scalar_t* row, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t j = 0; j < count; ++j) buffer[j] = static_cast<float>(row[j]);
    return buffer;
  }
}

int64_t rows_per_task(int64_t classes) {
  return std::max<int64_t>(1, 32768 / classes);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_entropy_cpu(
    const at::Tensor& logits) {
  check_softmax_entropy(logits);
  const at::Tensor z = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t rows = z.size(0);
  const int64_t classes = z.size(1);
  const int64_t row_stride = z.stride(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor entropy = at::empty({rows}, f32);
  at::Tensor max_prob = at::empty({rows}, f32);
  at::Tensor lse = at::empty({rows}, f32);
  float* entropy_data = entropy.data_ptr<float>();
  float* max_prob_data = max_prob.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      z.scalar_type(), "softmax_entropy_cpu", [&] {
        const scalar_t* data = z.data_ptr<scalar_t>();
        at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
          float buffer[kBlock];
          for (int64_t i = begin; i < end; ++i) {
            RowState state;
            const scalar_t* row = data + i * row_stride;
            for (int64_t j0 = 0; j0 < classes; j0 += kBlock) {
              const int64_t count = std::min(kBlock, classes - j0);
              accumulate_block(state, row_as_float(row + j0, count, buffer), count);
            }
            if (state.saw_nan || !(state.sum > 0.f) || std::isinf(state.max)) {
              // NaN or +inf logits, or a row of -inf: the softmax is undefined.
              const float nan = std::numeric_limits<float>::quiet_NaN();
              entropy_data[i] = max_prob_data[i] = lse_data[i] = nan;
              continue;
            }
            const float log_sum = std::log(state.sum);
            lse_data[i] = state.max + log_sum;
            entropy_data[i] = std::max(0.f, log_sum - state.weighted / state.sum);
            max_prob_data[i] = 1.f / state.sum;
          }
        });
      });
  return {entropy, max_prob, lse};
}

at::Tensor softmax_entropy_backward_cpu(const at::Tensor& grad_entropy,
                                        const at::Tensor& grad_max_prob,
                                        const at::Tensor& logits,
                                        const at::Tensor& entropy,
                                        const at::Tensor& logsumexp) {
  check_softmax_entropy_backward(grad_entropy, grad_max_prob, logits, entropy,
                                 logsumexp);
  const at::Tensor z = logits.contiguous();
  const int64_t rows = z.size(0);
  const int64_t classes = z.size(1);
  at::Tensor grad = at::empty_like(z);
  const at::Tensor ge = grad_entropy.contiguous();
  const at::Tensor gm = grad_max_prob.contiguous();
  const at::Tensor h = entropy.contiguous();
  const at::Tensor l = logsumexp.contiguous();
  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      z.scalar_type(), "softmax_entropy_backward_cpu", [&] {
        const scalar_t* data = z.data_ptr<scalar_t>();
        scalar_t* out = grad.data_ptr<scalar_t>();
        at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
          std::vector<float> widened(std::is_same_v<scalar_t, float> ? 0 : classes);
          std::vector<float> row_grad(std::is_same_v<scalar_t, float> ? 0 : classes);
          for (int64_t i = begin; i < end; ++i) {
            const float* row = row_as_float(data + i * classes, classes, widened.data());
            const int64_t argmax = std::max_element(row, row + classes) - row;
            float* target = std::is_same_v<scalar_t, float>
                                ? reinterpret_cast<float*>(out + i * classes)
                                : row_grad.data();
            entropy_grad_row(target, row, classes, l.data_ptr<float>()[i],
                             h.data_ptr<float>()[i], ge.data_ptr<float>()[i],
                             gm.data_ptr<float>()[i], argmax);
            if constexpr (!std::is_same_v<scalar_t, float>) {
              for (int64_t j = 0; j < classes; ++j) {
                out[i * classes + j] = static_cast<scalar_t>(row_grad[j]);
              }
            }
          }
        });
      });
  return grad;
}

}  // namespace selfheal
