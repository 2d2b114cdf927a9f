#include "selfheal/checks.h"

#include <limits>
#include <sstream>
#include <string>

namespace selfheal {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << t.scalar_type() << " tensor of shape " << t.sizes() << " on "
      << t.device();
  return out.str();
}

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_float_input(const at::Tensor& t, const char* name,
                       bool allow_float64 = false) {
  SELFHEAL_CHECK_ARG(t.defined(), name, "a defined tensor", "undefined");
  const bool ok = is_supported_float(t.scalar_type()) ||
                  (allow_float64 && t.scalar_type() == at::kDouble);
  SELFHEAL_CHECK_ARG(ok, name,
                     allow_float64 ? "float32, float16, bfloat16 or float64"
                                   : "float32, float16 or bfloat16",
                     describe(t));
}

void check_same_device(const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name) {
  SELFHEAL_CHECK_ARG(t.device() == ref.device(), name,
                     std::string("on the device of '") + ref_name + "' (" +
                         ref.device().str() + ")",
                     describe(t));
}

void check_same_dtype(const at::Tensor& t, const char* name,
                      const at::Tensor& ref, const char* ref_name) {
  SELFHEAL_CHECK_ARG(t.scalar_type() == ref.scalar_type(), name,
                     c10::str("of the dtype of '", ref_name, "' (",
                              ref.scalar_type(), ")"),
                     describe(t));
}

void check_vector(const at::Tensor& t, const char* name, int64_t length,
                  const at::Tensor& x) {
  check_same_device(t, name, x, "x");
  check_same_dtype(t, name, x, "x");
  SELFHEAL_CHECK_ARG(t.dim() == 1 && t.size(0) == length, name,
                     c10::str("a 1-D tensor of length ", length), describe(t));
}

}  // namespace

Activation parse_activation(c10::string_view name) {
  if (name == "identity") return Activation::kIdentity;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  SELFHEAL_CHECK_ARG(false, "activation",
                     "one of 'identity', 'relu', 'gelu', 'silu'",
                     std::string("'") + std::string(name) + "'");
  return Activation::kIdentity;
}

std::vector<int64_t> adapter_output_sizes(const at::Tensor& x,
                                          int64_t channels_out,
                                          bool channels_first) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[channels_first ? 1 : sizes.size() - 1] = channels_out;
  return sizes;
}

AdapterShape check_adapter_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& base,
    const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool channels_first,
    bool allow_float64) {
  check_float_input(x, "x", allow_float64);
  SELFHEAL_CHECK_ARG(x.dim() >= (channels_first ? 2 : 1), "x",
                     channels_first ? "at least 2-D [N, C, *spatial]"
                                    : "at least 1-D [..., C]",
                     describe(x));
  const int64_t channel_dim = channels_first ? 1 : x.dim() - 1;
  AdapterShape shape{};
  shape.channels_in = x.size(channel_dim);
  shape.spatial = 1;
  if (channels_first) {
    shape.n_outer = x.size(0);
    for (int64_t d = 2; d < x.dim(); ++d) shape.spatial *= x.size(d);
  } else {
    shape.n_outer = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) shape.n_outer *= x.size(d);
  }
  SELFHEAL_CHECK_ARG(shape.channels_in > 0, "x",
                     "a tensor with at least one channel", describe(x));

  check_same_device(down_weight, "down_weight", x, "x");
  check_same_dtype(down_weight, "down_weight", x, "x");
  SELFHEAL_CHECK_ARG(down_weight.dim() == 2 &&
                         down_weight.size(1) == shape.channels_in &&
                         down_weight.size(0) >= 1 && down_weight.size(0) <= 256,
                     "down_weight",
                     c10::str("2-D [rank, ", shape.channels_in, "] with 1 <= rank <= 256"),
                     describe(down_weight));
  shape.rank = down_weight.size(0);

  check_same_device(up_weight, "up_weight", x, "x");
  check_same_dtype(up_weight, "up_weight", x, "x");
  SELFHEAL_CHECK_ARG(up_weight.dim() == 2 && up_weight.size(1) == shape.rank &&
                         up_weight.size(0) >= 1,
                     "up_weight", c10::str("2-D [C_out, ", shape.rank, "] with C_out >= 1"),
                     describe(up_weight));
  shape.channels_out = up_weight.size(0);

  if (down_bias.has_value()) {
    check_vector(*down_bias, "down_bias", shape.rank, x);
  }
  if (scale.has_value()) check_vector(*scale, "scale", shape.channels_out, x);
  if (shift.has_value()) check_vector(*shift, "shift", shape.channels_out, x);

  if (base.has_value()) {
    check_same_device(*base, "base", x, "x");
    check_same_dtype(*base, "base", x, "x");
    const auto y_sizes = adapter_output_sizes(x, shape.channels_out, channels_first);
    SELFHEAL_CHECK_ARG(base->sizes() == c10::IntArrayRef(y_sizes), "base",
                       c10::str("of the output's shape ", c10::IntArrayRef(y_sizes)),
                       describe(*base));
  } else {
    SELFHEAL_CHECK_ARG(shape.channels_out == shape.channels_in, "base",
                       c10::str("given when up_weight has ", shape.channels_out,
                                " output channels and x has ", shape.channels_in,
                                " (base = x needs C_out == C_in)"),
                       "None");
  }
  return shape;
}

