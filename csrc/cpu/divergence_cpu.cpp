// CPU KL and Jensen-Shannon divergences between count tables, per row, in
// float64 with pseudo-count smoothing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "selfheal/checks.h"
#include "selfheal/ops.h"

namespace selfheal {
namespace {

enum class Divergence { kKL, kJS };

constexpr double kInfinity = std::numeric_limits<double>::infinity();

template <typename count_t>
double row_divergence(const count_t* p, const count_t* q, int64_t bins,
                      double pseudo_count, Divergence kind) {
  // First pass: totals and validity, branch-free so it vectorises.
  double p_total = 0.0;
  double q_total = 0.0;
  bool valid = true;
  for (int64_t b = 0; b < bins; ++b) {
    const double pv = static_cast<double>(p[b]);
    const double qv = static_cast<double>(q[b]);
    valid &= (pv >= 0.0) & (qv >= 0.0) & (pv < kInfinity) & (qv < kInfinity);
    p_total += pv;
    q_total += qv;
  }
  TORCH_CHECK(valid,
              "selfheal: arguments 'p_counts' and 'q_counts' must hold finite, "
              "non-negative counts");
  p_total += pseudo_count * static_cast<double>(bins);
  q_total += pseudo_count * static_cast<double>(bins);
  TORCH_CHECK(p_total < kInfinity && q_total < kInfinity,
              "selfheal: arguments 'p_counts' and 'q_counts' must have rows whose "
              "counts plus pseudo_count * bins sum to a finite float64, got sums ",
              p_total, " and ", q_total);
  if (p_total <= 0.0 || q_total <= 0.0) return 0.0;  // nothing to compare
  // Multiplying by the reciprocal is the fast path; a total below about
  // 5.6e-309 (denormal counts or pseudo-count) has no finite reciprocal and is
  // divided by instead.
  const double p_norm = 1.0 / p_total;
  const double q_norm = 1.0 / q_total;
  const bool divide = !(p_norm < kInfinity && q_norm < kInfinity);
  // log(q_total / p_total), for the bins whose probability ratio under- or
  // overflows: log(pp / qq) = log(p + c) - log(q + c) + log(q_total / p_total).
  const double log_total_ratio = std::log(q_total) - std::log(p_total);
  double total = 0.0;
  for (int64_t b = 0; b < bins; ++b) {
    const double p_smoothed = static_cast<double>(p[b]) + pseudo_count;
    const double q_smoothed = static_cast<double>(q[b]) + pseudo_count;
    const double pp = divide ? p_smoothed / p_total : p_smoothed * p_norm;
    const double qq = divide ? q_smoothed / q_total : q_smoothed * q_norm;
    if (kind == Divergence::kKL) {
      // One log per bin; two where the ratio is 0 or inf. A bin whose pp
      // underflows to 0 adds 0 (0 * log 0 = 0).
      const double ratio = pp / qq;
      if (pp > 0.0) {
        total += pp * (ratio > 0.0 && ratio < kInfinity
                           ? std::log(ratio)
                           : std::log(p_smoothed) - std::log(q_smoothed) + log_total_ratio);
      }
    } else {
      const double mm = 0.5 * (pp + qq);
      // pp / mm and qq / mm lie in (0, 2]: no overflow, no underflow to 0.
      if (pp > 0.0) total += 0.5 * pp * std::log(pp / mm);
      if (qq > 0.0) total += 0.5 * qq * std::log(qq / mm);
    }
  }
  return kind == Divergence::kJS ? std::max(total, 0.0) : total;
}

at::Tensor divergence_cpu(const at::Tensor& p_counts, const at::Tensor& q_counts,
                          double pseudo_count, Divergence kind) {
  check_divergence(p_counts, q_counts, pseudo_count, kind == Divergence::kJS);
  const at::Tensor p = p_counts.contiguous();
  const at::Tensor q = q_counts.contiguous();
  const int64_t features = p.size(0);
  const int64_t bins = p.size(1);
  at::Tensor out = at::empty({features}, p.options().dtype(at::kFloat));
  float* out_data = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kLong, p.scalar_type(), "divergence_cpu", [&] {
    const scalar_t* p_data = p.data_ptr<scalar_t>();
    const scalar_t* q_data = q.data_ptr<scalar_t>();
    at::parallel_for(0, features, 16, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        out_data[f] = static_cast<float>(row_divergence(
            p_data + f * bins, q_data + f * bins, bins, pseudo_count, kind));
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor kl_divergence_cpu(const at::Tensor& p_counts,
                             const at::Tensor& q_counts, double pseudo_count) {
  return divergence_cpu(p_counts, q_counts, pseudo_count, Divergence::kKL);
}

at::Tensor js_divergence_cpu(const at::Tensor& p_counts,
                             const at::Tensor& q_counts, double pseudo_count) {
  return divergence_cpu(p_counts, q_counts, pseudo_count, Divergence::kJS);
}

}  // namespace selfheal
