// Argument checks shared by the CPU and CUDA kernels. Every message names the
// argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>

// expected and actual are evaluated only when cond fails (TORCH_CHECK builds
// its message lazily): write them as expressions, e.g. c10::str(...), not as
// strings built before the check, which every passing call would pay for.
#define SELFHEAL_CHECK_ARG(cond, name, expected, actual)                 \
  TORCH_CHECK((cond), "selfheal: argument '", name, "' must be ",       \
              expected, ", got ", actual)

namespace selfheal {

// Kernels that call ATen ops internally hold this so the caller's autocast
// state cannot change the dtype of their intermediates (autocast policy is
// applied once, to the op's inputs, in selfheal_ext/ops.py).
using NoAutocastGuard = c10::impl::ExcludeDispatchKeyGuard;
#define SELFHEAL_NO_AUTOCAST \
  const ::selfheal::NoAutocastGuard selfheal_no_autocast(c10::autocast_dispatch_keyset)

enum class Activation { kIdentity = 0, kRelu = 1, kGelu = 2, kSilu = 3 };

// Parses "identity" / "relu" / "gelu" / "silu"; raises on anything else.
Activation parse_activation(c10::string_view name);

// Geometry of an adapter call: x viewed as [n_outer, channels_in, spatial]
// (channels-last has spatial == 1), rank r, channels_out.
struct AdapterShape {
  int64_t n_outer;
  int64_t channels_in;
  int64_t channels_out;
  int64_t spatial;
  int64_t rank;
  int64_t positions() const { return n_outer * spatial; }
};

// Checks the forward arguments (dtypes, devices, shapes) and returns the
// geometry. base, when given, must have y's shape. float64 inputs are accepted
// only where the backend computes in float64 (allow_float64).
AdapterShape check_adapter_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& base,
    const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool channels_first,
    bool allow_float64 = false);

// hidden is float32, or float64 for float64 x.
AdapterShape check_adapter_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& hidden,
    const at::Tensor& down_weight, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& scale, bool channels_first,
    bool base_is_x, bool allow_float64 = false);

// Shape of y for an input of x's shape and channels_out output channels.
std::vector<int64_t> adapter_output_sizes(const at::Tensor& x,
                                          int64_t channels_out,
                                          bool channels_first);

void check_softmax_entropy(const at::Tensor& logits);
void check_softmax_entropy_backward(const at::Tensor& grad_entropy,
                                    const at::Tensor& grad_max_prob,
                                    const at::Tensor& logits,
                                    const at::Tensor& entropy,
                                    const at::Tensor& logsumexp);

void check_histogram_update(const at::Tensor& counts,
                            const at::Tensor& nonfinite, const at::Tensor& x,
                            const at::Tensor& lo, const at::Tensor& hi);

// sketch_histogram_update_: x [N, D], bucket int64 [D], weight float32 [D];
// counts [F, bins + 2], nonfinite/lo/hi [F] as for histogram_update_ with F
// the sketch width. Bucket values are range-checked by the kernels.
void check_sketch_histogram_update(const at::Tensor& counts,
                                   const at::Tensor& nonfinite,
                                   const at::Tensor& x,
                                   const at::Tensor& bucket,
                                   const at::Tensor& weight,
                                   const at::Tensor& lo, const at::Tensor& hi);

void check_divergence(const at::Tensor& p_counts, const at::Tensor& q_counts,
                      double pseudo_count, bool pseudo_count_may_be_zero);

}  // namespace selfheal