AdapterShape check_adapter_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& hidden,
    const at::Tensor& down_weight, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& scale, bool channels_first,
    bool base_is_x, bool allow_float64) {
  const std::optional<at::Tensor> no_tensor;
  const std::optional<at::Tensor> base =
      base_is_x ? no_tensor : std::optional<at::Tensor>(grad_y);
  check_same_device(grad_y, "grad_y", x, "x");
  check_same_dtype(grad_y, "grad_y", x, "x");
  AdapterShape shape = check_adapter_forward(
      x, base, down_weight, no_tensor, up_weight, scale, no_tensor,
      channels_first, allow_float64);
  const auto y_sizes = adapter_output_sizes(x, shape.channels_out, channels_first);
  SELFHEAL_CHECK_ARG(grad_y.sizes() == c10::IntArrayRef(y_sizes), "grad_y",
                     c10::str("of the output's shape ", c10::IntArrayRef(y_sizes)),
                     describe(grad_y));
  check_same_device(hidden, "hidden", x, "x");
  const at::ScalarType hidden_dtype =
      x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  SELFHEAL_CHECK_ARG(hidden.scalar_type() == hidden_dtype && hidden.dim() == 2 &&
                         hidden.size(0) == shape.positions() &&
                         hidden.size(1) == shape.rank,
                     "hidden",
                     c10::str("a ", hidden_dtype, " tensor of shape [", shape.positions(),
                              ", ", shape.rank, "]"),
                     describe(hidden));
  return shape;
}

void check_softmax_entropy(const at::Tensor& logits) {
  check_float_input(logits, "logits");
  SELFHEAL_CHECK_ARG(logits.dim() == 2 && logits.size(1) >= 1, "logits",
                     "2-D [N, C] with C >= 1", describe(logits));
}

void check_softmax_entropy_backward(const at::Tensor& grad_entropy,
                                    const at::Tensor& grad_max_prob,
                                    const at::Tensor& logits,
                                    const at::Tensor& entropy,
                                    const at::Tensor& logsumexp) {
  check_softmax_entropy(logits);
  const int64_t rows = logits.size(0);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{grad_entropy, "grad_entropy"},
        {grad_max_prob, "grad_max_prob"},
        {entropy, "entropy"},
        {logsumexp, "logsumexp"}}) {
    SELFHEAL_CHECK_ARG(t.scalar_type() == at::kFloat && t.dim() == 1 &&
                           t.size(0) == rows && t.device() == logits.device(),
                       name,
                       c10::str("a float32 tensor of shape [", rows,
                                "] on the device of 'logits'"),
                       describe(t));
  }
}

