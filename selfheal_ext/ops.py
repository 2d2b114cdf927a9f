"""The public op API: thin wrappers over ``torch.ops.selfheal``.

Each wrapper calls the compiled kernel when the extension has one for the
input's device, and otherwise the pure-PyTorch definition in
``selfheal_ext.reference`` (same results, slower). This module also registers
the fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces
the ops without graph breaks, and the autograd formulas, whose backward passes
are fused ops of their own.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference
from ._extension import LOADED, has_kernel

__all__ = [
    "adapter",
    "softmax_entropy",
    "histogram_update_",
    "sketch_histogram_update_",
    "kl_divergence",
    "js_divergence",
]


def adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
    activation: str = "gelu",
    channels_first: bool = False,
) -> torch.Tensor:
    """Fused adapter: ``y = base + scale * up(act(down(x) + down_bias)) + shift``.

    Args:
        x: ``[..., C_in]`` (channels-last) or ``[N, C_in, *spatial]`` with
            ``channels_first=True`` (conv feature maps; no permute copy is made).
        down_weight: ``[r, C_in]``, ``1 <= r <= 256``.
        up_weight: ``[C_out, r]``.
        down_bias: optional ``[r]``.
        scale, shift: optional per-output-channel ``[C_out]``.
        base: what the branch is added to; ``None`` means ``x`` (a bottleneck
            adapter, ``C_out == C_in``); pass a layer's output for a LoRA side
            branch.
        activation: ``"identity"``, ``"relu"``, ``"gelu"`` (exact) or ``"silu"``.

    All floating tensors share x's dtype (float32, float16 or bfloat16, and
    float64 on the CPU); arithmetic is float32 (float64 for float64).
    Differentiable in every tensor argument.

    >>> import torch, selfheal_ext as sh
    >>> x = torch.randn(8, 64)
    >>> down, up = torch.randn(4, 64), torch.zeros(64, 4)
    >>> torch.equal(sh.ops.adapter(x, down, up), x)  # zero up-projection: identity
    True
    """
    if not has_kernel("adapter_forward", x.device.type):
        return reference.adapter(
            x, down_weight, up_weight, down_bias, scale, shift, base, activation, channels_first
        )
    y, _ = torch.ops.selfheal.adapter_forward(
        x, base, down_weight, down_bias, up_weight, scale, shift, activation, channels_first
    )
    return y


def softmax_entropy(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row entropy (nats) and maximum probability of ``softmax(logits)``.

    One pass over ``logits [N, C]`` (float32/float16/bfloat16) with no ``[N, C]``
    temporary; returns two float32 ``[N]`` tensors. A row holding NaN, or only
    ``-inf``, gives NaN. Differentiable.

    >>> import torch, selfheal_ext as sh
    >>> entropy, max_prob = sh.ops.softmax_entropy(torch.zeros(2, 4))
    >>> [round(v, 4) for v in entropy.tolist()], max_prob.tolist()
    ([1.3863, 1.3863], [0.25, 0.25])
    """
    if not has_kernel("softmax_entropy", logits.device.type):
        return reference.softmax_entropy(logits)
    entropy, max_prob, _ = torch.ops.selfheal.softmax_entropy(logits)
    return entropy, max_prob


