"""The label-free objective of an adaptation step.

Reliable, non-redundant, certainty-weighted entropy (EATA, Niu et al., ICML
2022, eqs. 3-6), plus a Fisher anchor to the source adapters (EWC, Kirkpatrick
et al., PNAS 2017; EATA eq. 9):

    S  = { i : H(p_i) < E_0 }                          E_0 = margin * ln C       (reliable)
    S' = { i in S : cos(p_i, m) < 1 - redundancy }     m: moving mean of the selected p_i (non-redundant)
    L  = 1/|S'| sum_{i in S'} exp(-(H(p_i) - E_0)) H(p_i)                        (certainty weights, not back-propagated)
       + anchor * sum_k F_k (theta_k - theta_k^source)^2

with ``m <- 0.9 m + 0.1 mean_{S'} p_i`` after each step (EATA's moving
average). ``F`` is the diagonal Fisher of the adapter parameters at the source,
from cross-entropy with the model's own argmax on the calibration data.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..adapters import AdapterSet
from .tensors import batch_inputs, finite_rows

# EATA's moving average of the selected samples' mean prediction (its code's 0.9/0.1).
_MEAN_MOMENTUM = 0.1
# Floor of the Fisher, relative to its mean: every parameter stays anchored a
# little (a zero-initialised up-projection makes the down-projection's Fisher
# exactly zero). Heuristic.
_FISHER_FLOOR = 0.01
# Calibration batches the Fisher is estimated on (heuristic: enough for a diagonal estimate).
FISHER_BATCHES = 32


def reliable_entropy(logits: torch.Tensor, margin: float, redundancy: float,
                     mean_probs: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int, Optional[torch.Tensor]]:
    """The entropy term ``L`` above for ``logits`` [N, C]: ``(loss, |S'|,
    the updated moving mean m)``; ``margin`` is E_0 / ln C. With no
    selected sample the loss is a zero that keeps the graph."""
    entropy, _ = ops.softmax_entropy(logits.float())
    threshold = margin * math.log(logits.shape[1])
    probs = torch.softmax(logits.detach().float(), dim=1)
    selected = entropy.detach() < threshold
    if mean_probs is not None and redundancy > 0:
        similarity = nn.functional.cosine_similarity(probs, mean_probs.unsqueeze(0), dim=1)
        selected &= similarity < 1 - redundancy
    count = int(selected.sum())
    if not count:
        return entropy.sum() * 0.0, 0, mean_probs
    weights = torch.exp(-(entropy.detach()[selected] - threshold))
    loss = (weights * entropy[selected]).sum() / count
    chosen = probs[selected].mean(dim=0)
    mean_probs = chosen if mean_probs is None else (1 - _MEAN_MOMENTUM) * mean_probs + _MEAN_MOMENTUM * chosen
    return loss, count, mean_probs


def fisher_anchor(fisher: Dict[str, torch.Tensor], parameters: Dict[str, torch.Tensor],
                  source: Dict[str, torch.Tensor]):
    """``sum_k F_k (theta_k - theta_k^source)^2`` over the parameters the Fisher covers."""
    return sum((fisher[name] * (p - source[name]) ** 2).sum() for name, p in parameters.items() if name in fisher)


def fit_fisher(model: nn.Module, adapters: AdapterSet, batches: Iterable, logits: Callable,
               device: torch.device) -> Dict[str, torch.Tensor]:
    """The diagonal Fisher of the adapter parameters at the source (adapters
    active, at identity), from the first ``FISHER_BATCHES`` calibration
    batches' finite rows. Leaves the adapters dormant with their running
    statistics updating; the caller restores their source values."""
    parameters = dict(adapters.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
    if not parameters:
        return fisher
    samples = 0
    adapters.active = True
    adapters.set_update_running(False)
    try:
        for batch in list(batches)[:FISHER_BATCHES]:
            x = batch_inputs(batch).to(device)
            x = x[finite_rows(x)]
            if x.shape[0] == 0:
                continue
            for p in parameters.values():
                p.grad = None
            with torch.enable_grad():
                for p in parameters.values():
                    p.requires_grad_(True)
                output = logits(model(x)).float()
                loss = nn.functional.cross_entropy(output, output.argmax(dim=1), reduction="sum")
                loss.backward()
            for name, p in parameters.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach() ** 2 / x.shape[0]
            samples += 1
    finally:
        for p in parameters.values():
            p.grad = None
        adapters.active = False
        adapters.set_update_running(True)
    scale = max(samples, 1)
    total = [f / scale for f in fisher.values()]
    mean = torch.cat([f.flatten() for f in total]).mean().item() if total else 0.0
    floor = max(mean * _FISHER_FLOOR, 1e-8)
    return {name: f / scale + floor for name, f in fisher.items()}


def distance_from(parameters: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor]) -> float:
    """The L2 distance of all ``parameters`` from their source values (one host read)."""
    with torch.no_grad():
        total = sum(((p - source[name]) ** 2).sum() for name, p in parameters.items())
    return math.sqrt(float(total))


def project_within(parameters: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor], cap: float) -> float:
    """Scales the parameters' displacement from the source back to at most
    ``cap`` (L2), in place; returns their distance afterwards."""
    shift = distance_from(parameters, source)
    if shift > cap:
        factor = cap / shift
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(source[name] + (p - source[name]) * factor)
        shift = cap
    return shift
