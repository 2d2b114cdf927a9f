// Kernel entry points of the selfheal ops, one declaration per backend.
// Schemas live in csrc/registration.cpp; argument checks shared by every
// backend live in csrc/include/selfheal/checks.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace selfheal {

// ---- adapter ---------------------------------------------------------------
// y = base + scale * up(act(down(x) + down_bias)) + shift
// x is viewed as [N, C_in, S]: channels-last [..., C] has S = 1, channels-first
// [N, C, *spatial] has S = prod(spatial). hidden is the fp32 pre-activation
// [M, r], M = N * S, position m = n * S + s.
std::tuple<at::Tensor, at::Tensor> adapter_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& base,
    const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, c10::string_view activation,
    bool channels_first);

// Returns (grad_x, grad_down_weight, grad_down_bias, grad_up_weight,
// grad_scale, grad_shift). grad_x is empty ([0]) unless compute_grad_x;
// grad_scale is empty unless scale is given.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                     const at::Tensor& hidden, const at::Tensor& down_weight,
                     const at::Tensor& up_weight,
                     const std::optional<at::Tensor>& scale,
                     c10::string_view activation, bool channels_first,
                     bool base_is_x, bool compute_grad_x);

// ---- softmax entropy -------------------------------------------------------
// Per row of logits [N, C]: (entropy, max_prob, logsumexp), all fp32 [N].
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_entropy_cpu(
    const at::Tensor& logits);
at::Tensor softmax_entropy_backward_cpu(const at::Tensor& grad_entropy,
                                        const at::Tensor& grad_max_prob,
                                        const at::Tensor& logits,
                                        const at::Tensor& entropy,
                                        const at::Tensor& logsumexp);

// ---- histogram -------------------------------------------------------------
void histogram_update_cpu(at::Tensor& counts, at::Tensor& nonfinite,
                          const at::Tensor& x, const at::Tensor& lo,
                          const at::Tensor& hi);
void sketch_histogram_update_cpu(at::Tensor& counts, at::Tensor& nonfinite,
                                 const at::Tensor& x, const at::Tensor& bucket,
                                 const at::Tensor& weight, const at::Tensor& lo,
                                 const at::Tensor& hi);

// ---- divergences -----------------------------------------------------------
at::Tensor kl_divergence_cpu(const at::Tensor& p_counts,
                             const at::Tensor& q_counts, double pseudo_count);
at::Tensor js_divergence_cpu(const at::Tensor& p_counts,
                             const at::Tensor& q_counts, double pseudo_count);

#ifdef SELFHEAL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> adapter_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& base,
    const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, c10::string_view activation,
    bool channels_first);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                      const at::Tensor& hidden, const at::Tensor& down_weight,
                      const at::Tensor& up_weight,
                      const std::optional<at::Tensor>& scale,
                      c10::string_view activation, bool channels_first,
                      bool base_is_x, bool compute_grad_x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_entropy_cuda(
    const at::Tensor& logits);
at::Tensor softmax_entropy_backward_cuda(const at::Tensor& grad_entropy,
                                         const at::Tensor& grad_max_prob,
                                         const at::Tensor& logits,
                                         const at::Tensor& entropy,
                                         const at::Tensor& logsumexp);
void histogram_update_cuda(at::Tensor& counts, at::Tensor& nonfinite,
                           const at::Tensor& x, const at::Tensor& lo,
                           const at::Tensor& hi);
void sketch_histogram_update_cuda(at::Tensor& counts, at::Tensor& nonfinite,
                                  const at::Tensor& x, const at::Tensor& bucket,
                                  const at::Tensor& weight,
                                  const at::Tensor& lo, const at::Tensor& hi);
at::Tensor kl_divergence_cuda(const at::Tensor& p_counts,
                              const at::Tensor& q_counts, double pseudo_count);
at::Tensor js_divergence_cuda(const at::Tensor& p_counts,
                              const at::Tensor& q_counts, double pseudo_count);
#endif

}  // namespace selfheal
