"""Small tensor helpers the healer's parts share."""

from __future__ import annotations

import torch
from torch import nn


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """A boolean mask of the rows of ``x`` whose values are all finite."""
    if x.dim() == 0:
        raise ValueError("selfheal: a batch needs a batch dimension, got a 0-d tensor")
    if not x.is_floating_point() or x.numel() == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


def effective_classes(mean: torch.Tensor) -> float:
    """The exponential of the entropy of a mean class distribution: how many
    classes it is spread over."""
    mean = mean.clamp_min(1e-12)
    return float(torch.exp(-(mean * mean.log()).sum()))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def batch_inputs(batch):
    """The inputs of a calibration batch: ``x`` itself or the first element of ``(x, y)``."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return batch


def summed_over(process_group):
    """A function that sums a tensor over ``process_group``'s ranks (returns
    it as is without a group). It holds the group only, so a part given it
    keeps no reference to its owner (no reference cycle: a healer is freed
    as soon as it is dropped)."""
    def merge(values: torch.Tensor) -> torch.Tensor:
        if process_group is not None:
            import torch.distributed as dist
            values = values.clone()
            dist.all_reduce(values, group=process_group)
        return values
    return merge
