"""The label-shift tracker: are classes arriving in runs?

A label-ordered stream (classes in runs) poisons BatchNorm statistics taken
from its batches, and entropy steps on it pull every input towards the
current class. The tracker compares each batch's class mix, as the source
model predicts it, with the recent stream's:

    shift_t = KL(batch mix || recent mix)        (0 for a batch at least as diverse)
    level_t = (level_{t-1} + shift_t) / 2        (an exponential mixture, each batch worth a half)
    recent_t = (1 - w) recent_{t-1} + w batch,   w = n / (n + window)

A run is on above ``threshold`` and off below half of it (hysteresis); a
level above a quarter of it hints at a run (the batch-statistics check,
``batch_check.py``, then decides). Batches under 8 rows say too little about
their class mix and are only folded in. The recent mix starts at the source's
mix on the calibration data, so a source that predicts one class for
everything under a drift stops looking like a run once the mix has followed
(about a window).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .tensors import effective_classes

# Fewest rows whose class mix is compared with the recent stream's (heuristic).
_MIN_ROWS = 8
# Share of the threshold above which a level hints at a run (heuristic).
_HINT = 0.25


class LabelShiftTracker:
    """Follows the stream's source-predicted class mix.

    ``track(stats, window, diverse)`` folds in one batch; ``in_run()`` is the
    hysteresis verdict; ``looks_like_run(stats, diverse)`` and ``hinted()``
    ask what folding a batch in would say. ``stats`` is the guards' merged
    row ``[agreeing rows, rows, adapted probability sums [C], source
    probability sums [C]]``; ``diverse`` is the batch-statistics check's
    verdict on the batch (True: a batch it judged many classes never counts
    as a run).

    Args:
        threshold: KL divergence (nats) above which classes are taken to
            arrive in runs (``inf``: never).
    """

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.reference: Optional[torch.Tensor] = None  # the source's mix on the calibration data
        self.recent: Optional[torch.Tensor] = None
        self.level: Optional[float] = None
        self.robust = False

    def calibrate(self, reference: torch.Tensor) -> None:
        """Starts from the source's class mix on healthy data."""
        self.reference = reference
        self.recent = reference.clone()

    def reset(self) -> None:
        """Forgets the stream: no level, no run, the recent mix back at the reference."""
        self.level = None
        self.robust = False
        if self.reference is not None:
            self.recent = self.reference.clone()

    def in_run(self) -> bool:
        """The hysteresis verdict on the current level (on above the
        threshold, off below half of it)."""
        if self.level is None:
            return self.robust
        if self.level > self.threshold:
            self.robust = True
        elif self.level < 0.5 * self.threshold:
            self.robust = False
        return self.robust

    def hinted(self, level: Optional[float] = None) -> bool:
        """A level (the current one by default) above a quarter of the
        threshold: too weak to call a run, enough to ask the batch-statistics check."""
        level = self.level if level is None else level
        return level is not None and level > _HINT * self.threshold

    def track(self, stats: torch.Tensor, window: int, diverse: Optional[bool] = None) -> None:
        """Compares the batch's class mix with the recent mix, then folds it
        in, worth ``n / (n + window)`` for a batch of ``n`` rows (``window``:
        the monitor's, in samples)."""
        rows = float(stats[1])
        if rows < 1:
            return
        self.level = self.expected_level(stats, diverse)
        weight = rows / (rows + window)
        self.recent = (1 - weight) * self.recent + weight * _source_mix(stats).double()

    def expected_level(self, stats: torch.Tensor, diverse: Optional[bool] = None) -> Optional[float]:
        """The level once this batch is folded in."""
        shift = self._batch_shift(stats, diverse)
        return self.level if shift is None else \
            shift if self.level is None else 0.5 * self.level + 0.5 * shift

    def looks_like_run(self, stats: torch.Tensor, diverse: Optional[bool] = None) -> bool:
        """Whether the tracker, with this batch folded in, would call it part
        of a run of classes, or hint at one."""
        expected = self.expected_level(stats, diverse)
        return expected is not None and (expected > self.threshold or
                                         (self.robust and expected >= 0.5 * self.threshold) or self.hinted(expected))

    def _batch_shift(self, stats: torch.Tensor, diverse: Optional[bool]) -> Optional[float]:
        """KL divergence of the batch's mix from the recent stream's (None
        under ``_MIN_ROWS`` rows); 0 for a batch at least as diverse as the
        recent stream, or judged diverse by the batch-statistics check."""
        if float(stats[1]) < _MIN_ROWS:
            return None
        batch = _source_mix(stats)
        recent = self.recent.clamp_min(1e-8)
        # Only a batch *less* diverse than the recent stream is a run of
        # classes; a more diverse one is the stream recovering (a source
        # model that collapsed on one class under a drift, now served
        # clean data again), which must not freeze the statistics.
        if effective_classes(batch) >= effective_classes(recent) or diverse is True:
            return 0.0
        return float((batch * (batch / recent).log()).sum())

    def state_dict(self) -> Dict[str, object]:
        return {"label_shift": self.level, "robust": self.robust,
                "reference_probs": None if self.reference is None else self.reference.clone(),
                "long_probs": None if self.recent is None else self.recent.clone()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.level = state["label_shift"]
        self.robust = bool(state["robust"])
        self.reference = None if state["reference_probs"] is None else state["reference_probs"].clone()
        self.recent = None if state["long_probs"] is None else state["long_probs"].clone()


def _source_mix(stats: torch.Tensor) -> torch.Tensor:
    """The batch's mean source probabilities (on the CPU, floored at 1e-8)."""
    classes = (stats.numel() - 2) // 2
    return (stats[2 + classes:] / float(stats[1])).cpu().clamp_min(1e-8)
