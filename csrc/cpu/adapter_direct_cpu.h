// The CPU adapter's direct loops for small problems (adapter_direct_cpu.cpp);
// adapter_cpu.cpp checks the arguments and picks them or its tiled path.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "selfheal/checks.h"

namespace selfheal {

// Whether the direct loops beat the tiled path for this geometry, in the
// forward or the backward pass.
bool adapter_direct_fits(const AdapterShape& shape, bool backward);

// The arguments as adapter_forward_cpu takes them, already checked; x and base
// contiguous (base is x for a bottleneck adapter).
std::tuple<at::Tensor, at::Tensor> adapter_forward_direct(
    const at::Tensor& x, const at::Tensor& base, const at::Tensor& down_weight,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    Activation act, bool channels_first, const AdapterShape& shape);

// The arguments as adapter_backward_cpu takes them, already checked; grad_y, x
// and hidden contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_backward_direct(const at::Tensor& grad_y, const at::Tensor& x,
                        const at::Tensor& hidden, const at::Tensor& down_weight,
                        const at::Tensor& up_weight,
                        const std::optional<at::Tensor>& scale, Activation act,
                        bool base_is_x, bool compute_grad_x, const AdapterShape& shape);

}  // namespace selfheal
