"""Pure-PyTorch definitions of every selfheal op.

These functions are the oracle the tests compare the fused kernels against, the
eager baseline the benchmarks time, and the fallback ``selfheal_ext.ops`` uses
when the compiled extension has no kernel for a device. They compute in the
dtype they are given (like eager PyTorch code would), except where an op's
contract fixes float32 or float64 arithmetic (statistics, divergences).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "gelu", "silu")


def activation_fn(name: str):
    """The elementwise activation for an adapter, by name."""
    if name == "identity":
        return lambda h: h
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as the kernels compute it
    if name == "silu":
        return F.silu
    raise ValueError(
        f"selfheal: argument 'activation' must be one of {ACTIVATIONS}, got {name!r}"
    )


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
    """``y = base + scale * up(act(down(x) + down_bias)) + shift``.

    ``x`` is ``[..., C_in]`` (channels-last) or ``[N, C_in, *spatial]``
    (channels-first); ``down_weight`` is ``[r, C_in]``, ``up_weight`` is
    ``[C_out, r]``, ``scale`` and ``shift`` are per output channel. ``base``
    defaults to ``x`` (a bottleneck adapter, which needs ``C_out == C_in``).
    """
    act = activation_fn(activation)
    xc = x.movedim(1, -1) if channels_first else x
    hidden = xc @ down_weight.t()
    if down_bias is not None:
        hidden = hidden + down_bias
    branch = act(hidden) @ up_weight.t()
    if scale is not None:
        branch = branch * scale
    if shift is not None:
        branch = branch + shift
    if channels_first:
        branch = branch.movedim(-1, 1)
    return (x if base is None else base) + branch


def softmax_entropy(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row entropy (nats) and maximum probability of ``softmax(logits)``.

    ``logits`` is ``[N, C]``; both results are float32 ``[N]``. Computed in
    float32 whatever the input dtype (or float64 for float64 input).
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    # gather at argmax (the first maximum), not amax: at ties the gradient goes
    # to that one class, as the kernels define it, instead of being split.
    max_prob = p.gather(-1, z.argmax(dim=-1, keepdim=True)).squeeze(-1)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return entropy.to(out_dtype), max_prob.to(out_dtype)


def histogram_bin_index(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int):
    """Column of ``counts`` each value of ``x [N, F]`` falls in.

    Column 0 is the underflow bin (``x < lo``), ``bins + 1`` the overflow bin
    (``x >= hi``); regular bin ``k`` (column ``k + 1``) holds
    ``lo + k*w <= x < lo + (k+1)*w`` with ``w = (hi - lo) / bins``. The position
    is computed in float64 as ``floor((x - lo) * bins / (hi - lo))``, which is
    exact for values on the edges. Non-finite values get index -1.
    """
    xd = x.double()
    lod = lo.double()
    hid = hi.double()
    q = torch.floor((xd - lod) * bins / (hid - lod))
    q = torch.nan_to_num(q, nan=0.0).clamp(0, bins - 1)
    index = torch.where(xd < lod, 0, torch.where(xd >= hid, bins + 1, q.long() + 1))
    return torch.where(torch.isfinite(xd), index, -1)


def histogram_update_(
    counts: torch.Tensor,
    nonfinite: torch.Tensor,
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> None:
    """Adds the values of ``x [N, F]`` to ``counts [F, bins + 2]`` in place.

    NaN and ±Inf are counted in ``nonfinite [F]`` and never binned.
    """
    _check_histogram_args(counts, nonfinite, x, lo, hi)
    features, width = counts.shape
    bins = width - 2
    index = histogram_bin_index(x, lo, hi, bins)
    finite = index >= 0
    feature = torch.arange(features, device=x.device).expand_as(index)
    flat = (feature * width + index)[finite]
    counts.add_(torch.bincount(flat, minlength=features * width).view(features, width))
    nonfinite.add_((~finite).sum(dim=0))


def sketch(x: torch.Tensor, bucket: torch.Tensor, weight: torch.Tensor, features: int) -> torch.Tensor:
    """Count sketch ``[N, features]`` of ``x [N, D]``: value ``j`` of a row is
    ``sum(weight[d] * x[d] for d with bucket[d] == j)``, accumulated in float64
    and rounded to float32 (the values ``sketch_histogram_update_`` bins)."""
    terms = x.float().double() * weight.double()
    return terms.new_zeros(x.shape[0], features).index_add_(1, bucket, terms).float()


def sketch_histogram_update_(
    counts: torch.Tensor,
    nonfinite: torch.Tensor,
    x: torch.Tensor,
    bucket: torch.Tensor,
    weight: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> None:
    """``histogram_update_(counts, nonfinite, sketch(x, bucket, weight, F), lo, hi)``
    with ``F = counts.shape[0]``."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"selfheal: argument 'x' must be a 2-D floating tensor [N, D], got {x.dtype} {tuple(x.shape)}")
    width = x.shape[1]
    if bucket.dtype != torch.int64 or tuple(bucket.shape) != (width,):
        raise ValueError(f"selfheal: argument 'bucket' must be an int64 tensor of shape [{width}], "
                         f"got {bucket.dtype} {tuple(bucket.shape)}")
    if weight.dtype != torch.float32 or tuple(weight.shape) != (width,):
        raise ValueError(f"selfheal: argument 'weight' must be a float32 tensor of shape [{width}], "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if counts.dim() != 2 or counts.shape[0] < 1:
        raise ValueError(f"selfheal: argument 'counts' must be a 2-D tensor [F, bins + 2] with F >= 1, "
                         f"got {counts.dtype} {tuple(counts.shape)}")
    features = counts.shape[0]
    if width and (int(bucket.min()) < 0 or int(bucket.max()) >= features):
        raise ValueError(f"selfheal: argument 'bucket' must hold values in [0, {features}), "
                         f"got values in [{int(bucket.min())}, {int(bucket.max())}]")
    values = sketch(x, bucket, weight, features)
    histogram_update_(counts, nonfinite, values, lo, hi)


def _check_histogram_args(counts, nonfinite, x, lo, hi):
    """The kernels' argument checks, so the fallback never writes half an update."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"selfheal: argument 'x' must be a 2-D floating tensor [N, F], got {x.dtype} {tuple(x.shape)}")
    features = x.shape[1]
    if counts.dtype != torch.int64 or counts.dim() != 2 or counts.shape[0] != features or counts.shape[1] < 3:
        raise ValueError(f"selfheal: argument 'counts' must be an int64 tensor of shape [{features}, bins + 2], "
                         f"got {counts.dtype} {tuple(counts.shape)}")
    if nonfinite.dtype != torch.int64 or tuple(nonfinite.shape) != (features,):
        raise ValueError(f"selfheal: argument 'nonfinite' must be an int64 tensor of shape [{features}], "
                         f"got {nonfinite.dtype} {tuple(nonfinite.shape)}")
    for name, table in (("counts", counts), ("nonfinite", nonfinite)):
        if table.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"selfheal: argument '{name}' must be a normal tensor (an in-place update "
                               f"to an inference tensor is only allowed inside torch.inference_mode()), "
                               f"got an inference tensor outside InferenceMode")
    for name, edge in (("lo", lo), ("hi", hi)):
        if edge.dtype != torch.float32 or tuple(edge.shape) != (features,):
            raise ValueError(f"selfheal: argument '{name}' must be a float32 tensor of shape [{features}], "
                             f"got {edge.dtype} {tuple(edge.shape)}")


def _smoothed_counts(counts: torch.Tensor, pseudo_count: float, name: str):
    """``counts + pseudo_count`` in float64 and its row totals, which must be finite."""
    bins = counts.shape[1] if counts.dim() == 2 else 0
    if not pseudo_count * bins < float("inf"):
        raise ValueError(f"selfheal: argument 'pseudo_count' must be small enough that "
                         f"pseudo_count * bins is a finite float64, got {pseudo_count} with {bins} bins")
    smoothed = counts.double() + pseudo_count
    total = smoothed.sum(dim=1, keepdim=True)
    if not bool(torch.isfinite(total).all()):
        raise ValueError(f"selfheal: argument '{name}' must have rows whose counts plus "
                         f"pseudo_count * bins sum to a finite float64, got a sum of inf")
    return smoothed, total


def _smoothed(counts: torch.Tensor, pseudo_count: float, name: str) -> torch.Tensor:
    smoothed, total = _smoothed_counts(counts, pseudo_count, name)
    return smoothed / torch.where(total > 0, total, torch.ones_like(total))


def kl_divergence(p_counts: torch.Tensor, q_counts: torch.Tensor, pseudo_count: float = 0.5):
    """Per-row ``KL(P || Q)`` in nats between count tables ``[F, bins]``.

    Each row becomes a distribution after adding ``pseudo_count`` (> 0) to every
    bin, so the result is always finite: ``log(p / q)`` is taken as
    ``log(p_count + c) - log(q_count + c) + log(q_total / p_total)``, finite even
    where a probability underflows to 0. Rows whose smoothed total overflows
    float64 are refused. Float32 result ``[F]``.
    """
    if not pseudo_count > 0:
        raise ValueError(f"selfheal: argument 'pseudo_count' must be finite and > 0 "
                         f"(KL is infinite without smoothing), got {pseudo_count}")
    p_smoothed, p_total = _smoothed_counts(p_counts, pseudo_count, "p_counts")
    q_smoothed, q_total = _smoothed_counts(q_counts, pseudo_count, "q_counts")
    p = p_smoothed / p_total
    log_ratio = (torch.log(p_smoothed) - torch.log(q_smoothed)) + (torch.log(q_total) - torch.log(p_total))
    kl = torch.where(p > 0, p * log_ratio, torch.zeros_like(p))
    return kl.sum(dim=1).float()


def js_divergence(p_counts: torch.Tensor, q_counts: torch.Tensor, pseudo_count: float = 0.5):
    """Per-row Jensen-Shannon divergence in nats (at most ln 2), ``pseudo_count >= 0``.

    A row with no mass at all (no counts and no pseudo-count) gives 0.
    """
    p = _smoothed(p_counts, pseudo_count, "p_counts")
    q = _smoothed(q_counts, pseudo_count, "q_counts")
    m = 0.5 * (p + q)
    log_m = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
    kl_pm = torch.special.xlogy(p, p) - p * log_m
    kl_qm = torch.special.xlogy(q, q) - q * log_m
    js = 0.5 * (kl_pm.sum(dim=1) + kl_qm.sum(dim=1))
    empty = (p.sum(dim=1) == 0) | (q.sum(dim=1) == 0)
    return torch.where(empty, 0.0, js.clamp_min(0.0)).float()
