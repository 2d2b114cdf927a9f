"""The collapse and divergence guard: is the adapted model still sane?

Per active batch it receives the merged guard statistics ``[agreeing rows,
rows, adapted probability sums [C], source probability sums [C]]`` (the
adapted and the source model on the same rows) and the monitor's reading, and
keeps running averages:

    agreement_t = (1 - a) agreement_{t-1} + a · agree_t,      a = min(0.4, n / (n + 16))   (about 16 samples)
    adapted_t   = (1 - m) adapted_{t-1}   + m · mean_i p_i,   m = n / (n + window)        (a monitor window)
    source_t    likewise for the source's predictions

The verdict is a reason to trip, or None:

* collapse: the adapted predictions spread over fewer than ``collapse_ratio``
  times the source's effective classes (``exp`` of the entropy of the mean);
* disagreement: ``agreement < agreement_floor`` (off by default: under strong
  drift the source is often confidently wrong, and a good adaptation then
  overturns most of its predictions);
* divergence: the adapted layers' divergence (the monitor's taps after the
  input side) rises ``divergence_rise`` times above its level once the window
  holds only batches seen since activation.

``healthy`` says whether the adapted model is clearly sane (a version worth
keeping as good): agreement at least twice the floor and at least
``healthy_classes`` of the source's effective classes.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from .config import HealerConfig
from .tensors import effective_classes

# Samples the agreement average spans, and the most one batch weighs in it (heuristic).
_AGREEMENT_SAMPLES, _AGREEMENT_MAX_WEIGHT = 16, 0.4


class CollapseGuard:
    """Running averages of the adapted and the source predictions, and the
    verdict on each active batch (``check``). ``reset()`` forgets them (after
    a trip, the version served has changed)."""

    def __init__(self, config: HealerConfig):
        self.config = config
        self.agreement: Optional[float] = None
        self.adapted: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None
        self.baseline: Optional[float] = None  # the adapted layers' divergence once the window turned over
        self.healthy = False

    def reset(self) -> None:
        self.agreement = self.adapted = self.source = self.baseline = None
        self.healthy = False

    def check(self, stats: torch.Tensor, window: int, downstream: Iterable[float], window_threshold: float,
              window_turned: bool) -> Optional[str]:
        """The reason to trip on this batch, or None (``healthy`` is then
        set). ``downstream``: the divergences of the layers the adapters act
        on; ``window_turned``: the monitor's window now holds only batches
        seen since activation (the baseline is taken then)."""
        rows = float(stats[1])
        self.healthy = False
        if rows < 1:
            return None
        classes = (stats.numel() - 2) // 2
        adapted = (stats[2: 2 + classes] / rows).float()
        source = (stats[2 + classes:] / rows).float()
        agreement = float(stats[0]) / rows
        weight = min(_AGREEMENT_MAX_WEIGHT, rows / (rows + _AGREEMENT_SAMPLES))
        momentum = rows / (rows + window)
        # starts from full agreement (adapters begin at the source weights)
        previous = 1.0 if self.agreement is None else self.agreement
        self.agreement = (1 - weight) * previous + weight * agreement
        self.adapted = adapted if self.adapted is None else (1 - momentum) * self.adapted + momentum * adapted
        self.source = source if self.source is None else (1 - momentum) * self.source + momentum * source
        adapted_classes = effective_classes(self.adapted)
        source_classes = effective_classes(self.source)
        config = self.config
        if adapted_classes < config.collapse_ratio * source_classes:
            return f"collapse: {adapted_classes:.2f} effective classes vs {source_classes:.2f} for the source"
        if self.agreement < config.agreement_floor:
            return f"collapse: agreement with the source fell to {self.agreement:.2f}"
        downstream = list(downstream)
        level = max(downstream) if downstream else None
        if level is not None and self.baseline is None and window_turned:
            self.baseline = max(level, window_threshold)
        elif level is not None and self.baseline is not None and level > config.divergence_rise * self.baseline:
            return f"divergence of the adapted layers rose to {level:.2f} (baseline {self.baseline:.2f})"
        # (the averages lag a little behind a collapse in progress: kept as
        # good only when clearly healthy)
        self.healthy = (self.agreement >= 2 * config.agreement_floor
                        and adapted_classes >= config.healthy_classes * source_classes)
        return None

    def state_dict(self) -> Dict[str, object]:
        return {"guard_averages": {"agreement": self.agreement,
                                   "adapted": None if self.adapted is None else self.adapted.clone(),
                                   "source": None if self.source is None else self.source.clone()},
                "downstream_baseline": self.baseline}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        averages = state["guard_averages"]
        self.agreement = averages["agreement"]
        self.adapted = None if averages["adapted"] is None else averages["adapted"].clone()
        self.source = None if averages["source"] is None else averages["source"].clone()
        self.baseline = state["downstream_baseline"]
        self.healthy = False
