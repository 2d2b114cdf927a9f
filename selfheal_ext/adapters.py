"""Dormant adapters: small modules attached to an existing model by forward
hooks, exactly the identity until activated.

Three kinds:

* ``BottleneckAdapter`` — low-rank residual branch ``y = x + up(act(down(x)))``
  on a layer's output, computed by the fused adapter op (``ops.adapter``);
  channels-last ``[..., C]`` outputs (Linear, attention/MLP blocks) and
  channels-first ``[N, C, *spatial]`` maps (Conv1d/2d) without a permute.
* ``AffineAdapter`` — per-channel ``y = x * (1 + gamma) + beta``; on
  normalisation layers it adapts their affine parameters (as TENT does).
* ``NormStatsAdapter`` — BatchNorm statistics adaptation: the layer normalises
  with a mixture of the batch's statistics and the recent stream's (which
  start at the source's: a prior that works at batch size 1), or with slowly
  updated test statistics when batches are not diverse enough to trust
  (RoTTA's robust BN).

The model itself is never modified: adapters live in an ``AdapterSet`` and act
through hooks that return ``None`` (the output untouched, bit for bit) while
dormant. ``AdapterSet.remove()`` takes the hooks away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from . import ops

ADAPTER_KINDS = ("bottleneck", "affine", "norm")

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LINEAR_LIKE = (nn.Linear,)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _channels_first(module: nn.Module) -> bool:
    return isinstance(module, _CONVS) or isinstance(module, _BATCH_NORMS) or isinstance(module, nn.GroupNorm)


def _out_channels(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONVS):
        return module.out_channels
    if isinstance(module, _BATCH_NORMS):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        return shape[-1] if len(shape) == 1 else None
    return None


class BottleneckAdapter(nn.Module):
    """``y = x + up(act(down(x) + bias))`` over the channel dimension, fused.

    ``up`` starts at zero, so an activated, untrained adapter is still the
    identity; ``down`` is drawn with a fixed seed at ``1/sqrt(C)`` scale.
    """

    def __init__(self, channels: int, rank: int, channels_first: bool, activation: str = "gelu",
                 seed: int = 0):
        super().__init__()
        if not 1 <= rank <= 256:
            raise ValueError(f"selfheal: adapter rank must be in [1, 256], got {rank}")
        generator = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, channels, generator=generator) / math.sqrt(channels))
        self.bias = nn.Parameter(torch.zeros(rank))
        self.up = nn.Parameter(torch.zeros(channels, rank))
        self.channels_first = channels_first
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        down, bias, up = (p.to(dtype) if p.dtype != dtype else p for p in (self.down, self.bias, self.up))
        return ops.adapter(x, down, up, down_bias=bias, activation=self.activation,
                           channels_first=self.channels_first and x.dim() > 2)


class AffineAdapter(nn.Module):
    """``y = x * (1 + gamma) + beta`` per channel (zero-initialised)."""

    def __init__(self, channels: int, channels_first: bool):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        axis = 1 if (self.channels_first and x.dim() > 1) else x.dim() - 1
        shape[axis] = -1
        gamma = self.gamma.to(x.dtype).view(shape)
        beta = self.beta.to(x.dtype).view(shape)
        return torch.addcmul(x + beta, x, gamma)


class NormStatsAdapter(nn.Module):
    """Test-time statistics for a BatchNorm layer, with a prior from the
    recent stream.

    The adapter keeps ``running`` statistics: the moments of the recent stream
    (a mixture over about ``running_horizon`` samples, every batch folded in;
    they start at the source statistics, a copy taken at attach time). Active,
    a batch of ``n`` samples is normalised with ``w * batch + (1 - w) *
    running``, ``w = n / (n + prior * f)``: the recent stream's statistics are
    worth ``prior`` samples while the batch looks like it (a better estimate
    than one batch alone), and less as the batch departs from them (a drift
    that begins or changes). ``f = min(1, CHANGE_LEVEL / d)``, where ``d`` is
    the squared distance of the batch mean from the running mean in units of
    its sampling variance (the variance across the batch's samples of their
    per-channel means, over ``n``), averaged over channels.

    Batches under ``min_batch`` samples (batch size 1) use the running
    statistics alone, and so does robust mode, set by the healer when the
    batches hold classes in runs (label-ordered streams). Robust mode updates
    them slowly, over about ``robust_horizon`` samples (RoTTA's robust BN: a
    window long enough to span many runs), so a run of one class moves them
    little while a drift that persists is still followed; a batch found to be
    a run only after it was served is folded in again that way
    (``refold_robust``). A layer marked ``class_agnostic`` (set by the
    healer's calibration: a batch of one class barely moves its statistics,
    as at the first convolution of an image model, which sees strokes and
    edges rather than digits) ignores robust mode: its batch statistics say
    nothing about which classes the batch holds, and a drift shows in them
    at once. The layer's own buffers are never written.
    """

    # ``d`` above which the running statistics' weight shrinks (``f < 1``).
    # On the healing benchmark's streams ``d`` is 0.1-1.4 (10th-90th
    # percentile) while a drift holds steady, and tens to thousands where
    # one begins or changes; 1 and 2 gave the same accuracies there.
    CHANGE_LEVEL = 1.5

    def __init__(self, norm: nn.Module, prior: float = 128.0, running_horizon: float = 128.0, min_batch: int = 16,
                 robust_horizon: float = 4096.0):
        super().__init__()
        if not isinstance(norm, _BATCH_NORMS) or norm.running_mean is None:
            raise TypeError("selfheal: NormStatsAdapter needs a BatchNorm layer with running statistics")
        self.prior = float(prior)
        self.running_horizon = float(running_horizon)
        self.robust_horizon = float(robust_horizon)
        self.min_batch = int(min_batch)
        self.register_buffer("source_mean", norm.running_mean.detach().clone().float())
        self.register_buffer("source_var", norm.running_var.detach().clone().float())
        self.register_buffer("running_mean", self.source_mean.clone())
        self.register_buffer("running_var", self.source_var.clone())
        self.robust = False  # set by the healer per batch
        self.class_agnostic = False  # set by the healer's calibration: robust mode does not apply
        self.update_running = True  # False during re-forwards of the same batch
        # the last batch's fold into the running statistics (see refold_robust)
        self._last_fold = None

    def reset_running(self) -> None:
        self.running_mean.copy_(self.source_mean)
        self.running_var.copy_(self.source_var)
        self._last_fold = None

    @torch.no_grad()
    def _fold(self, fold, horizon: float) -> None:
        """Sets the running statistics to the moments of the mixture of
        ``fold``'s earlier running statistics and its batch, the batch worth
        ``count / (count + horizon)``: a batch of one has no variance of its
        own, its distance to the running mean supplies it; a non-finite batch
        changes nothing."""
        mean, var, batch_mean, batch_var, finite, count, _ = fold
        m = count / (count + horizon)
        delta = torch.where(finite, batch_mean - mean, 0.0)
        updated = (1 - m) * var + m * batch_var + m * (1 - m) * delta * delta
        self.running_var.copy_(torch.where(finite, updated, var))
        self.running_mean.copy_(mean + m * delta)

    def refold_robust(self) -> None:
        """Folds the last batch in again as robust mode would have, over
        ``robust_horizon`` (the healer found, after serving it, that the batch
        was a run of classes: it must not move the recent stream's moments
        by a third). Nothing to do when it already was, after a reset, or
        on a ``class_agnostic`` layer (robust mode does not apply to it)."""
        fold = self._last_fold
        if fold is not None and fold[-1] != self.robust_horizon and not self.class_agnostic:
            self._last_fold = fold[:-1] + (self.robust_horizon,)
            self._fold(self._last_fold, self.robust_horizon)

    def statistics(self, x: torch.Tensor):
        """Mean and variance per channel for input ``x [N, C, *]`` of the layer."""
        if x.shape[0] == 0:  # an empty batch: nothing to estimate from, nothing folded in
            if self.update_running:
                self._last_fold = None
            return self.running_mean, self.running_var
        dims = [0] + list(range(2, x.dim()))
        values = x.float()
        # A NaN/Inf anywhere in x shows up in both moments. On the CPU two
        # passes (mean, then mean squared deviation) beat var_mean over
        # (0, 2, 3) by 3-7x (0.62 vs 2.05 ms for [64, 16, 16, 16], one thread);
        # elsewhere var_mean is one kernel rather than three.
        if values.device.type == "cpu":
            batch_mean = values.mean(dim=dims)
            deviation = values - batch_mean.view([1, -1] + [1] * (values.dim() - 2))
            batch_var = (deviation * deviation).mean(dim=dims)
        else:
            batch_var, batch_mean = torch.var_mean(values, dim=dims, unbiased=False)
        # A 0-d flag, used through torch.where: no host read on the serving path.
        finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()
        # Counted in samples: the values of one sample's feature map are
        # correlated, so a single image must not outweigh the prior.
        count = values.shape[0]
        robust = self.robust and not self.class_agnostic
        if self.update_running:
            horizon = self.robust_horizon if robust else self.running_horizon
            self._last_fold = (self.running_mean.clone(), self.running_var.clone(), batch_mean.detach(),
                               batch_var.detach(), finite, count, horizon)
            self._fold(self._last_fold, horizon)
        if robust or count < self.min_batch:
            # small batches: the recent stream's statistics (this batch included)
            return self.running_mean, self.running_var
        running_mean, running_var = self.running_mean, self.running_var
        agreement = self._agreement(values, batch_mean, count)
        if values.device.type == "cpu":
            agreement = float(agreement)  # (no device to wait for: the mixing below is then scalar arithmetic)
        weight = count / (count + self.prior * agreement)
        mean = weight * batch_mean + (1 - weight) * running_mean
        # total variance of the mixture: within + between components
        var = (weight * batch_var + (1 - weight) * running_var
               + weight * (1 - weight) * (batch_mean - running_mean) ** 2)
        # The values are the mixture's; the gradient is the batch's own
        # statistics' (as in TENT), not ``weight`` times it: the prior steadies
        # the values, it does not mute how the entropy of the batch responds
        # to its own statistics. (With the true gradient, the digits
        # benchmark's continual stream lost 0.6 points: contrast-2 fell from
        # 93.5 to 89.1 while the adapters trained.)
        if batch_mean.requires_grad:
            mean = mean.detach() + (batch_mean - batch_mean.detach())
            var = var.detach() + (batch_var - batch_var.detach())
        return torch.where(finite, mean, running_mean), torch.where(finite, var, running_var)

    def _agreement(self, values: torch.Tensor, batch_mean: torch.Tensor, count: int) -> torch.Tensor:
        """``f`` of the class docstring (0-d): 1 while the batch mean lies
        within about ``CHANGE_LEVEL`` sampling variances of the running mean
        (this batch folded in: the same value when the batch is forwarded
        again with ``update_running`` off), shrinking as it departs. Computed
        on the device, no host read."""
        if self.prior == 0 or count < 2:
            return batch_mean.new_ones(())
        with torch.no_grad():  # (a weight of values only: the gradient goes through the batch's statistics)
            values, batch_mean = values.detach(), batch_mean.detach()
            sample_means = values.flatten(2).mean(dim=2) if values.dim() > 2 else values  # [N, C]
            # the batch mean's sampling variance is the samples' variance / count
            # (two passes over [N, C]: aten::var over dim 0 is ~60 us on the CPU)
            spread = (sample_means - batch_mean).square_().sum(dim=0).div_(count - 1).clamp_min_(1e-12)
            distance = torch.mean((batch_mean - self.running_mean).square_() / spread) * count
            return (self.CHANGE_LEVEL / distance).clamp(max=1.0)

    def normalise(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.statistics(x)
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.float()
        shift = -mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias.float()
        shape = [1, -1] + [1] * (x.dim() - 2)
        # one fused pass: y = x * scale + shift
        return torch.addcmul(shift.view(shape), x.float(), scale.view(shape)).to(x.dtype)


@dataclass
class Placement:
    """Where one adapter sits: on the output of module ``target``."""
    target: str
    kind: str
    channels: int
    channels_first: bool
    rank: int = 0
    parameters: int = 0


class AdapterSet(nn.Module):
    """The adapters attached to one model, their hooks and their state.

    ``active`` switches all of them at once; dormant, every hook returns
    ``None`` and the model's outputs are bit-identical to the original's.
    """

    def __init__(self, model: nn.Module, placements: Sequence[Placement], activation: str = "gelu",
                 norm_prior: float = 128.0, seed: int = 0, robust_horizon: float = 4096.0):
        super().__init__()
        named = dict(model.named_modules())
        self.placements = list(placements)
        self.modules_by_key = nn.ModuleDict()
        self._handles = []
        self.active = False
        # active with only the statistics adapters applied (the healer's
        # batch-statistics check: its levels are calibrated at the source)
        self.statistics_only = False
        self.model_parameters = sum(p.numel() for p in model.parameters())
        for index, placement in enumerate(self.placements):
            module = named.get(placement.target)
            if module is None:
                raise ValueError(f"selfheal: no module named {placement.target!r} in the model")
            key = _key(placement)
            if placement.kind == "bottleneck":
                adapter = BottleneckAdapter(placement.channels, placement.rank, placement.channels_first,
                                            activation, seed=seed + index)
            elif placement.kind == "affine":
                adapter = AffineAdapter(placement.channels, placement.channels_first)
            elif placement.kind == "norm":
                adapter = NormStatsAdapter(module, prior=norm_prior, robust_horizon=robust_horizon)
            else:
                raise ValueError(f"selfheal: adapter kind must be one of {ADAPTER_KINDS}, got {placement.kind!r}")
            placement.parameters = sum(p.numel() for p in adapter.parameters())
            self.modules_by_key[key] = adapter
            self._handles.append(module.register_forward_hook(self._make_hook(placement, adapter, module)))
        # Parameters and buffers follow the model's device and dtype.
        reference = next(iter(model.parameters()), None)
        if reference is not None:
            self.to(device=reference.device)

    def _make_hook(self, placement: Placement, adapter: nn.Module, module: nn.Module):
        if placement.kind == "norm":
            def hook(mod, args, output):
                if not self.active:
                    return None
                return adapter.normalise(module, args[0])
        else:
            def hook(mod, args, output):
                if not self.active or self.statistics_only or not isinstance(output, torch.Tensor):
                    return None
                return adapter(output)
        return hook

    # ------------------------------------------------------------------ queries

    def check_state(self, state, what: str = "state") -> None:
        """Raises ``ValueError`` unless ``state`` holds exactly this set's
        tensors, each with its shape and dtype, all finite. ``load_state_dict``
        calls it before writing anything, so a refused state changes nothing
        (``nn.Module.load_state_dict`` copies the tensors that fit before it
        reports the ones that do not, and converts dtypes silently)."""
        if not isinstance(state, dict):
            raise TypeError(f"selfheal: the {what} must be a dict of tensors, got {type(state).__name__}")
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"selfheal: the {what}: adapters do not match this model's "
                             f"(missing {missing}, unexpected {unexpected})")
        for name, mine in own.items():
            theirs = state[name]
            if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                got = (f"{theirs.dtype} {tuple(theirs.shape)}" if isinstance(theirs, torch.Tensor)
                       else type(theirs).__name__)
                raise ValueError(f"selfheal: the {what}'s tensor {name!r} must be {mine.dtype} "
                                 f"{tuple(mine.shape)} (this model's), got {got}")
            if theirs.is_floating_point() and not bool(torch.isfinite(theirs).all()):
                raise ValueError(f"selfheal: the {what}'s tensor {name!r} holds NaN or Inf")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after ``check_state`` (strict loads):
        all or nothing."""
        if strict:
            self.check_state(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def budget_fraction(self) -> float:
        return self.parameter_count / max(self.model_parameters, 1)

    def norm_adapters(self) -> List[NormStatsAdapter]:
        return [m for m in self.modules_by_key.values() if isinstance(m, NormStatsAdapter)]

    def trainable(self) -> List[nn.Parameter]:
        return [p for p in self.parameters()]

    def summary(self) -> str:
        lines = [f"{len(self.placements)} adapters, {self.parameter_count} parameters "
                 f"({100 * self.budget_fraction:.2f}% of the model's {self.model_parameters})"]
        for placement in self.placements:
            rank = f" rank {placement.rank}" if placement.kind == "bottleneck" else ""
            lines.append(f"  {placement.target}: {placement.kind}{rank}, {placement.parameters} parameters")
        return "\n".join(lines)

    # ------------------------------------------------------------------ control

    def reset_parameters(self) -> None:
        """Back to the freshly attached state (identity when activated)."""
        with torch.no_grad():
            for key, adapter in self.modules_by_key.items():
                if isinstance(adapter, BottleneckAdapter):
                    adapter.up.zero_()
                    adapter.bias.zero_()
                elif isinstance(adapter, AffineAdapter):
                    adapter.gamma.zero_()
                    adapter.beta.zero_()
                elif isinstance(adapter, NormStatsAdapter):
                    adapter.reset_running()

    def set_robust(self, robust: bool) -> None:
        for adapter in self.norm_adapters():
            adapter.robust = robust

    def refold_robust(self) -> None:
        """See ``NormStatsAdapter.refold_robust``."""
        for adapter in self.norm_adapters():
            adapter.refold_robust()

    def set_update_running(self, update: bool) -> None:
        for adapter in self.norm_adapters():
            adapter.update_running = update

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.active = False


def healing_summary(adapters: AdapterSet) -> str:
    """One line saying what healing a model gets from its adapters: the
    BatchNorm statistics adapters carry most of it; a model without BatchNorm
    gets only the trained affine and bottleneck adapters."""
    counts = {kind: sum(1 for p in adapters.placements if p.kind == kind) for kind in ADAPTER_KINDS}
    parts = [f"{counts[kind]} {kind}" for kind in ADAPTER_KINDS]
    text = f"adapters {', '.join(parts)} ({adapters.parameter_count} parameters)"
    if counts.get("norm", 0):
        return text + "; healing through BatchNorm statistics and trained adapters"
    return text + ("; no BatchNorm layer, so no statistics healing: trained adapters only, which on "
                   "LayerNorm and norm-free models have not been measured to recover accuracy")


def _key(placement: Placement) -> str:
    return f"{placement.target.replace('.', '__') or 'model'}__{placement.kind}"


def plan_adapters(model: nn.Module, budget: float = 0.05, targets: Optional[Iterable[Union[str, type]]] = None,
                  kinds: Sequence[str] = ADAPTER_KINDS, max_rank: int = 16, exclude: Sequence[str] = ()) -> List[Placement]:
    """Chooses adapter placements within ``budget`` (a fraction of the model's
    parameters).

    Automatic placement: BatchNorm layers get statistics adaptation (no
    parameters) and, like LayerNorm/GroupNorm, a per-channel affine adapter;
    then low-rank bottlenecks go on the outputs of Linear/Conv layers from the
    deepest up (the classifier head, the last Linear, is left alone: its output
    is the logits), each at the largest rank up to ``max_rank`` that still fits.
    ``targets`` (module names or types) restricts the candidates.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"selfheal: budget must be a fraction in (0, 1], got {budget}")
    unknown = set(kinds) - set(ADAPTER_KINDS)
    if unknown:
        raise ValueError(f"selfheal: adapter kinds must be among {ADAPTER_KINDS}, got {sorted(unknown)}")
    named = [(name, module) for name, module in model.named_modules() if name]
    total = sum(p.numel() for p in model.parameters())
    allowed = int(budget * total)
    linears = [name for name, module in named if isinstance(module, nn.Linear)]
    head = linears[-1] if linears else None
    candidates = []
    for name, module in named:
        if name in exclude or name == head:
            continue
        if targets is not None and not _matches(name, module, targets):
            continue
        candidates.append((name, module))
    if targets is not None and not candidates:
        raise ValueError(f"selfheal: no module matches the adapter targets {list(targets)!r}")

    placements: List[Placement] = []
    used = 0
    for name, module in candidates:
        channels = _out_channels(module)
        if channels is None or not isinstance(module, _NORMS):
            continue
        first = _channels_first(module)
        if "norm" in kinds and isinstance(module, _BATCH_NORMS) and module.running_mean is not None:
            placements.append(Placement(name, "norm", channels, first))
        if "affine" in kinds and used + 2 * channels <= allowed:
            placements.append(Placement(name, "affine", channels, first))
            used += 2 * channels
    if "bottleneck" in kinds:
        for name, module in reversed(candidates):
            if not isinstance(module, _LINEAR_LIKE + _CONVS):
                continue
            channels = _out_channels(module)
            rank = min(max_rank, max(1, channels // 4))
            while rank >= 1 and used + rank * (2 * channels + 1) > allowed:
                rank //= 2
            if rank < 1:
                continue
            placements.append(Placement(name, "bottleneck", channels, _channels_first(module), rank))
            used += rank * (2 * channels + 1)
    order = {name: i for i, (name, _) in enumerate(named)}
    # On one module the hooks run in this order: statistics, then affine, then bottleneck.
    stacking = ("norm", "affine", "bottleneck")
    placements.sort(key=lambda p: (order[p.target], stacking.index(p.kind)))
    if not placements:
        raise ValueError("selfheal: no adapter fits: the model has no Linear/Conv/norm layer besides its head "
                         f"within a budget of {budget:.3g} of {total} parameters")
    return placements


def _matches(name: str, module: nn.Module, targets) -> bool:
    for spec in targets:
        if isinstance(spec, str) and spec == name:
            return True
        if isinstance(spec, type) and isinstance(module, spec):
            return True
    return False


def attach_adapters(model: nn.Module, budget: float = 0.05, targets=None, kinds: Sequence[str] = ADAPTER_KINDS,
                    max_rank: int = 16, activation: str = "gelu", norm_prior: float = 128.0,
                    seed: int = 0, robust_horizon: float = 4096.0) -> AdapterSet:
    """Plans and attaches dormant adapters to ``model`` (see ``plan_adapters``;
    ``robust_horizon``: see ``NormStatsAdapter``)."""
    placements = plan_adapters(model, budget=budget, targets=targets, kinds=kinds, max_rank=max_rank)
    return AdapterSet(model, placements, activation=activation, norm_prior=norm_prior, seed=seed,
                      robust_horizon=robust_horizon)