def histogram_update_(
    counts: torch.Tensor,
    nonfinite: torch.Tensor,
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> None:
    """Adds each column of ``x [N, F]`` to its row of ``counts [F, bins + 2]``, in place.

    Column 0 of ``counts`` is the underflow bin (``x < lo``), column ``bins + 1``
    the overflow bin (``x >= hi``), and column ``k + 1`` holds
    ``lo + k*w <= x < lo + (k+1)*w`` with ``w = (hi - lo) / bins``. NaN and ±Inf
    are counted in ``nonfinite [F]`` and never binned. ``counts`` and
    ``nonfinite`` are int64, ``lo``/``hi`` float32 ``[F]``. Exact: integer counts
    do not depend on the order or split of the data.

    >>> import torch, selfheal_ext as sh
    >>> counts, bad = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    >>> x = torch.tensor([[-1.0], [0.0], [0.5], [1.0], [float("nan")]])
    >>> sh.ops.histogram_update_(counts, bad, x, torch.zeros(1), torch.ones(1))
    >>> counts.tolist(), bad.tolist()
    ([[1, 1, 1, 1]], [1])
    """
    if not has_kernel("histogram_update_", x.device.type):
        reference.histogram_update_(counts, nonfinite, x, lo, hi)
        return
    _check_not_inference(counts, nonfinite)
    torch.ops.selfheal.histogram_update_(counts, nonfinite, x, lo, hi)


def sketch_histogram_update_(
    counts: torch.Tensor,
    nonfinite: torch.Tensor,
    x: torch.Tensor,
    bucket: torch.Tensor,
    weight: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> None:
    """Count-sketches each row of ``x [N, D]`` to ``F`` values and bins them, in place.

    Value ``j`` of a row is ``sum(weight[d] * x[n, d] for d with bucket[d] == j)``
    (float64 accumulation in input order, rounded to float32); those values are
    then counted exactly as ``histogram_update_`` counts the columns of an
    ``[N, F]`` tensor, with ``F = counts.shape[0]``. ``bucket`` is int64 ``[D]``
    with values in ``[0, F)``, ``weight`` float32 ``[D]`` (±1 for a count
    sketch). One pass over ``x`` with no ``[N, F]`` intermediate on the CPU; on
    CUDA the sketch is two ATen kernels followed by the fused histogram.
    A NaN/Inf input makes its bucket's value non-finite for that row.

    >>> import torch, selfheal_ext as sh
    >>> counts, bad = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    >>> x = torch.tensor([[0.25, 0.5], [1.0, -1.0]])  # sums 0.75 and 0.0
    >>> bucket, weight = torch.zeros(2, dtype=torch.long), torch.ones(2)
    >>> sh.ops.sketch_histogram_update_(counts, bad, x, bucket, weight, torch.zeros(1), torch.ones(1))
    >>> counts.tolist()
    [[0, 1, 1, 0]]
    """
    if not has_kernel("sketch_histogram_update_", x.device.type):
        reference.sketch_histogram_update_(counts, nonfinite, x, bucket, weight, lo, hi)
        return
    _check_not_inference(counts, nonfinite)
    torch.ops.selfheal.sketch_histogram_update_(counts, nonfinite, x, bucket, weight, lo, hi)


def kl_divergence(
    p_counts: torch.Tensor, q_counts: torch.Tensor, pseudo_count: float = 0.5
) -> torch.Tensor:
    """Per-row ``KL(P || Q)`` in nats between count tables ``[F, bins]``.

    Every bin gets ``pseudo_count`` (> 0; the default ½ is the
    Krichevsky–Trofimov estimator) before normalising, so the result is always
    finite. Counts may be int64, float32 or float64; the result is float32 ``[F]``.
    """
    if not has_kernel("kl_divergence", p_counts.device.type):
        return reference.kl_divergence(p_counts, q_counts, pseudo_count)
    return torch.ops.selfheal.kl_divergence(p_counts, q_counts, pseudo_count)


def js_divergence(
    p_counts: torch.Tensor, q_counts: torch.Tensor, pseudo_count: float = 0.5
) -> torch.Tensor:
    """Per-row Jensen–Shannon divergence in nats (between 0 and ln 2).

    ``pseudo_count >= 0``; a row with no mass at all gives 0. Float32 ``[F]``.
    """
    if not has_kernel("js_divergence", p_counts.device.type):
        return reference.js_divergence(p_counts, q_counts, pseudo_count)
    return torch.ops.selfheal.js_divergence(p_counts, q_counts, pseudo_count)


def _check_not_inference(counts: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """Plain PyTorch refuses an in-place update of an inference tensor outside
    inference mode; a custom op's kernel is not stopped by the dispatcher, so
    the wrappers refuse it (a traced graph has no inference tensors)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for name, table in (("counts", counts), ("nonfinite", nonfinite)):
        if table.is_inference():
            raise RuntimeError(f"selfheal: argument '{name}' must be a normal tensor (an in-place update to an "
                               f"inference tensor is only allowed inside torch.inference_mode()), got an "
                               f"inference tensor outside InferenceMode")


def _adapter_positions(x: torch.Tensor, channels_first: bool) -> int:
    if channels_first:
        return x.numel() // x.shape[1] if x.shape[1] else 0
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _adapter_output_shape(x, channels_out, channels_first):
    shape = list(x.shape)
    shape[1 if channels_first else -1] = channels_out
    return shape


def _register_fakes() -> None:
    @torch.library.register_fake("selfheal::adapter_forward")
    def _(x, base, down_weight, down_bias, up_weight, scale, shift, activation, channels_first):
        y = x.new_empty(_adapter_output_shape(x, up_weight.shape[0], channels_first))
        hidden_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        hidden = x.new_empty(
            (_adapter_positions(x, channels_first), down_weight.shape[0]), dtype=hidden_dtype
        )
        return y, hidden

    @torch.library.register_fake("selfheal::adapter_backward")
    def _(grad_y, x, hidden, down_weight, up_weight, scale, activation, channels_first,
          base_is_x, compute_grad_x):
        grad_x = x.new_empty(x.shape if compute_grad_x else (0,))
        grad_scale = up_weight.new_empty((up_weight.shape[0] if scale is not None else 0,))
        return (
            grad_x,
            down_weight.new_empty(down_weight.shape),
            down_weight.new_empty((down_weight.shape[0],)),
            up_weight.new_empty(up_weight.shape),
            grad_scale,
            up_weight.new_empty((up_weight.shape[0],)),
        )

    @torch.library.register_fake("selfheal::softmax_entropy")
    def _(logits):
        rows = logits.shape[0]
        return tuple(logits.new_empty((rows,), dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("selfheal::softmax_entropy_backward")
    def _(grad_entropy, grad_max_prob, logits, entropy, logsumexp):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("selfheal::histogram_update_")
    def _(counts, nonfinite, x, lo, hi):
        return None

    @torch.library.register_fake("selfheal::sketch_histogram_update_")
    def _(counts, nonfinite, x, bucket, weight, lo, hi):
        return None

    @torch.library.register_fake("selfheal::kl_divergence")
    def _(p_counts, q_counts, pseudo_count):
        return p_counts.new_empty((p_counts.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("selfheal::js_divergence")
    def _(p_counts, q_counts, pseudo_count):
        return p_counts.new_empty((p_counts.shape[0],), dtype=torch.float32)


def _adapter_setup_context(ctx, inputs, output):
    x, base, down_weight, down_bias, up_weight, scale, shift, activation, channels_first = inputs
    _, hidden = output
    # hidden is saved for the backward pass, not a result to differentiate.
    ctx.mark_non_differentiable(hidden)
    ctx.save_for_backward(x, hidden, down_weight, up_weight, scale)
    ctx.activation = activation
    ctx.channels_first = channels_first
    ctx.base_is_x = base is None
    ctx.has_bias = down_bias is not None
    ctx.has_shift = shift is not None


def _adapter_backward(ctx, grad_y, grad_hidden):
    x, hidden, down_weight, up_weight, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_down, grad_bias, grad_up, grad_scale, grad_shift = (
        torch.ops.selfheal.adapter_backward(
            grad_y, x, hidden, down_weight, up_weight, scale, ctx.activation,
            ctx.channels_first, ctx.base_is_x, needs[0],
        )
    )
    return (
        grad_x if needs[0] else None,
        grad_y if (needs[1] and not ctx.base_is_x) else None,
        grad_down,
        grad_bias if ctx.has_bias else None,
        grad_up,
        grad_scale if scale is not None else None,
        grad_shift if ctx.has_shift else None,
        None,
        None,
    )


def _softmax_entropy_setup_context(ctx, inputs, output):
    (logits,) = inputs
    entropy, _, logsumexp = output
    ctx.save_for_backward(logits, entropy, logsumexp)


def _softmax_entropy_backward(ctx, grad_entropy, grad_max_prob, grad_logsumexp):
    logits, entropy, logsumexp = ctx.saved_tensors
    zeros = torch.zeros_like(entropy)
    grad = torch.ops.selfheal.softmax_entropy_backward(
        zeros if grad_entropy is None else grad_entropy.float(),
        zeros if grad_max_prob is None else grad_max_prob.float(),
        logits,
        entropy,
        logsumexp,
    )
    if grad_logsumexp is not None:
        # d logsumexp / d logits = softmax(logits); only reached by callers of the raw op.
        probs = torch.softmax(logits.float(), dim=1)
        grad = grad + (grad_logsumexp.float().unsqueeze(1) * probs).to(grad.dtype)
    return grad


if LOADED:
    _register_fakes()
    # Under torch.autocast the adapter and the entropy run in float32 (their
    # inputs are cast up): activations in bf16/fp16 meet fp32 adapter weights,
    # and statistics keep full precision.
    for _op in ("selfheal::adapter_forward", "selfheal::softmax_entropy"):
        for _device in ("cpu", "cuda"):
            torch.library.register_autocast(_op, _device, torch.float32)
    torch.library.register_autograd(
        "selfheal::adapter_forward", _adapter_backward, setup_context=_adapter_setup_context
    )
    torch.library.register_autograd(
        "selfheal::softmax_entropy",
        _softmax_entropy_backward,
        setup_context=_softmax_entropy_setup_context,
    )
