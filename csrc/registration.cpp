// Every schema of the selfheal namespace, and the kernel of each backend.
#include <torch/library.h>

#include "selfheal/ops.h"

TORCH_LIBRARY(selfheal, m) {
  m.def(
      "adapter_forward(Tensor x, Tensor? base, Tensor down_weight, "
      "Tensor? down_bias, Tensor up_weight, Tensor? scale, Tensor? shift, "
      "str activation, bool channels_first) -> (Tensor y, Tensor hidden)");
  m.def(
      "adapter_backward(Tensor grad_y, Tensor x, Tensor hidden, "
      "Tensor down_weight, Tensor up_weight, Tensor? scale, str activation, "
      "bool channels_first, bool base_is_x, bool compute_grad_x) -> "
      "(Tensor grad_x, Tensor grad_down_weight, Tensor grad_down_bias, "
      "Tensor grad_up_weight, Tensor grad_scale, Tensor grad_shift)");
  m.def(
      "softmax_entropy(Tensor logits) -> "
      "(Tensor entropy, Tensor max_prob, Tensor logsumexp)");
  m.def(
      "softmax_entropy_backward(Tensor grad_entropy, Tensor grad_max_prob, "
      "Tensor logits, Tensor entropy, Tensor logsumexp) -> Tensor");
  m.def(
      "histogram_update_(Tensor(a!) counts, Tensor(b!) nonfinite, Tensor x, "
      "Tensor lo, Tensor hi) -> ()");
  m.def(
      "sketch_histogram_update_(Tensor(a!) counts, Tensor(b!) nonfinite, "
      "Tensor x, Tensor bucket, Tensor weight, Tensor lo, Tensor hi) -> ()");
  m.def(
      "kl_divergence(Tensor p_counts, Tensor q_counts, float pseudo_count) "
      "-> Tensor");
  m.def(
      "js_divergence(Tensor p_counts, Tensor q_counts, float pseudo_count) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(selfheal, CPU, m) {
  m.impl("adapter_forward", &selfheal::adapter_forward_cpu);
  m.impl("adapter_backward", &selfheal::adapter_backward_cpu);
  m.impl("softmax_entropy", &selfheal::softmax_entropy_cpu);
  m.impl("softmax_entropy_backward", &selfheal::softmax_entropy_backward_cpu);
  m.impl("histogram_update_", &selfheal::histogram_update_cpu);
  m.impl("sketch_histogram_update_", &selfheal::sketch_histogram_update_cpu);
  m.impl("kl_divergence", &selfheal::kl_divergence_cpu);
  m.impl("js_divergence", &selfheal::js_divergence_cpu);
}

#ifdef SELFHEAL_WITH_CUDA
TORCH_LIBRARY_IMPL(selfheal, CUDA, m) {
  m.impl("adapter_forward", &selfheal::adapter_forward_cuda);
  m.impl("adapter_backward", &selfheal::adapter_backward_cuda);
  m.impl("softmax_entropy", &selfheal::softmax_entropy_cuda);
  m.impl("softmax_entropy_backward", &selfheal::softmax_entropy_backward_cuda);
  m.impl("histogram_update_", &selfheal::histogram_update_cuda);
  m.impl("sketch_histogram_update_", &selfheal::sketch_histogram_update_cuda);
  m.impl("kl_divergence", &selfheal::kl_divergence_cuda);
  m.impl("js_divergence", &selfheal::js_divergence_cuda);
}
#endif