namespace {

// counts [features, bins + 2] int64, nonfinite [features] int64, lo/hi
// [features] float32, all on x's device.
void check_count_tables(const at::Tensor& counts, const at::Tensor& nonfinite,
                        const at::Tensor& x, const at::Tensor& lo,
                        const at::Tensor& hi, int64_t features) {
  SELFHEAL_CHECK_ARG(counts.scalar_type() == at::kLong && counts.dim() == 2 &&
                         counts.size(0) == features && counts.size(1) >= 3,
                     "counts",
                     c10::str("an int64 tensor of shape [", features,
                              ", bins + 2] with bins >= 1"),
                     describe(counts));
  SELFHEAL_CHECK_ARG(counts.is_contiguous(), "counts", "contiguous",
                     "a non-contiguous tensor");
  check_same_device(counts, "counts", x, "x");
  SELFHEAL_CHECK_ARG(nonfinite.scalar_type() == at::kLong &&
                         nonfinite.dim() == 1 && nonfinite.size(0) == features,
                     "nonfinite", c10::str("an int64 tensor of shape [", features, "]"),
                     describe(nonfinite));
  SELFHEAL_CHECK_ARG(nonfinite.is_contiguous(), "nonfinite", "contiguous",
                     "a non-contiguous tensor");
  check_same_device(nonfinite, "nonfinite", x, "x");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lo, "lo"},
                                {hi, "hi"}}) {
    SELFHEAL_CHECK_ARG(t.scalar_type() == at::kFloat && t.dim() == 1 &&
                           t.size(0) == features,
                       name, c10::str("a float32 tensor of shape [", features, "]"),
                       describe(t));
    check_same_device(t, name, x, "x");
  }
}

}  // namespace

void check_histogram_update(const at::Tensor& counts,
                            const at::Tensor& nonfinite, const at::Tensor& x,
                            const at::Tensor& lo, const at::Tensor& hi) {
  check_float_input(x, "x");
  SELFHEAL_CHECK_ARG(x.dim() == 2, "x", "2-D [N, F]", describe(x));
  check_count_tables(counts, nonfinite, x, lo, hi, x.size(1));
}

void check_sketch_histogram_update(const at::Tensor& counts,
                                   const at::Tensor& nonfinite,
                                   const at::Tensor& x,
                                   const at::Tensor& bucket,
                                   const at::Tensor& weight,
                                   const at::Tensor& lo, const at::Tensor& hi) {
  check_float_input(x, "x");
  SELFHEAL_CHECK_ARG(x.dim() == 2, "x", "2-D [N, D]", describe(x));
  const int64_t width = x.size(1);
  SELFHEAL_CHECK_ARG(bucket.scalar_type() == at::kLong && bucket.dim() == 1 &&
                         bucket.size(0) == width,
                     "bucket", c10::str("an int64 tensor of shape [", width, "]"),
                     describe(bucket));
  check_same_device(bucket, "bucket", x, "x");
  SELFHEAL_CHECK_ARG(weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                         weight.size(0) == width,
                     "weight", c10::str("a float32 tensor of shape [", width, "]"),
                     describe(weight));
  check_same_device(weight, "weight", x, "x");
  SELFHEAL_CHECK_ARG(counts.dim() == 2 && counts.size(0) >= 1, "counts",
                     "a 2-D tensor [F, bins + 2] with F >= 1", describe(counts));
  check_count_tables(counts, nonfinite, x, lo, hi, counts.size(0));
}

void check_divergence(const at::Tensor& p_counts, const at::Tensor& q_counts,
                      double pseudo_count, bool pseudo_count_may_be_zero) {
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{p_counts, "p_counts"},
        {q_counts, "q_counts"}}) {
    const auto dtype = t.scalar_type();
    SELFHEAL_CHECK_ARG((dtype == at::kLong || dtype == at::kFloat ||
                        dtype == at::kDouble) &&
                           t.dim() == 2 && t.size(1) >= 1,
                       name, "an int64, float32 or float64 tensor [F, bins]",
                       describe(t));
  }
  SELFHEAL_CHECK_ARG(q_counts.sizes() == p_counts.sizes(), "q_counts",
                     "of the shape of 'p_counts'", describe(q_counts));
  check_same_dtype(q_counts, "q_counts", p_counts, "p_counts");
  check_same_device(q_counts, "q_counts", p_counts, "p_counts");
  const bool valid = std::isfinite(pseudo_count) &&
                     (pseudo_count_may_be_zero ? pseudo_count >= 0.0
                                               : pseudo_count > 0.0);
  SELFHEAL_CHECK_ARG(valid, "pseudo_count",
                     pseudo_count_may_be_zero ? "finite and >= 0"
                                              : "finite and > 0 (KL is infinite "
                                                "without smoothing)",
                     pseudo_count);
  // Every row's smoothed total includes pseudo_count * bins: it must be a
  // finite float64, or the normalised distributions would be 0 / NaN.
  SELFHEAL_CHECK_ARG(pseudo_count * static_cast<double>(p_counts.size(1)) <
                         std::numeric_limits<double>::infinity(),
                     "pseudo_count",
                     "small enough that pseudo_count * bins is a finite float64",
                     pseudo_count);
}

}  // namespace selfheal
