"""Windows over a stream of per-batch statistics.

A batch contributes an integer table (histogram counts, non-finite counts,
sample counts: everything that is a count) and a float64 vector (sums of
entropies and confidences). ``SlidingWindow`` keeps the last ``size`` samples
exactly: integer totals are updated by adding and subtracting whole chunks, so
they never drift. ``ExponentialWindow`` weighs a sample ``age`` samples old by
``decay ** age`` and reports its effective sample size.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch


class SlidingWindow:
    """The most recent ``size`` samples, at the granularity of chunks.

    Batches are merged into chunks of at least ``size // chunks`` samples; the
    window holds the newest chunks covering at least ``size`` samples and
    drops the oldest chunk as soon as the rest still cover ``size``. So it
    always holds between ``size`` and ``size + chunk + batch`` samples once
    full, and at most ``chunks + 3`` chunk tables are kept whatever the batch
    size (a stream of single samples costs no more memory than one of 256).
    """

    kind = "sliding"

    def __init__(self, size: int, counts_shape: Tuple[int, ...], stats_size: int,
                 device: torch.device, chunks: int = 16):
        if size < 1:
            raise ValueError(f"selfheal: window size must be >= 1, got {size}")
        self.size = int(size)
        self.chunk_samples = max(1, self.size // chunks)
        slots = self.size // self.chunk_samples + 3
        self.ring_counts = torch.zeros((slots,) + tuple(counts_shape), dtype=torch.int64, device=device)
        self.ring_stats = torch.zeros(slots, stats_size, dtype=torch.float64, device=device)
        self.ring_samples = [0] * slots
        self.total_counts = torch.zeros(tuple(counts_shape), dtype=torch.int64, device=device)
        self.oldest = 0   # slot of the oldest chunk
        self.open = 0     # slot of the chunk being filled
        self.samples = 0  # samples in the window

    def add(self, counts: torch.Tensor, stats: torch.Tensor, samples: int) -> None:
        """Adds one batch: ``counts`` int64 of ``counts_shape``, ``stats`` float64."""
        slots = len(self.ring_samples)
        self.ring_counts[self.open] += counts
        self.ring_stats[self.open] += stats
        self.ring_samples[self.open] += samples
        self.total_counts += counts
        self.samples += samples
        if self.ring_samples[self.open] >= self.chunk_samples:
            self.open = (self.open + 1) % slots
            if self.open == self.oldest:  # cannot happen with the slot count above
                raise RuntimeError("selfheal: sliding window ring overflow")
        while self.oldest != self.open and self.samples - self.ring_samples[self.oldest] >= self.size:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        slot = self.oldest
        self.total_counts -= self.ring_counts[slot]
        self.samples -= self.ring_samples[slot]
        self.ring_counts[slot].zero_()
        self.ring_stats[slot].zero_()
        self.ring_samples[slot] = 0
        self.oldest = (slot + 1) % len(self.ring_samples)

    def totals(self) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """Window counts (int64), stats (float64, summed fresh from the chunks so
        float rounding never accumulates) and the effective sample size."""
        return self.total_counts, self.ring_stats.sum(dim=0), float(self.samples)

    def reset(self) -> None:
        self.ring_counts.zero_()
        self.ring_stats.zero_()
        self.total_counts.zero_()
        self.ring_samples = [0] * len(self.ring_samples)
        self.oldest = self.open = self.samples = 0

    def state_dict(self) -> Dict:
        return {
            "kind": self.kind, "size": self.size, "chunk_samples": self.chunk_samples,
            "ring_counts": self.ring_counts.clone(), "ring_stats": self.ring_stats.clone(),
            "ring_samples": torch.tensor(self.ring_samples, dtype=torch.int64),
            "total_counts": self.total_counts.clone(),
            "oldest": self.oldest, "open": self.open, "samples": self.samples,
        }

    def load_state_dict(self, state: Dict) -> None:
        _check_state(self, state, ("size", "chunk_samples"))
        _copy_tensor(self.ring_counts, state["ring_counts"], "ring_counts")
        _copy_tensor(self.ring_stats, state["ring_stats"], "ring_stats")
        _copy_tensor(self.total_counts, state["total_counts"], "total_counts")
        samples = [int(v) for v in state["ring_samples"].tolist()]
        if len(samples) != len(self.ring_samples) or min(samples) < 0:
            raise ValueError("selfheal: window state has a corrupt 'ring_samples'")
        if sum(samples) != int(state["samples"]):
            raise ValueError("selfheal: window state is inconsistent: chunk sizes do not add up to 'samples'")
        self.ring_samples = samples
        self.oldest, self.open, self.samples = int(state["oldest"]), int(state["open"]), int(state["samples"])


class ExponentialWindow:
    """Exponentially weighted counts: each new sample multiplies the weight of
    every older one by ``decay = (size - 1) / (size + 1)``, so at steady state
    the effective sample size ``(sum w)^2 / sum w^2`` is ``size``. The batch
    counts stay exact integers until they are weighted in here (float64)."""

    kind = "exponential"

    def __init__(self, size: int, counts_shape: Tuple[int, ...], stats_size: int,
                 device: torch.device):
        if size < 2:
            raise ValueError(f"selfheal: exponential window size must be >= 2, got {size}")
        self.size = int(size)
        self.decay = (self.size - 1.0) / (self.size + 1.0)
        self.counts = torch.zeros(tuple(counts_shape), dtype=torch.float64, device=device)
        self.stats = torch.zeros(stats_size, dtype=torch.float64, device=device)
        self.weight = 0.0          # sum of weights
        self.weight_squared = 0.0  # sum of squared weights

    def add(self, counts: torch.Tensor, stats: torch.Tensor, samples: int) -> None:
        factor = self.decay ** samples
        self.counts.mul_(factor).add_(counts)
        self.stats.mul_(factor).add_(stats)
        self.weight = self.weight * factor + samples
        self.weight_squared = self.weight_squared * factor * factor + samples

    def totals(self) -> Tuple[torch.Tensor, torch.Tensor, float]:
        effective = self.weight * self.weight / self.weight_squared if self.weight_squared > 0 else 0.0
        # Rescale so the counts sum to the effective sample size: divergences
        # and means then read as those of an ordinary window of that size.
        scale = effective / self.weight if self.weight > 0 else 0.0
        return self.counts * scale, self.stats * scale, effective

    def reset(self) -> None:
        self.counts.zero_()
        self.stats.zero_()
        self.weight = self.weight_squared = 0.0

    def state_dict(self) -> Dict:
        return {"kind": self.kind, "size": self.size, "counts": self.counts.clone(),
                "stats": self.stats.clone(), "weight": self.weight, "weight_squared": self.weight_squared}

    def load_state_dict(self, state: Dict) -> None:
        _check_state(self, state, ("size",))
        _copy_tensor(self.counts, state["counts"], "counts")
        _copy_tensor(self.stats, state["stats"], "stats")
        self.weight, self.weight_squared = float(state["weight"]), float(state["weight_squared"])


def _check_state(window, state: Dict, keys) -> None:
    if state.get("kind") != window.kind:
        raise ValueError(f"selfheal: window state is for a {state.get('kind')!r} window, "
                         f"this monitor uses a {window.kind!r} one")
    for key in keys:
        if int(state[key]) != getattr(window, key):
            raise ValueError(f"selfheal: window state has {key}={state[key]}, this monitor has "
                             f"{getattr(window, key)}")


def _copy_tensor(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if not isinstance(source, torch.Tensor) or source.shape != target.shape:
        shape = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
        raise ValueError(f"selfheal: window state '{name}' has shape {shape}, expected {tuple(target.shape)}")
    target.copy_(source)
