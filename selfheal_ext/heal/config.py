"""HealerConfig: every tunable number of the healer, in one frozen dataclass.

Each field carries its meaning and its source in ``metadata``: a paper's
equation, a figure measured on the healing benchmark, or "heuristic".
``HealerConfig.describe()`` lists them (docs/healer.md prints that
table). ``SelfHealer(model, config=HealerConfig(...))`` takes one; its keyword
arguments of the same names override single fields.

    >>> from selfheal_ext import HealerConfig
    >>> HealerConfig(lr=5e-4).lr
    0.0005
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class _FromConfig:
    """The default of ``SelfHealer``'s keyword arguments that are also
    settings: the value comes from the ``config`` given (or its default)."""

    def __repr__(self) -> str:
        return "<from config>"


FROM_CONFIG = _FromConfig()


def _setting(default, meaning: str, source: str):
    return field(default=default, metadata={"meaning": meaning, "source": source})


@dataclass(frozen=True)
class HealerConfig:
    # ------------------------------------------------------------ adapters
    budget: float = _setting(0.05, "adapter parameters as a fraction of the model's", "design goal (under 5 %)")
    max_rank: int = _setting(16, "largest bottleneck rank an adapter may get within the budget", "heuristic")
    seed: int = _setting(0, "seed of the adapters' initialisation and the monitor's bootstrap", "convention")
    # ----------------------------------------------------------- objective
    lr: float = _setting(1e-3, "Adam learning rate of the adapter step", "EATA/TENT practice (Adam 1e-3)")
    anchor: float = _setting(1.0, "weight of the Fisher penalty towards the source adapters",
                             "EATA eq. 9 (anti-forgetting weight); heuristic value")
    entropy_margin: float = _setting(0.4, "samples with entropy above margin * ln C are not learnt from",
                                     "EATA eq. 3 (E_0 = 0.4 ln C)")
    redundancy: float = _setting(0.05, "samples whose prediction has cosine similarity above 1 - redundancy "
                                       "with the moving mean of selected ones are not learnt from",
                                 "EATA eq. 6 (epsilon = 0.05)")
    max_shift: float = _setting(5.0, "cap on the L2 distance of all adapter parameters from the source", "heuristic")
    min_step_samples: int = _setting(16, "small batches are pooled until one step has this many samples",
                                     "heuristic")
    reset_every: Optional[int] = _setting(None, "reset the adapters to the source every this many steps (None: "
                                                "never)", "RDumb (Press et al., NeurIPS 2023): periodic resets")
    # -------------------------------------------------------- normalisation
    robust_horizon: float = _setting(4096.0, "samples over which BatchNorm statistics follow the stream while "
                                             "classes arrive in runs", "RoTTA robust BN (Yuan et al., CVPR 2023), "
                                             "momentum 0.05 at batch 64 ~ 1/(1280 samples); heuristic value")
    norm_prior: float = _setting(128.0, "weight, in samples, of the recent stream's BatchNorm statistics in a "
                                        "batch's", "heuristic (measured on the healing benchmark)")
    # ------------------------------------------------------ guards, release
    collapse_ratio: float = _setting(0.5, "the collapse guard trips when the adapted predictions spread over "
                                          "fewer than this share of the source's effective classes", "heuristic")
    agreement_floor: float = _setting(0.0, "...or agree with the source on fewer than this share of samples "
                                           "(0: off)", "heuristic (a drifted source is often confidently wrong)")
    divergence_rise: float = _setting(3.0, "...or the adapted layers' divergence rises this many times above its "
                                           "level once the window has turned over", "heuristic")
    healthy_classes: float = _setting(0.75, "a version is kept as good only while the adapted predictions "
                                            "spread over at least this share of the source's classes",
                                      "heuristic")
    good_every: int = _setting(10, "steps between two snapshots of a healthy version", "heuristic")
    max_episode_trips: int = _setting(3, "guard trips in one drift episode before adapter training is held",
                                      "heuristic")
    release_after: Optional[int] = _setting(None, "clean batches after which the adapters go dormant again "
                                                  "(None: a monitor window's worth)", "heuristic")
    # ----------------------------------------------- label shift, run check
    label_shift: float = _setting(0.5, "KL divergence (nats) of a batch's source class mix from the recent "
                                       "stream's above which classes are taken to arrive in runs (inf: never)",
                                  "heuristic")
    batch_diversity: bool = _setting(True, "the batch-statistics check decides whether a suspected run holds "
                                           "many classes", "switch")
    check_split: float = _setting(0.3, "where the check's information threshold sits between the runs' level "
                                       "(0) and healthy batches' (1)", "measured: healing benchmark, seeds 0-1")
    check_sway: float = _setting(0.3, "how far the check's recent verdicts move that split (either way, half "
                                      "of it)", "measured: healing benchmark, seeds 0-3")
    check_memory: float = _setting(0.5, "weight of each verdict in the check's memory of recent verdicts",
                                   "heuristic")
    spread_separation: float = _setting(4.0, "d' between the spread's healthy and run levels needed to use it",
                                        "measured: healing benchmark, seeds 0-14")
    spread_split: float = _setting(0.5, "where the spread's threshold sits between its two levels", "heuristic")
    spread_min_gap: float = _setting(math.log(2.0), "smallest log ratio between healthy and run spread to use "
                                                     "it (a drift rescales the spread by factors)",
                                     "measured: healing benchmark, seeds 0-9")
    classes_split: float = _setting(0.3, "where the predicted-classes diversity threshold sits between its "
                                         "levels", "measured: healing benchmark, 8 seeds")
    classes_separation: float = _setting(2.0, "d' between the diversity's two levels needed to use it",
                                         "measured: healing benchmark, 8 seeds")
    classes_min_gap: float = _setting(0.05, "smallest gap between the diversity's two levels to use it",
                                      "measured: healing benchmark, 8 seeds")
    agnostic_shift: float = _setting(0.03, "a statistics layer that one class moves by less than this stays on "
                                           "batch statistics in runs (class-agnostic)",
                                     "measured: healing benchmark, 14 calibrations")
    # ------------------------------------------------------- serving modes
    mode: str = _setting("inline", "'inline' (a step after each served batch) or 'deferred' (a background "
                                   "thread)", "switch")
    replay_size: int = _setting(8, "batches the deferred worker's replay buffer holds", "heuristic")
    approval: bool = _setting(False, "stage adaptations as proposals a person approves", "switch")
    proposal_steps: int = _setting(20, "staged steps per proposal (approval mode)", "heuristic")
    poll_interval: float = _setting(1.0, "seconds between checks of the audit log for CLI decisions", "heuristic")
    # ---------------------------------------------------------- governance
    max_steps_per_minute: Optional[float] = _setting(None, "hard cap on adaptation steps per minute (None: no "
                                                           "cap)", "operator's policy")
    keep_versions: int = _setting(20, "snapshots kept besides the source, the last good and approved versions",
                                  "heuristic")
    buffer_size: int = _setting(256, "rows of recent served inputs kept for rule checks and proposal evidence",
                                "heuristic")
    audit_every: Optional[int] = _setting(10, "a monitor record in the audit log every this many batches "
                                              "(None: none)", "heuristic")
    event_limit: int = _setting(10_000, "events kept in memory (the audit log keeps all)", "heuristic")

    def __post_init__(self):
        for setting in dataclasses.fields(self):  # (an int given for a float setting is taken as a float)
            value = getattr(self, setting.name)
            if isinstance(setting.default, float) and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, setting.name, float(value))
        _check(self.mode in ("inline", "deferred"), f"mode must be 'inline' or 'deferred', got {self.mode!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.robust_horizon > 0, f"robust_horizon must be > 0, got {self.robust_horizon}")
        _check(0 <= self.norm_prior < math.inf, f"norm_prior must be a finite number >= 0, got {self.norm_prior}")
        _check(0 < self.entropy_margin <= 1, f"entropy_margin must be in (0, 1], got {self.entropy_margin}")
        _check(self.audit_every is None or int(self.audit_every) >= 1,
               f"audit_every must be >= 1 or None, got {self.audit_every}")
        _check(min(int(self.keep_versions), int(self.buffer_size), int(self.proposal_steps),
                   int(self.max_episode_trips), int(self.good_every), int(self.event_limit)) >= 1,
               "keep_versions, buffer_size, proposal_steps, max_episode_trips, good_every and event_limit "
               "must be >= 1")
        _check(not (self.approval and self.mode != "inline"), "approval mode runs inline (mode='inline')")
        for name in ("check_split", "spread_split", "classes_split", "check_memory", "check_sway",
                     "collapse_ratio", "healthy_classes"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"{name} must be in [0, 1], got {value}")

    def replace(self, **changes) -> "HealerConfig":
        """A copy with ``changes`` (validated)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"selfheal: HealerConfig has no setting(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> List[Dict[str, Any]]:
        """One row per setting: name, default, meaning, source."""
        return [{"name": f.name, "default": f.default, "meaning": f.metadata["meaning"],
                 "source": f.metadata["source"]} for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "HealerConfig":
        """A configuration from ``as_dict()``'s output (settings unknown to
        this version are refused; missing ones take their defaults)."""
        if not isinstance(values, dict):
            raise TypeError(f"selfheal: a HealerConfig is loaded from a dict, got {type(values).__name__}")
        return cls().replace(**values)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"selfheal: {message}")
