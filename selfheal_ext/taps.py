"""Feature taps: which layers a monitor watches, and how a layer's input
becomes a ``[N, F]`` feature table.

A tap reads the *input* of a module (a forward pre-hook), so tapping the
classifier head sees the penultimate features and tapping a block sees what the
block is given. Feature maps are pooled per channel; features wider than
``max_features`` are reduced by a fixed random projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from . import reference

_CHANNELS_FIRST_TYPES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GroupNorm,
)

TapSpec = Union[str, type]


@dataclass
class Tap:
    """One watched layer: ``name`` in ``model.named_modules()`` and its module."""

    name: str
    module: nn.Module
    pooling: str = "mean"  # "moments": per-channel mean and standard deviation

    @property
    def channels_first(self) -> bool:
        """A 3-D input is ``[N, C, L]`` for convolution/normalisation layers and
        ``[N, L, F]`` (a sequence) for everything else."""
        return isinstance(self.module, _CHANNELS_FIRST_TYPES)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def default_taps(model: nn.Module, count: int = 3) -> List[Tap]:
    """The inputs of the last ``count - 1`` blocks before the classifier head,
    and of the head itself.

    The head is the last ``nn.Linear`` registered in the model. Blocks are the
    model's direct children that hold parameters (descending through a single
    wrapping container, e.g. a model whose only child is an ``nn.Sequential``).
    """
    if count < 1:
        raise ValueError(f"selfheal: DriftMonitor needs at least one tap, got count={count}")
    named = dict(model.named_modules())
    head_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            head_name = name
    prefix, container = "", model
    while True:
        children = [(n, m) for n, m in container.named_children() if _has_parameters(m)]
        if len(children) == 1 and len(list(children[0][1].children())) > 0:
            prefix = f"{prefix}{children[0][0]}."
            container = children[0][1]
            continue
        break
    blocks = [f"{prefix}{n}" for n, _ in children]
    if head_name is None and not blocks:
        raise ValueError("selfheal: DriftMonitor found no layer with parameters to tap; "
                         "pass taps=[...] with module names")
    chosen: List[str] = []
    if head_name is not None:
        chosen.append(head_name)
        # A block that contains the head (or is the head) is not tapped twice.
        blocks = [b for b in blocks if not (head_name == b or head_name.startswith(b + "."))]
    for name in reversed(blocks):
        if len(chosen) >= count:
            break
        chosen.append(name)
    chosen.reverse()
    return [Tap(name, named[name]) for name in chosen]


def resolve_taps(model: nn.Module, taps: Optional[Sequence[TapSpec]], count: int = 3) -> List[Tap]:
    """Turns ``taps`` (module names and/or module types) into ``Tap`` objects in
    the model's registration order; ``None`` picks ``default_taps``."""
    if taps is None:
        return default_taps(model, count)
    if isinstance(taps, (str, type)):
        taps = [taps]
    named = dict(model.named_modules())
    chosen: List[str] = []
    for spec in taps:
        if isinstance(spec, str):
            if spec not in named:
                close = [n for n in named if n and spec in n][:5]
                raise ValueError(f"selfheal: no module named {spec!r} in the model"
                                 + (f"; did you mean one of {close}?" if close else ""))
            matches = [spec]
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            matches = [n for n, m in model.named_modules() if isinstance(m, spec)]
            if not matches:
                raise ValueError(f"selfheal: the model has no module of type {spec.__name__}")
        else:
            raise TypeError(f"selfheal: a tap is a module name or an nn.Module type, got {spec!r}")
        chosen.extend(m for m in matches if m not in chosen)
    order = {name: i for i, name in enumerate(named)}
    chosen.sort(key=order.__getitem__)
    return [Tap(name, named[name]) for name in chosen]


def first_tensor(args: Iterable) -> Optional[torch.Tensor]:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
    return None


POOLINGS = ("mean", "moments")


def pool_features(x: torch.Tensor, channels_first: bool, pooling: str = "mean") -> torch.Tensor:
    """``[N, F]`` per-sample features of a layer input: ``[N, C, *spatial]``
    maps are averaged per channel, ``[N, L, F]`` sequences per feature.
    ``pooling="moments"`` adds each channel's standard deviation (``[N, 2C]``):
    a raw image with few channels has almost nothing in its channel means —
    noise, blur and contrast changes leave them unchanged — and a great deal
    in their spread."""
    if x.dim() == 0:
        raise ValueError("selfheal: a tapped layer received a 0-d tensor; taps need a batch dimension")
    if x.dim() == 1:
        return x.unsqueeze(1)
    if x.dim() == 2:
        return x
    values = x.flatten(2) if (channels_first or x.dim() >= 4) else x.flatten(1, -2).transpose(1, 2)
    if pooling == "moments":
        if not values.is_floating_point():
            values = values.float()
        std, mean = torch.std_mean(values, dim=2, correction=0)
        return torch.cat([mean, std], dim=1)
    return values.mean(dim=2)


def random_projection(features: int, dim: int, seed: int) -> torch.Tensor:
    """A fixed sparse random projection ``[features, dim]`` (a count sketch:
    each input feature is added, with a random sign, to one random output),
    drawn from its own generator so it depends only on ``seed``. Sparse so the
    monitor's cost stays one pass over the features rather than a matmul as
    large as a layer of the model."""
    generator = torch.Generator().manual_seed(seed)
    bucket = torch.randperm(features, generator=generator) % dim
    sign = torch.randint(0, 2, (features,), generator=generator).float() * 2 - 1
    projection = torch.zeros(features, dim)
    projection[torch.arange(features), bucket] = sign
    return projection


def sketch_plan(projection: torch.Tensor):
    """``(bucket, sign)`` of a count-sketch projection, for ``apply_sketch``."""
    # Compared on the projection's own device: a CUDA monitor plans there.
    if bool(((projection != 0).sum(dim=1) != 1).any()):
        raise ValueError("selfheal: a tap projection must have exactly one non-zero per input feature")
    return projection.abs().argmax(dim=1), projection.sum(dim=1), projection.shape[1]


def apply_sketch(features: torch.Tensor, plan) -> torch.Tensor:
    """``features @ projection`` for a count sketch (float64 sums rounded to
    float32): the values ``ops.sketch_histogram_update_`` bins in one pass."""
    bucket, sign, dim = plan
    return reference.sketch(features, bucket, sign, dim)
