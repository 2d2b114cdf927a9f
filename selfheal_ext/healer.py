"""SelfHealer: serve a model, detect drift, repair it online without labels.

Per batch (``healer(x)``):

1. predict with the current adapters (dormant: the source model, bit for bit);
   the monitor's taps read the batch during that same forward pass;
2. the monitor decides whether the data has drifted;
3. while drift is active, one adaptation step on that batch (after the logits
   were returned-to-be, so they never depend on it): entropy minimisation over
   reliable, non-redundant samples weighted by confidence (EATA), anchored to
   the source by a Fisher penalty estimated at calibration with the model's own
   pseudo-labels, plus BatchNorm statistics adaptation with a prior from the recent stream;
4. guards: prediction collapse (measured against the source model on the same
   batches), divergence rising after adaptation, non-finite losses, a cap on
   how far adapter weights move and on steps per minute; a tripped guard rolls
   back to the last good version (or the source) and halves the learning rate.

Adapters return to dormant when the input-side divergence has stayed below
threshold for ``release_after`` batches.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import os
import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops
from .adapters import ADAPTER_KINDS, AdapterSet, attach_adapters
from .deferred import DeferredWorker
from .governance import DEFAULT_AUDIT_FILE, AuditLog, BiasGuard, Policy, SnapshotError, SnapshotStore, tensor_digest
from .monitor import DriftMonitor, DriftReport, as_logits
from .governance import AuditError
from .rules import RuleContext, RuleError, check_rules, total_penalty, validate_rules
from .taps import default_taps

_EVENT_LIMIT = 10_000
_MAX_EPISODE_TRIPS = 3
_KEEP_VERSIONS = 20
# Where the batch-statistics check's threshold sits between the information
# level of runs of one class (0) and of healthy batches of many classes (1).
# Runs stay at their level under any drift, while drifted batches of many
# classes fall towards it: a low split keeps strongly drifted i.i.d. batches
# on the "many classes" side. Chosen on the benchmark's seed 0, confirmed on
# seed 1 (docs/architecture.md).
_CHECK_SPLIT = 0.3
# How far the split moves with the check's own recent verdicts in a drift
# episode (an exponential mixture, each verdict worth _CHECK_MEMORY, starting
# at "many classes"): from _CHECK_SPLIT - _CHECK_SWAY / 2 after a row of
# "many classes" to _CHECK_SPLIT + _CHECK_SWAY / 2 after a row of runs
# (docs/architecture.md, "the check's recent verdicts").
_CHECK_SWAY, _CHECK_MEMORY = 0.3, 0.5
# The check's second measure, the spread of the rows at the last BatchNorm
# layer (see _batch_statistics_sums): used where calibration separates runs
# from healthy batches by at least this many standard deviations (d'), with
# its threshold half-way between their levels: at d' = 4 about 2 % of
# healthy-data runs land above it (5 until the gap below existed, when d'
# alone had to keep it off the MLP; the digits CNN's d' is 4.6-10.4 over 15
# calibrations, and on the two under 5, seeds 13 and 14, reset lost 4-5.5
# points on each noise corruption with the spread off).
_SPREAD_SEPARATION, _SPREAD_SPLIT = 4.0, 0.5
# ... and where healthy batches spread at least this much more than runs (a
# log ratio of variances: twice as much). The spread is relative to the
# source's variance, which a covariate drift rescales by factors: a gap of a
# few tenths, however many standard deviations it spans on healthy data,
# does not survive one. On the healing benchmark's 10 calibrations per task
# the digits CNN's gap is 1.21-1.36 and the tabular MLP's 0.14-0.20; on seed 8
# the MLP's passed the separation test (5.3) and runs drifted by gain or
# offset read as many classes (label-ordered 7 points under the source).
_SPREAD_MIN_GAP = math.log(2.0)
# The check's third measure, the diversity of the predicted classes (the
# entropy of the batch's argmax histogram over ln C, batch statistics as
# for the information). A strong corruption of the noise family leaves the
# rows' predictions vague, so their information falls to the runs' level,
# while their argmax still follows the class (BN re-estimation serves them
# at twice the source's accuracy); a run's argmax collapses on a few
# classes. A batch counts as many classes when its predicted classes are
# more diverse than _CLASSES_SPLIT of the way up from the runs' level *and*
# its information is at least the lowest split the verdicts can move the
# check to (_CHECK_SPLIT - _CHECK_SWAY / 2), used where calibration
# separates the two levels by _CLASSES_SEPARATION standard deviations and
# _CLASSES_MIN_GAP. A probe of the benchmark's streams (digits, 8 seeds,
# batches of 64, docs/architecture.md): i.i.d. drifted batches called many
# classes 74 -> 89 %, runs 0 -> 0.2 %, batches of two classes 1.9 -> 3.3 %.
# On the tabular MLP the argmax of a run stays as diverse as a healthy
# batch's (d' 0.1-1.1, gap under 0.02): off.
_CLASSES_SPLIT, _CLASSES_SEPARATION, _CLASSES_MIN_GAP = 0.3, 2.0, 0.05
# A statistics layer whose statistics one class moves by less than this is
# class-agnostic: robust mode leaves it on its batch statistics
# (NormStatsAdapter.class_agnostic). The shift of a class is the mean over
# channels of (class mean - mean)^2 / variance + log(class variance /
# variance)^2 at the layer's input, against all calibration rows; a layer's
# is the mean over the source's predicted classes. 0.03 is a class moving
# the layer's normalisation by 0.17 standard deviations (root mean square).
# On the healing benchmark's digits CNN, 14 calibrations: first layer
# 0.013-0.023, second 0.034-0.043, third 0.39-0.49; tabular MLP 0.37-0.74
# (docs/architecture.md, "class-agnostic layers").
_AGNOSTIC_SHIFT = 0.03


def _outside_inference_mode(method):
    """Serving code often runs under ``torch.inference_mode()``. The
    healer's public entry points switch it off: tensors they create
    (adapters, statistics, versions) must stay normal tensors, updated in
    place and used by autograd later; an inference-mode input is copied once
    (``__call__``, ``calibrate``). Gradients stay off, as inference mode had
    them (the healer enables them itself where it needs them); outside
    inference mode nothing changes."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)
    return run


@dataclass
class HealEvent:
    """One thing the healer did: ``kind`` in drift, activate, release, step,
    skip, guard, hold, suspend, rollback, reset, snapshot, policy, bias,
    rule_violation, proposal, proposal_refused, approve, reject,
    worker_error. With an audit log, every event is also an audit record."""
    batch: int
    kind: str
    version: int
    detail: Dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    seq: int = 0  # running number of the healer's events (the list keeps the newest 10,000)


@dataclass
class HealStatus:
    active: bool
    version: int
    steps: int
    learning_rate: float
    selected_last_step: int
    guard_trips: int
    robust_norm: bool


class SelfHealer:
    """Wraps a trained classifier: serves it, watches it, heals it.

    Args:
        model: the trained model (its own parameters are never changed).
        budget: adapter parameters as a fraction of the model's (default 5%).
        adapter_kinds: subset of ``("bottleneck", "affine", "norm")``.
        adapter_targets: module names or types to place adapters on (default: automatic).
        lr: adaptation learning rate (Adam).
        anchor: weight of the Fisher penalty towards the source adapters.
        entropy_margin: samples with entropy above ``entropy_margin * ln C`` are not used.
        redundancy: samples whose probabilities have cosine similarity above
            ``1 - redundancy`` with the running mean of selected ones are not used.
        max_shift: cap on the L2 distance of all adapter parameters from the source.
        max_steps_per_minute: hard cap on adaptation steps per minute (None: no cap).
        reset_every: reset to the source every this many steps (None: never).
        collapse_ratio: the guard trips when the adapted predictions spread over
            fewer than this fraction of the source's effective classes (same
            batches, averaged over about a monitor window)...
        agreement_floor: ...or agree with the source's on fewer than this share
            of samples (0: off; a drifted source is often confidently wrong).
        divergence_rise: ...or the adapted layers' divergence rises this many
            times above its level once the window has turned over.
        label_shift: a batch whose source-predicted class mix differs from
            the recent stream's by more than this KL divergence (nats; classes
            arriving in runs, label-ordered streams) is not learnt from, and
            BatchNorm uses its running statistics for it (``inf``: never).
        batch_diversity: such a batch (or one whose class mix hints at it)
            is checked once more, before it is served: normalised with its
            own statistics, a batch of one class loses its class signal
            (uninformative predictions), a batch of many classes does not.
            Under a drift that makes the source predict one class for
            everything, this tells the two apart; the information level
            between them is calibrated (``False``: off).
        robust_horizon: samples over which BatchNorm statistics follow the
            stream while classes arrive in runs (RoTTA's robust BN; larger:
            slower, safer on long runs of one class).
        norm_prior: weight, in samples, of the recent stream's BatchNorm
            statistics in a batch's (``w = n / (n + norm_prior * f)`` on the
            batch's own; the recent stream's start at the source's, and ``f``
            shrinks the prior when the batch departs from them: a drift that
            begins or changes; see ``NormStatsAdapter``). Larger: steadier
            statistics while a drift holds. 128 (before 2026-12-06: a source
            prior of 8, and of 16 before that).
        min_step_samples: batches smaller than this are pooled until one step
            has this many samples (single process; batch size 1 streams).
        release_after: clean batches (input-side divergence under threshold)
            after which the adapters go dormant again (default: a window's worth).
        mode: ``"inline"`` (one step per batch after predicting) or
            ``"deferred"`` (steps on a background thread from a replay buffer).
        monitor_options: keyword arguments for the ``DriftMonitor``.
        process_group: a ``torch.distributed`` group: counts, decisions,
            adapter gradients and the statistics adapters' running moments
            are merged across its ranks.
        audit: an ``AuditLog``, a path to one (SQLite), or True for
            ``selfheal_audit.db`` in the working directory: every event
            becomes a hash-chained record (give each rank of a process group
            its own file, or pass it on one rank only).
        snapshots: a ``SnapshotStore`` or a directory for content-addressed
            adapter snapshots (default with ``audit``: ``<audit path>.snapshots``).
        approval: stage adaptations as proposals; the model serves the last
            approved version until ``approve(id)`` (or ``selfheal audit
            approve`` against the audit log).
        policy: a ``Policy`` (rate, weight change, allowed hours).
        rules: ``selfheal_ext.rules`` rules: penalties in the loss, and a gate
            after every step (a version that violates one more than the source
            does on the recent buffer is rolled back).
        bias_guard: a ``BiasGuard``: adaptation that moves the predicted-class
            mix (or a group's positive rate) beyond its bounds is stopped.
        keep_versions: snapshots kept besides the source, the last good and
            every approved version.
        buffer_size: rows of recent served inputs kept for rule checks and
            proposal evidence.
        proposal_steps: staged steps per proposal (approval mode).
        poll_interval: seconds between checks of the audit log for decisions
            made with the CLI (approval mode).
        audit_every: with an audit log, a ``monitor`` record (drift score,
            threshold, CUSUM, entropy, estimated accuracy) every this many
            batches — what ``selfheal report`` plots (None: none).
    """

    @_outside_inference_mode
    def __init__(
        self,
        model: nn.Module,
        *,
        budget: float = 0.05,
        adapter_kinds: Sequence[str] = ADAPTER_KINDS,
        adapter_targets=None,
        max_rank: int = 16,
        lr: float = 1e-3,
        anchor: float = 1.0,
        entropy_margin: float = 0.4,
        redundancy: float = 0.05,
        max_shift: float = 5.0,
        max_steps_per_minute: Optional[float] = None,
        reset_every: Optional[int] = None,
        release_after: Optional[int] = None,
        collapse_ratio: float = 0.5,
        agreement_floor: float = 0.0,
        label_shift: float = 0.5,
        batch_diversity: bool = True,
        robust_horizon: float = 4096.0,
        norm_prior: float = 128.0,
        min_step_samples: int = 16,
        divergence_rise: float = 3.0,
        mode: str = "inline",
        replay_size: int = 8,
        monitor_options: Optional[Dict[str, Any]] = None,
        logits_fn: Optional[Callable] = None,
        process_group=None,
        seed: int = 0,
        audit=None,
        snapshots=None,
        approval: bool = False,
        policy: Optional[Policy] = None,
        rules: Sequence = (),
        bias_guard: Optional[BiasGuard] = None,
        keep_versions: int = _KEEP_VERSIONS,
        buffer_size: int = 256,
        proposal_steps: int = 20,
        poll_interval: float = 1.0,
        audit_every: Optional[int] = 10,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"selfheal: SelfHealer wraps an nn.Module, got {type(model).__name__}")
        if mode not in ("inline", "deferred"):
            raise ValueError(f"selfheal: mode must be 'inline' or 'deferred', got {mode!r}")
        if mode == "deferred" and process_group is not None:
            raise ValueError("selfheal: mode='deferred' cannot be combined with a process_group (the worker's "
                             "collectives would interleave with the serving thread's); use mode='inline'")
        if approval and (mode != "inline" or process_group is not None):
            raise ValueError("selfheal: approval mode runs inline on one process (mode='inline', no process_group)")
        if policy is not None and max_steps_per_minute is not None:
            raise ValueError("selfheal: give max_steps_per_minute either directly or in the policy, not both")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"selfheal: policy must be a selfheal_ext.governance.Policy, got {type(policy).__name__}")
        if bias_guard is not None and not isinstance(bias_guard, BiasGuard):
            raise TypeError(f"selfheal: bias_guard must be a BiasGuard, got {type(bias_guard).__name__}")
        if audit_every is not None and int(audit_every) < 1:
            raise ValueError(f"selfheal: audit_every must be >= 1 or None, got {audit_every}")
        if int(keep_versions) < 1 or int(buffer_size) < 1 or int(proposal_steps) < 1:
            raise ValueError("selfheal: keep_versions, buffer_size and proposal_steps must be >= 1")
        if not lr > 0:
            raise ValueError(f"selfheal: lr must be > 0, got {lr}")
        if not robust_horizon > 0:
            raise ValueError(f"selfheal: robust_horizon must be > 0, got {robust_horizon}")
        if not 0 <= norm_prior < math.inf:
            raise ValueError(f"selfheal: norm_prior must be a finite number >= 0, got {norm_prior}")
        if not 0 < entropy_margin <= 1:
            raise ValueError(f"selfheal: entropy_margin must be in (0, 1], got {entropy_margin}")
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.config = {
            "budget": budget, "lr": float(lr), "anchor": float(anchor), "entropy_margin": float(entropy_margin),
            "redundancy": float(redundancy), "max_shift": float(max_shift),
            "max_steps_per_minute": max_steps_per_minute, "reset_every": reset_every,
            "release_after": release_after, "collapse_ratio": float(collapse_ratio),
            "agreement_floor": float(agreement_floor), "label_shift": float(label_shift),
            "batch_diversity": bool(batch_diversity), "robust_horizon": float(robust_horizon),
            "norm_prior": float(norm_prior),
            "min_step_samples": int(min_step_samples),
            "divergence_rise": float(divergence_rise), "mode": mode, "replay_size": int(replay_size),
            "seed": int(seed), "approval": bool(approval), "keep_versions": int(keep_versions),
            "buffer_size": int(buffer_size), "proposal_steps": int(proposal_steps),
            "poll_interval": float(poll_interval),
            "audit_every": None if audit_every is None else int(audit_every),
        }
        self.policy = policy if policy is not None else Policy(max_steps_per_minute=max_steps_per_minute)
        self.rules = validate_rules(rules)
        self.bias_guard = bias_guard
        if audit is True:
            audit = DEFAULT_AUDIT_FILE  # in the working directory
        if audit is False:
            audit = None
        self.audit: Optional[AuditLog] = audit if audit is None or isinstance(audit, AuditLog) else AuditLog(audit)
        if snapshots is None and self.audit is not None:
            snapshots = str(self.audit.path) + ".snapshots"
        self.snapshots: Optional[SnapshotStore] = \
            snapshots if snapshots is None or isinstance(snapshots, SnapshotStore) else SnapshotStore(snapshots)
        self.audit_error: Optional[str] = None
        self.logits_fn = logits_fn
        self.process_group = process_group
        self.batch_samples = 0  # samples in the last served batch (metrics)
        self.adapters: AdapterSet = attach_adapters(model, budget=budget, targets=adapter_targets,
                                                    kinds=adapter_kinds, max_rank=max_rank, seed=seed,
                                                    robust_horizon=robust_horizon, norm_prior=norm_prior)
        options = dict(monitor_options or {})
        if "taps" not in options:
            options["taps"] = self._default_taps(options.get("tap_count", 3))
            # the input-side tap decides when a drift has passed: it must see
            # a raw image's noise, blur and contrast, not only its mean level
            options.setdefault("pooling", {options["taps"][0]: "moments"})
        options.setdefault("logits_fn", logits_fn)
        options.setdefault("process_group", process_group)
        options.setdefault("seed", seed)
        self.monitor = DriftMonitor(model, **options)
        if self.monitor.config["read_every"] > 1 and self.monitor.process_group is not None:
            # the healer reads every batch while adapting or suspended, and a
            # suspension (an audit write failure) can be one rank's alone: the
            # ranks' all_reduce calls would no longer pair up
            raise ValueError("selfheal: SelfHealer cannot combine monitor_options read_every > 1 with a "
                             "process_group; use read_every=1 on several processes")
        self.monitor.explicit = True  # only the healer's served forward is counted
        self._source_state = self._adapter_state()
        self._input_taps: List[str] = []
        self.fisher: Dict[str, torch.Tensor] = {}
        self.events: List[HealEvent] = []
        self.event_count = 0  # events ever recorded (HealEvent.seq of the newest)
        self.versions: Dict[int, Dict[str, torch.Tensor]] = {0: self._source_state}
        self.version = 0
        self.good_version = 0
        self._next_version = 1
        self._worker_error: Optional[str] = None
        self._lock = threading.RLock()
        self._worker: Optional[threading.Thread] = None
        self._deferred: Optional[DeferredWorker] = None  # owns the worker thread and its stop flag
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, int(replay_size)))
        self._shadow = None
        self._reference_probs: Optional[torch.Tensor] = None
        # calibrated entropy levels of batch-statistics predictions (batch_diversity)
        self._diversity: Optional[Dict[str, float]] = None
        # per statistics adapter, how far one class moves its statistics
        # (_calibrate_class_shift; under _AGNOSTIC_SHIFT: class-agnostic)
        self._class_shift: Optional[List[float]] = None
        self._long_probs: Optional[torch.Tensor] = None
        self._listeners: List[Callable] = []
        # seconds of the last served batch: model forward (with taps and
        # adapters), monitor decision, adaptation and guards
        self.timing: Dict[str, float] = {}
        self._source_digest = tensor_digest(self._source_state)
        self._approved_digests = {self._source_digest}
        self._created_files = set()  # snapshot files this healer wrote (the only ones it may delete)
        if self.snapshots is not None:
            self.snapshots.save(self._source_state, {"version": 0, "kind": "source"})
        # decisions made with the CLI before this healer started are not its own
        self._request_seq = len(self.audit) and self.audit.records(newest_first=True, limit=1)[0].seq \
            if self.audit is not None else 0
        self._last_poll = 0.0
        self._reset_runtime()

    # ---------------------------------------------------------------- set-up

    def _default_taps(self, count: int) -> List[str]:
        """The monitor's default taps plus the first layer with parameters: its
        input is upstream of every adapter, so its divergence says whether the
        *input* drift has passed, whatever the adapters have learnt."""
        names = [tap.name for tap in default_taps(self.model, count)]
        for name, module in self.model.named_modules():
            if name and next(module.parameters(recurse=False), None) is not None:
                if name not in names:
                    names.insert(0, name)
                break
        return names

    def _to_source(self, adapters: Optional[AdapterSet] = None) -> None:
        """Adapter weights and statistics exactly as attached (the down
        projections included, which a zeroed up projection would only hide)."""
        (adapters or self.adapters).load_state_dict(self._source_state)

    def _reset_runtime(self) -> None:
        self.adapters.active = False
        self._to_source()
        self.versions = {0: self._source_state}
        self.version_digests = {0: self._source_digest}
        self._recent: deque = deque()
        self._recent_rows = 0
        self.approved_version = 0
        self.proposals: Dict[str, Dict[str, Any]] = {}
        self._stage = None
        self._stage_steps = 0
        self._policy_blocked: Optional[str] = None
        self._unchecked = False  # a published deferred step not yet through the rule gate
        self._input_visible = False  # the input-side tap has seen the current drift
        if self.bias_guard is not None:
            self.bias_guard.reset()
        self.good_version = 0
        self._last_snapshot_step = 0
        self.adapters.set_robust(False)
        self.optimizer = torch.optim.Adam(self.adapters.trainable(), lr=self.config["lr"]) \
            if self.adapters.trainable() else None
        self.learning_rate = self.config["lr"]
        self.steps = 0
        self.batches = 0
        self.guard_trips = 0
        self._episode_trips = 0
        self._last_snapshot_step = 0
        self.hold = False
        self.suspended = False
        self.clean_streak = 0
        self.selected_last_step = 0
        self._step_times: List[float] = []
        self._mean_probs: Optional[torch.Tensor] = None
        self._adapted_probs: Optional[torch.Tensor] = None
        self._source_probs: Optional[torch.Tensor] = None
        self._agreement: Optional[float] = None
        self._downstream_baseline: Optional[float] = None
        self._label_shift: Optional[float] = None
        self._robust = False
        # the batch-statistics check of the batch being served: True (many
        # classes), False (a run), None (not checked); and its information
        self._check: Optional[bool] = None
        self._served_fast = False
        self._served_source = None
        self._batch_information: Optional[float] = None
        self._batch_classes: Optional[float] = None  # (the predicted classes' diversity the check measured)
        self._batch_threshold: Optional[float] = None  # (the information threshold the check used)
        # the check's recent verdicts in this drift episode (1: many classes)
        self._check_prior = 1.0
        self._check_seconds = 0.0
        # the served forward's autograd graph, kept for this batch's step
        self._served_graph = None
        self._plain_output = False
        self._pending: List[torch.Tensor] = []
        if getattr(self, "_reference_probs", None) is not None:
            self._long_probs = self._reference_probs.clone()
        self.drift: Optional[DriftReport] = None
        self.version = 0

    @property
    def calibrated(self) -> bool:
        return self.monitor.calibrated

    @property
    def active(self) -> bool:
        return self.adapters.active

    @property
    def drift_detected(self) -> bool:
        return bool(self.drift is not None and self.drift.drift)

    def status(self) -> HealStatus:
        return HealStatus(self.active, self.version, self.steps, self.learning_rate, self.selected_last_step,
                          self.guard_trips, any(a.robust for a in self.adapters.norm_adapters()))

    @_outside_inference_mode
    def calibrate(self, batches: Iterable, **monitor_kwargs):
        """Calibrates the monitor on healthy ``batches`` (inputs, or ``(x, y)``
        pairs whose labels only fit the accuracy estimate's temperature) and
        estimates the Fisher information of the adapter parameters from the
        model's own pseudo-labels on the same data. Returns the monitor's
        ``CalibrationReport``."""
        # (the Fisher estimate needs autograd, which inference tensors cannot enter)
        batches = [_map_tensors(torch.Tensor.clone, b) if _has_inference_tensor(b) else b for b in batches]
        with self._lock:
            self._stop_worker()
            self._expire_logged_proposals("calibrate")
            self._reset_runtime()
            report = self.monitor.calibrate(batches, **monitor_kwargs)
            self._input_taps = [self.monitor.tap_names[0]]
            self._fit_fisher(batches)
            self._reference_probs = self._reference_class_mix(batches)
            self._long_probs = self._reference_probs.clone()
            self._diversity = self._calibrate_diversity(batches)
            self._class_shift = self._calibrate_class_shift(batches)
            self._mark_class_agnostic()
        return report

    def _diversity_rows(self) -> Optional[int]:
        """Fewest rows a batch needs for the batch-statistics check (the norm
        adapters' own minimum); None when there is nothing to check with."""
        norms = self.adapters.norm_adapters()
        if not norms or not self.config["batch_diversity"] or math.isinf(self.config["label_shift"]):
            return None
        return max(8, max(a.min_batch for a in norms))

    def _batch_statistics_sums(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[sum of entropies, rows, sum of probability vectors, rows per
        predicted class]`` of ``x``'s finite rows predicted with every
        BatchNorm on this batch's own statistics (no prior, whatever the
        batch size) and no other adapter applied: the source model
        re-normalised, as at calibration, however far the trained adapters
        have moved. Entropies normalised by ln C; float64 sums. Unseen by
        the monitor, running statistics untouched.

        Also the rows' spread at the input of the last BatchNorm layer in
        that forward (0-d): the log of the mean over channels of the variance
        across rows of each row's channel mean (its average over positions
        for a feature map), relative to the source variance. Rows of one
        class share their class's features, so they spread less there; the
        layers before are re-normalised, so a covariate drift moves it less
        than it moves the predictions."""
        adapters = self.adapters
        norms = adapters.norm_adapters()
        was = (adapters.active, adapters.statistics_only, [(a.robust, a.update_running, a.prior) for a in norms])
        rows = x[_finite_rows(x)]
        spread = []

        def measure_spread(module, args):
            features = args[0].detach().float()
            means = features.flatten(2).mean(dim=2) if features.dim() > 2 else features
            variance = means.var(dim=0, unbiased=False) / norms[-1].source_var.clamp_min(1e-12)
            spread.append(variance.mean().clamp_min(1e-12).log().double())
        handle = self._last_norm_module().register_forward_pre_hook(measure_spread)
        adapters.active, adapters.statistics_only = True, True
        for a in norms:
            a.robust, a.update_running, a.prior = False, False, 0.0
        try:
            with torch.no_grad(), self.monitor.paused():
                log_probs = torch.log_softmax(self._logits(self.model(rows)).float(), dim=1)
        finally:
            handle.remove()
            adapters.active, adapters.statistics_only = was[0], was[1]
            for a, (robust, update, prior) in zip(norms, was[2]):
                a.robust, a.update_running, a.prior = robust, update, prior
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(dim=1) / math.log(max(log_probs.shape[1], 2))
        kept = torch.isfinite(entropy)
        entropy, probs = entropy[kept].double(), probs[kept].double()
        counts = probs.new_zeros(probs.shape[1]).index_add_(0, probs.argmax(dim=1), probs.new_ones(probs.shape[0]))
        sums = torch.cat([torch.stack([entropy.sum(), torch.tensor(float(entropy.numel()), dtype=torch.float64,
                                                                   device=entropy.device)]), probs.sum(dim=0), counts])
        return sums, (spread[-1] if spread else torch.tensor(math.nan, dtype=torch.float64, device=sums.device))

    def _norm_modules(self) -> List[nn.Module]:
        """The BatchNorm layers of the statistics adapters, in their order."""
        return [self.model.get_submodule(p.target) for p in self.adapters.placements if p.kind == "norm"]

    def _last_norm_module(self) -> nn.Module:
        """The BatchNorm layer of the last statistics adapter."""
        return self._norm_modules()[-1]

    def _calibration_inputs(self, batches) -> List[torch.Tensor]:
        """The finite rows of the first 32 calibration batches, on the
        model's device; empty batches dropped."""
        device = self._device()
        inputs = [x[_finite_rows(x)] for x in (self._inputs(b).to(device) for b in batches[:32])]
        return [x for x in inputs if x.shape[0] > 0]

    @staticmethod
    def _information(sums: torch.Tensor) -> torch.Tensor:
        """What a batch's predictions say about which of its rows is which
        class: the entropy of their mean minus their mean entropy (the mutual
        information between row and predicted class), normalised by ln C.
        Near 0 when every row gets the same prediction (a run of one class
        re-normalised with its own statistics: the class signal is gone)."""
        rows, classes = sums[1], (sums.numel() - 2) // 2
        mean = (sums[2:2 + classes] / rows).clamp_min(1e-12)
        spread = -(mean * mean.log()).sum() / math.log(max(mean.numel(), 2))
        return spread - sums[0] / rows  # (0-d, on the batch's device: no host read)

    @staticmethod
    def _class_diversity(sums: torch.Tensor) -> torch.Tensor:
        """How many classes a batch's rows are predicted as: the entropy of
        the histogram of their argmax, normalised by ln C (0-d). Near 0 for a
        run of one class re-normalised with its own statistics (every row
        goes to the same class); a strong corruption that leaves the
        predictions vague (low information) leaves their argmax spread."""
        rows, classes = sums[1], (sums.numel() - 2) // 2
        share = (sums[2 + classes:] / rows).clamp_min(1e-12)
        return -(share * share.log()).sum() / math.log(max(classes, 2))

    def _calibrate_diversity(self, batches) -> Optional[Dict[str, float]]:
        """The information in batch-statistics predictions (``_information``)
        on healthy batches as served (many classes) and on batches of one
        source-predicted class (a run). A drift lowers the first level (a
        corrupted batch of many classes gives vaguer predictions) while the
        second stays where it was (its class signal is gone whatever the
        drift), so the threshold sits ``_CHECK_SPLIT`` of the way up from
        the run level. Both are measured at the calibration batch size
        (``rows``); the information of a smaller batch is lower (the mean of
        fewer predictions has less entropy, and a run's level spreads more),
        so small batches lean towards "run": no step, robust statistics.
        On the tests' task, calibrated at 64 rows: at 16 rows 4 of 30 healthy
        batches are taken for runs and 2 of 30 runs pass, at 64 none. (Each
        level followed to the batch size, fitted through half-size chunks,
        was tried: 0 and 7 of 30 at 16 rows, the wrong way round.) None when
        batch statistics do not erase the class signal (no room between the
        two levels).

        The rows' spread at the last BatchNorm layer (``_batch_statistics_sums``)
        is measured on the same batches. A strong drift lowers the information
        of batches of many classes to the runs' level (their predictions grow
        vague) but leaves their spread above the runs'; where the two levels
        of the spread are at least ``_SPREAD_SEPARATION`` standard deviations
        apart, a batch whose spread is above the half-way point also counts as
        many classes (on an MLP the runs' spread overlaps the healthy one's:
        off), provided healthy batches spread at least twice as much as
        runs (``_SPREAD_MIN_GAP``: a drift rescales the spread by factors).

        And the predicted classes' diversity (``_class_diversity``) on the
        same batches, used where its levels are ``_CLASSES_SEPARATION``
        standard deviations and ``_CLASSES_MIN_GAP`` apart
        (``_CLASSES_SPLIT``)."""
        minimum = self._diversity_rows()
        if minimum is None:
            return None
        device = self._device()
        inputs = self._calibration_inputs(batches)
        size = max((x.shape[0] for x in inputs), default=0)
        # sum and count of the information of healthy batches, of runs; the
        # batch size; sums and sums of squares of the spread of healthy
        # batches, of runs; and of the predicted classes' diversity (merged
        # over ranks)
        levels = torch.zeros(14, dtype=torch.float64, device=device)

        def measure(x, slot):
            if x.shape[0] >= minimum:
                sums, spread = self._batch_statistics_sums(x)
                if float(sums[1]) >= minimum:  # (rows whose predictions are finite)
                    levels[slot] += self._information(sums)
                    levels[slot + 1] += 1.0
                    levels[6 + slot] += spread
                    levels[7 + slot] += spread * spread
                    diversity = self._class_diversity(sums)
                    levels[10 + slot] += diversity
                    levels[11 + slot] += diversity * diversity
        try:
            for x in inputs:
                measure(x, 0)
            if inputs and all(x.shape[1:] == inputs[0].shape[1:] for x in inputs):
                pooled = torch.cat(inputs)
                with torch.no_grad(), self.monitor.paused():
                    self.adapters.active = False
                    predicted = torch.cat([self._logits(self.model(chunk)).argmax(dim=1)
                                           for chunk in pooled.split(max(size, 1))])
                for label in predicted.unique():
                    members = pooled[predicted == label]
                    for chunk in members.split(size)[:4]:
                        measure(chunk, 2)
        finally:
            self.adapters.active = False  # (the check itself restores every other flag)
        levels[4:6] = torch.tensor([float(size), 1.0], dtype=torch.float64, device=device)
        levels = self._merged(levels).tolist()  # every rank gets the same levels
        if levels[1] == 0 or levels[3] == 0:
            return None
        diverse, run = levels[0] / levels[1], levels[2] / levels[3]
        if diverse - run < 0.05:
            return None
        result = {"measure": "information", "diverse": diverse, "run": run,
                  "threshold": run + _CHECK_SPLIT * (diverse - run), "rows": levels[4] / levels[5],
                  "spread_diverse": None, "spread_run": None, "spread_separation": None, "spread_threshold": None,
                  "classes_diverse": None, "classes_run": None, "classes_separation": None, "classes_threshold": None}

        def separated(first):  # (healthy level, run level, d') of the measure summed from levels[first]
            def mean_and_variance(slot):
                mean = levels[first + slot] / levels[slot + 1]
                return mean, max(levels[first + 1 + slot] / levels[slot + 1] - mean * mean, 0.0)
            (healthy, healthy_var), (run, run_var) = mean_and_variance(0), mean_and_variance(2)
            return healthy, run, (healthy - run) / math.sqrt(max(0.5 * (healthy_var + run_var), 1e-12))
        if levels[1] >= 2 and levels[3] >= 2 and all(math.isfinite(v) for v in levels[6:10]):
            spread_diverse, spread_run, separation = separated(6)
            result.update(spread_diverse=spread_diverse, spread_run=spread_run, spread_separation=separation)
            if separation >= _SPREAD_SEPARATION and spread_diverse - spread_run >= _SPREAD_MIN_GAP:
                result["spread_threshold"] = spread_run + _SPREAD_SPLIT * (spread_diverse - spread_run)
        if levels[1] >= 2 and levels[3] >= 2:
            classes_diverse, classes_run, separation = separated(10)
            result.update(classes_diverse=classes_diverse, classes_run=classes_run, classes_separation=separation)
            if separation >= _CLASSES_SEPARATION and classes_diverse - classes_run >= _CLASSES_MIN_GAP:
                result["classes_threshold"] = classes_run + _CLASSES_SPLIT * (classes_diverse - classes_run)
        return result

    def _calibrate_class_shift(self, batches) -> Optional[List[float]]:
        """How far one class moves each statistics layer's statistics
        (``_AGNOSTIC_SHIFT``), one value per statistics adapter: the source
        model forwards the calibration rows (adapters off), each row's
        first and second moments per channel at the layer's input (over
        positions, for a feature map) are pooled by the row's predicted
        class, and each class of at least the statistics adapters' minimum
        batch is compared with all rows. Merged over ranks. None without
        statistics adapters, with the label-shift guard off (no robust
        mode), or without a class of that many rows."""
        norms = self.adapters.norm_adapters()
        if not norms or math.isinf(self.config["label_shift"]):
            return None
        device = self._device()
        inputs = self._calibration_inputs(batches)
        modules = self._norm_modules()
        classes = self._long_probs.numel()
        # per layer and predicted class: sums of (1, row means, row second
        # moments) per channel, in one tensor (one collective)
        widths = [1 + 2 * a.source_mean.numel() for a in norms]
        sums = torch.zeros(classes, sum(widths), dtype=torch.float64, device=device)
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        moments: List[Optional[torch.Tensor]] = [None] * len(modules)

        def capture(index):
            def hook(module, args):
                # (float32 over positions, float64 from there: no float64
                # copy of a large feature map)
                features = args[0].detach().float()
                features = features.flatten(2) if features.dim() > 2 else features.unsqueeze(2)
                moments[index] = torch.cat([torch.ones(features.shape[0], 1, dtype=torch.float64, device=device),
                                            features.mean(dim=2).double(), features.square().mean(dim=2).double()],
                                           dim=1)
            return hook
        was_active = self.adapters.active
        handles = [module.register_forward_pre_hook(capture(i)) for i, module in enumerate(modules)]
        try:
            with torch.no_grad(), self.monitor.paused():
                self.adapters.active = False
                for x in inputs:
                    moments[:] = [None] * len(modules)
                    predicted = self._logits(self.model(x)).argmax(dim=1)
                    for index, rows in enumerate(moments):
                        if rows is None or rows.shape != (predicted.shape[0], widths[index]):
                            continue  # (a layer not reached, or reached by other rows)
                        kept = torch.isfinite(rows).all(dim=1)
                        sums[:, offsets[index]: offsets[index] + widths[index]].index_add_(
                            0, predicted[kept], rows[kept])
        finally:
            for handle in handles:
                handle.remove()
            self.adapters.active = was_active
        sums = self._merged(sums)
        minimum = max(8, max(a.min_batch for a in norms))
        shifts = []
        for offset, width in zip(offsets, widths):
            total = sums[:, offset: offset + width]
            channels = (width - 1) // 2
            count, first, second = total[:, :1], total[:, 1:1 + channels], total[:, 1 + channels:]
            large = count[:, 0] >= minimum
            if not bool(large.any()):
                shifts.append(math.nan)
                continue
            rows = count.sum()
            mean = first.sum(dim=0) / rows
            var = (second.sum(dim=0) / rows - mean * mean).clamp_min(1e-12)
            class_mean = first[large] / count[large]
            class_var = (second[large] / count[large] - class_mean * class_mean).clamp_min(1e-12)
            shift = ((class_mean - mean) ** 2 / var + (class_var / var).log() ** 2).mean(dim=1)
            shifts.append(float(shift.mean()))
        return None if all(math.isnan(v) for v in shifts) else shifts

    def _mark_class_agnostic(self) -> None:
        """Marks the statistics adapters whose calibrated class shift is under
        ``_AGNOSTIC_SHIFT``: robust mode leaves them on batch statistics."""
        shifts = self._class_shift or []
        for index, adapter in enumerate(self.adapters.norm_adapters()):
            adapter.class_agnostic = index < len(shifts) and shifts[index] < _AGNOSTIC_SHIFT

    def _batch_is_diverse(self, x: torch.Tensor, onset: bool = False) -> Optional[bool]:
        """The batch-statistics check: True when ``x``'s predictions with its
        own statistics tell its rows apart (information above the threshold
        of ``_information_threshold``: the calibrated one, moved by the
        check's recent verdicts; or, where calibration found it telling, the rows' spread
        at the last BatchNorm layer above its threshold; or, where calibration
        found it telling, the predicted classes' diversity above its threshold
        with the information at least at the lowest swayed split:
        ``_CLASSES_SPLIT``), False when not (a
        run of classes), None when it cannot tell (no check, too few rows).
        Under a process group each rank measures its own rows, as at
        calibration, and the ranks decide together on the means of their
        measures."""
        minimum = self._diversity_rows()
        if self._diversity is None or minimum is None:
            return None
        local = torch.zeros(5, dtype=torch.float64, device=self._device())
        if x.dim() and x.shape[0] >= minimum:
            sums, spread = self._batch_statistics_sums(x)
            valid = sums[1] >= minimum  # (rows whose predictions are finite)
            spread_valid = valid & torch.isfinite(spread)
            local = torch.stack([torch.where(valid, self._information(sums), 0.0), valid.double(),
                                 torch.where(spread_valid, spread, 0.0), spread_valid.double(),
                                 torch.where(valid, self._class_diversity(sums), 0.0)])
        merged = self._merged(local).tolist()  # (the check's one host read)
        if merged[1] == 0:
            return None
        levels = self._diversity
        self._batch_information = merged[0] / merged[1]
        self._batch_spread = merged[2] / merged[3] if merged[3] else None
        self._batch_classes = merged[4] / merged[1]
        spread_threshold, classes_threshold = levels.get("spread_threshold"), levels.get("classes_threshold")
        self._batch_threshold = self._information_threshold(onset)
        floor = levels["run"] + (_CHECK_SPLIT - 0.5 * _CHECK_SWAY) * (levels["diverse"] - levels["run"])
        spread_says = spread_threshold is not None and self._batch_spread is not None and \
            self._batch_spread > spread_threshold
        classes_say = classes_threshold is not None and self._batch_classes > classes_threshold and \
            self._batch_information > floor
        diverse = self._batch_information > self._batch_threshold or spread_says or classes_say
        self._check_prior = (1 - _CHECK_MEMORY) * self._check_prior + _CHECK_MEMORY * float(diverse)
        return diverse

    def _information_threshold(self, onset: bool = False) -> float:
        """The information above which the check calls a batch "many
        classes": ``_CHECK_SPLIT`` of the way up from the runs' calibrated
        level to the healthy batches', moved by the check's recent verdicts
        in this drift episode (``_check_prior``: 1 after a row of "many
        classes", 0 after a row of runs) by up to ``_CHECK_SWAY / 2`` either
        way. Runs of classes persist over batches, and so does an i.i.d.
        drifted stream, while one batch's information scatters around its
        level: the verdicts before it are a prior for this one. The check
        of the batch that activated the adapters (``onset``: no verdicts
        yet, and a run that passes is served worse than the source served
        it) uses the calibrated threshold; its verdict then counts as any
        other's from the episode's start at "many classes"."""
        levels = self._diversity
        if onset:
            return levels["threshold"]
        return levels["threshold"] + _CHECK_SWAY * (0.5 - self._check_prior) * (levels["diverse"] - levels["run"])

    def _inputs(self, batch):
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        return batch

    def _logits(self, output) -> torch.Tensor:
        return as_logits(output, self.logits_fn)

    def _fit_fisher(self, batches) -> None:
        """Diagonal Fisher of the adapter parameters at the source (adapters
        active at identity), from cross-entropy with the model's own argmax."""
        parameters = dict(self.adapters.named_parameters())
        fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
        if not parameters:
            self.fisher = fisher
            return
        samples = 0
        self.adapters.active = True
        self.adapters.set_update_running(False)
        try:
            with self.monitor.paused():
                for batch in batches[:32]:
                    x = self._inputs(batch).to(self._device())
                    finite = _finite_rows(x)
                    x = x[finite]
                    if x.shape[0] == 0:
                        continue
                    for p in parameters.values():
                        p.grad = None
                    with torch.enable_grad():
                        for p in parameters.values():
                            p.requires_grad_(True)
                        logits = self._logits(self.model(x)).float()
                        loss = nn.functional.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
                        loss.backward()
                    for name, p in parameters.items():
                        if p.grad is not None:
                            fisher[name] += p.grad.detach() ** 2 / x.shape[0]
                    samples += 1
        finally:
            for p in parameters.values():
                p.grad = None
            self.adapters.active = False
            self.adapters.set_update_running(True)
            self._to_source()
        scale = max(samples, 1)
        total = [f / scale for f in fisher.values()]
        mean = torch.cat([f.flatten() for f in total]).mean().item() if total else 0.0
        # A floor keeps every parameter anchored a little (a zero-initialised
        # up-projection makes the down-projection's Fisher exactly zero).
        floor = max(mean * 0.01, 1e-8)
        self.fisher = {name: f / scale + floor for name, f in fisher.items()}

    def _reference_class_mix(self, batches) -> torch.Tensor:
        """Mean predicted class probabilities of the source on healthy data."""
        total, rows = None, 0
        with torch.no_grad(), self.monitor.paused():
            for batch in batches[:32]:
                x = self._inputs(batch).to(self._device())
                x = x[_finite_rows(x)]
                if x.shape[0] == 0:
                    continue
                probs = torch.softmax(self._logits(self.model(x)).float(), dim=1).sum(dim=0).double()
                total = probs if total is None else total + probs
                rows += x.shape[0]
        classes = self._logits(self.model(self._inputs(batches[0]).to(self._device())[:1])).shape[1] \
            if total is None else total.numel()
        merged = torch.zeros(classes + 1, dtype=torch.float64, device=self._device())
        if total is not None:
            merged[:classes] = total.to(merged.device)
            merged[classes] = rows
        # every rank starts from the same mix, so the label-ordered decisions agree
        merged = self._merged(merged)
        if float(merged[classes]) == 0:
            raise ValueError("selfheal: calibration data has no finite row")
        return (merged[:classes] / merged[classes]).cpu()

    def _device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    # ------------------------------------------------------------- serving

    @_outside_inference_mode
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predicts ``x``, updates the monitor, and — if drift is active —
        adapts on ``x`` after predicting. Returns the model's output for ``x``."""
        if not self.calibrated:
            raise RuntimeError("selfheal: SelfHealer called before calibrate(); calibrate on healthy data first")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"selfheal: SelfHealer takes a tensor batch, got {type(x).__name__}")
        if x.is_inference():
            x = x.clone()  # (a step needs autograd, which inference tensors cannot enter)
        with self._lock:
            try:
                output = self._serve_approved(x) if self.config["approval"] else self._serve(x)
            finally:
                self._served_graph = None  # (a step took it, none was taken, or serving raised)
            report = self.drift
        self._notify(report)
        return output

    def _serve(self, x: torch.Tensor) -> torch.Tensor:
        if self.audit_error is not None and (self.adapters.active or self._worker is not None):
            self._stop_worker()
            self.adapters.active = False  # never adapt unaudited
        if self._unchecked and self.rules and self.active and not self.suspended:
            self._unchecked = False
            self._gate_rules()  # a version the deferred worker published: checked before it serves
        # Not diverse enough to trust (label-ordered streams): normalise
        # with the running statistics, updated slowly from these batches
        # (over many runs of classes, RoTTA-style). Outside the policy's
        # hours the statistics are held.
        held = not self.policy.hours_allow()
        # The source's class mix says "run" (or half-says it: a confused
        # drifted source spreads its predictions over a run of one class),
        # and a drift can make it predict one class for every input, which
        # looks like a run too: the batch-statistics check decides.
        self._check, self._batch_information, self._batch_spread, self._batch_classes = None, None, None, None
        self._batch_threshold = None
        self._served_source = None
        checked = time.perf_counter()
        if not held and self.active and not self.suspended:
            hinted = self._robust_norm() or self._run_hinted(self._label_shift)
            if not hinted:
                # this batch's own source class mix (the source forward the
                # guards take anyway, taken before serving): a run that
                # begins here is checked before it is served, never served
                # with its own statistics nor folded into the recent
                # stream's moments at the fast rate
                self._served_source = self._source_logits(x)
                source = self._served_source if self._served_source is not None else \
                    torch.empty(0, self._long_probs.numel(), device=self._device())  # (an empty batch)
                hinted = self._looks_like_run(self._guard_statistics(source, source))  # (a collective)
            if hinted:
                self._check = self._batch_is_diverse(x)
        self._check_seconds = time.perf_counter() - checked  # (adaptation overhead in self.timing)
        self.adapters.set_robust(self._in_run() or held)
        self.adapters.set_update_running(not held)
        # (the statistics adapters fold this batch in at the fast rate)
        self._served_fast = self.active and not self.suspended and not held and not self._in_run()
        # The monitor's read_every spares dormant serving; every batch is
        # read while the adapters work (release and guards need each one).
        self.monitor.read_all = self.active or self.suspended
        output, logits, report = self._served_forward(x, keep_graph=self._step_expected(x, held))
        if self.rules or self.bias_guard is not None:
            self._remember(x)
        if self.active or self.suspended:
            self._after_batch(x, logits, report)
        elif report.read:
            # (the batch that activates the adapters is folded into the
            # recent class mix twice: here and after it is served again)
            self._track(logits)
            if report.drift and self.audit_error is None and self._policy_allows():
                self._activate(report)
                output, logits = self._serve_onset(x, output, logits)
                self._after_batch(x, logits, report)
        self._end_timing()
        return output

    def _step_expected(self, x: torch.Tensor, held: bool) -> bool:
        """Whether this batch will be learnt from inline, as far as is known
        before it is served: its served forward then records the autograd
        graph the step reuses (one forward pass fewer per step). The served
        values are the same either way."""
        if self._rate_exhausted(time.monotonic()):
            return False  # the rate limit will refuse the step
        return (self.active and not self.suspended and not self.hold and not held and self.audit_error is None
                and self.config["mode"] == "inline" and self.optimizer is not None and self._plain_output
                and not self._in_run() and x.dim() > 0 and x.shape[0] >= self.config["min_step_samples"]
                and x.is_floating_point())

    def _rate_exhausted(self, now: float) -> bool:
        """Whether the policy's steps-per-minute cap is reached (the step
        times of the last minute are kept, older ones dropped)."""
        limit = self.policy.max_steps_per_minute
        if limit is None:
            return False
        self._step_times = [t for t in self._step_times if now - t < 60.0]
        return len(self._step_times) >= limit

    def _serve_onset(self, x: torch.Tensor, output, logits: torch.Tensor):
        """The batch that activated the adapters was served by the source
        model; it is served again as the active healer serves every batch,
        with its own BatchNorm statistics, when the batch-statistics check
        says it holds many classes (without the check, never). A run of one
        class keeps the source's output, even one the drifted source does not
        recognise as a run (its predictions spread). No weight has changed
        yet, so predict-first holds; the extra forwards (check, re-serve)
        happen once per drift episode."""
        norms = self.adapters.norm_adapters()
        if not norms or self._diversity is None:
            return output, logits
        self._check = self._batch_is_diverse(x, onset=True)  # (a collective: before any rank-local branch)
        if self._check is not True or x.shape[0] < norms[0].min_batch:
            return output, logits
        self.adapters.set_robust(False)
        with torch.no_grad(), self.monitor.paused():
            output = self.model(x)
        return output, self._logits(output).detach()

    def _served_forward(self, x: torch.Tensor, keep_graph: bool = False):
        """The served forward pass (counted by the monitor) and its decision:
        ``(output, detached logits, report)``; marks the phase times. With
        ``keep_graph`` the forward records the adapters' autograd graph for
        this batch's step (``_served_graph``); the output returned is detached."""
        started = time.perf_counter()
        self.batch_samples = int(x.shape[0]) if x.dim() else 1  # samples in the batch being served
        self._served_graph = None
        with torch.set_grad_enabled(keep_graph), self.monitor.watching():
            output = self.model(x)
        # (only a plain tensor output is ever served from a recorded graph:
        # it is detached here, and nothing else can hold on to the graph)
        self._plain_output = isinstance(output, torch.Tensor)
        if keep_graph and self._plain_output:
            self._served_graph = (x, output)
            output = output.detach()
        elif keep_graph:  # (the output's type changed since the last batch: nothing reused)
            output = _map_tensors(torch.Tensor.detach, output)
        served = time.perf_counter()
        report = self._read(output)
        self._marks = (started, served, time.perf_counter())
        return output, self._logits(output).detach(), report

    def _end_timing(self) -> None:
        started, served, decided = self._marks
        self.timing = {"forward": served - started, "monitor": decided - served,
                       "adapt": time.perf_counter() - decided + self._check_seconds}

    def add_listener(self, listener: Callable[["SelfHealer", DriftReport], None]) -> None:
        """Calls ``listener(healer, report)`` after every served batch (e.g.
        ``selfheal_ext.metrics.Metrics``). A listener that raises is removed
        and reported with a warning; serving goes on."""
        self._listeners.append(listener)

    def remove_listener(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, report: DriftReport) -> None:
        for listener in list(self._listeners):
            try:
                listener(self, report)
            except Exception as error:  # noqa: BLE001 - observers never break serving
                if listener in self._listeners:
                    self._listeners.remove(listener)
                warnings.warn(f"selfheal: listener {listener!r} raised {type(error).__name__}: {error}; removed",
                              RuntimeWarning, stacklevel=4)  # (_notify, __call__, its decorator's wrapper)

    def _read(self, output) -> DriftReport:
        """The monitor's decision for the batch just served; the onset of an
        alarm is an event (with the score and its attribution)."""
        previous = self.drift
        report = self.monitor.update(output)
        self.drift = report
        self.batches += 1
        every = self.config["audit_every"]
        # every `audit_every` readings (with read_every, unread batches repeat
        # the last reading and are not recorded again)
        if every and report.read and self.audit is not None and self.audit_error is None \
                and self.monitor.batches_seen % every == 0:
            self._audit_monitor(report)
        if report.drift and not (previous is not None and previous.drift):
            attribution = report.attribution
            self._event("drift", score=report.score, threshold=report.threshold, reasons=list(report.reasons),
                        cusum=list(report.cusum), accuracy_estimate=report.accuracy_estimate,
                        signals=attribution.signals if attribution else {},
                        features=attribution.features if attribution else {})
        return report

    def _audit_monitor(self, report: DriftReport) -> None:
        """The monitor's reading as an audit record (not a HealEvent: a
        measurement, not something the healer did)."""
        try:
            self.audit.append(
                "monitor", version=self.version, batch=self.batches, score=report.score,
                threshold=report.threshold, cusum=list(report.cusum), cusum_threshold=report.cusum_threshold,
                drift=report.drift, reasons=list(report.reasons), entropy_mean=report.entropy_mean,
                entropy_tail=report.entropy_tail, accuracy_estimate=report.accuracy_estimate,
                batch_accuracy_estimate=report.batch_accuracy_estimate, samples=report.samples, read=report.read,
                nonfinite_samples=report.nonfinite_samples, warming_up=report.warming_up,
                active=self.active, approved_version=self.approved_version)
        except Exception as error:  # noqa: BLE001 - same rule as for events
            self.audit_error = f"{type(error).__name__}: {error}"
            warnings.warn(f"selfheal: audit log write failed ({self.audit_error}); adaptation is suspended "
                          "until reset()", RuntimeWarning, stacklevel=3)
            self.suspended = True
            self.hold = True

    def _remember(self, x: torch.Tensor) -> None:
        """Keeps the newest ``buffer_size`` finite rows of served inputs (rule
        checks, proposal evidence), each batch as ``[rows, finite mask, source
        probabilities or None]`` (the source model's are filled in when the
        batch's source forward runs anyway, and never change)."""
        if x.dim() == 0 or x.shape[0] == 0:
            return
        finite = _finite_rows(x)
        rows = x[finite].detach()
        if rows.shape[0] == 0:
            return
        if self._recent and self._recent[0][0].shape[1:] != rows.shape[1:]:
            self._recent.clear()  # the input shape changed: old rows cannot be batched with new ones
            self._recent_rows = 0
        self._recent.append([rows.clone(), finite, None, self.batches])
        self._recent_rows += rows.shape[0]
        limit = self.config["buffer_size"]
        while self._recent and self._recent_rows - self._recent[0][0].shape[0] >= limit:
            self._recent_rows -= self._recent.popleft()[0].shape[0]

    def _remember_source(self, source_logits: Optional[torch.Tensor]) -> None:
        """Attaches the source model's probabilities of this batch's rows."""
        if source_logits is None or not self._recent or self._recent[-1][3] != self.batches:
            return
        entry = self._recent[-1]
        if source_logits.shape[0] == entry[1].shape[0]:
            entry[2] = torch.softmax(source_logits[entry[1]].float(), dim=1)

    def _buffer(self) -> Optional[torch.Tensor]:
        if not self._recent:
            return None
        return torch.cat([entry[0] for entry in self._recent])[-self.config["buffer_size"]:]

    def _buffer_source(self) -> Optional[torch.Tensor]:
        """The source probabilities of ``_buffer()``'s rows, when all are known."""
        if not self._recent or any(entry[2] is None for entry in self._recent):
            return None
        return torch.cat([entry[2] for entry in self._recent])[-self.config["buffer_size"]:]

    def _robust_norm(self) -> bool:
        """Classes arriving in runs (label-ordered streams): BatchNorm
        statistics from such batches would be poisoned and entropy steps would
        pull every input towards the current class. Detected when the batch's
        class mix (source predictions) departs from the recent stream's, with
        hysteresis (on above ``label_shift``, off below half of it). A source
        model that predicts one class for everything under drift does not
        trigger it once the recent mix has followed (about a window)."""
        if self._label_shift is None:
            return self._robust
        threshold = self.config["label_shift"]
        if self._label_shift > threshold:
            self._robust = True
        elif self._label_shift < 0.5 * threshold:
            self._robust = False
        return self._robust

    def _in_run(self) -> bool:
        """This batch is treated as part of a run of classes (robust
        statistics, no entropy step): the batch-statistics check decides when
        it ran, the label-shift guard otherwise."""
        if self._check is not None:
            return not self._check
        return self._robust_norm()

    def _run_hinted(self, label_shift: Optional[float]) -> bool:
        """A label shift above a quarter of the guard's threshold: too weak
        to call a run, enough to ask the batch-statistics check."""
        return label_shift is not None and label_shift > 0.25 * self.config["label_shift"]

    def _track(self, source_logits: torch.Tensor) -> None:
        """Class mix of a batch served by the source model."""
        self._track_merged(self._guard_statistics(source_logits, source_logits))

    def _track_merged(self, stats: torch.Tensor) -> None:
        """Compares the batch's source-predicted class mix with the stream's
        recent mix (merged over ranks), then folds it in. Batches under 8
        samples say too little about their class mix and are only folded in."""
        rows = float(stats[1])
        if rows < 1:
            return
        self._label_shift = self._expected_shift(stats)
        classes = (stats.numel() - 2) // 2
        batch = (stats[2 + classes:] / rows).cpu().clamp_min(1e-8)
        weight = rows / (rows + self.monitor.config["window"])
        self._long_probs = (1 - weight) * self._long_probs + weight * batch.double()

    def _expected_shift(self, stats: torch.Tensor) -> Optional[float]:
        """The label-shift guard's level once this batch is folded in."""
        shift = self._batch_shift(stats)
        return self._label_shift if shift is None else \
            shift if self._label_shift is None else 0.5 * self._label_shift + 0.5 * shift

    def _looks_like_run(self, stats: torch.Tensor) -> bool:
        """Whether the label-shift guard, with this batch's class mix folded
        in, would treat it as part of a run of classes, or hint at one."""
        expected = self._expected_shift(stats)
        threshold = self.config["label_shift"]
        return expected is not None and (expected > threshold or (self._robust and expected >= 0.5 * threshold)
                                         or self._run_hinted(expected))

    def _batch_shift(self, stats: torch.Tensor) -> Optional[float]:
        """KL divergence of the batch's source class mix from the recent
        stream's (None under 8 rows); 0 for a batch at least as diverse as the
        recent stream, or judged diverse by its batch statistics."""
        rows = float(stats[1])
        if rows < 8:
            return None
        classes = (stats.numel() - 2) // 2
        batch = (stats[2 + classes:] / rows).cpu().clamp_min(1e-8)
        recent = self._long_probs.clamp_min(1e-8)
        # Only a batch *less* diverse than the recent stream is a run of
        # classes; a more diverse one is the stream recovering (a source
        # model that collapsed on one class under a drift, now served
        # clean data again), which must not freeze the statistics.
        if _effective_from_mean(batch) >= _effective_from_mean(recent) or self._check is True:
            return 0.0
        return float((batch * (batch / recent).log()).sum())

    def _source_logits(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The source model's logits for ``x`` (adapters switched off for one
        extra forward pass, unseen by the monitor); None for an empty batch
        (or a 0-d tensor: the served forward reports what is wrong with it)."""
        if x.dim() == 0 or x.shape[0] < 1:
            return None
        was_active = self.adapters.active
        with torch.no_grad(), self.monitor.paused():
            self.adapters.active = False
            try:
                return self._logits(self.model(x)).detach()
            finally:
                self.adapters.active = was_active

    def _activate(self, report: DriftReport) -> None:
        self._check_prior = 1.0  # (a new episode: see _information_threshold)
        self.adapters.active = True
        self.clean_streak = 0
        self._downstream_baseline = None
        self._adapted_probs = None
        self._source_probs = None
        self._agreement = None
        self._pending = []
        self._input_visible = False
        self._drift_passed(report)  # the activating batch may already show it on the input side
        self._event("activate", score=report.score, reasons=list(report.reasons),
                    top_signal=report.attribution.top_signal if report.attribution else None)
        if self.config["mode"] == "deferred":
            self._start_worker()

    def _drift_passed(self, report: DriftReport) -> bool:
        """Whether this batch looks clean. When the input-side tap has seen
        this drift, it alone decides (under half the threshold): the layers
        after the adapters show what the adapters do as much as what the data
        does. A drift the input side never saw (a rotation leaves each
        channel's mean and spread alone) must also have no alarm at all, or
        the healer would release and re-activate batch after batch."""
        threshold = self.monitor.window_threshold
        input_z = max((report.signals.get(name, 0.0) for name in self._input_taps), default=0.0)
        if input_z >= threshold:
            self._input_visible = True
        return input_z < 0.5 * threshold and (self._input_visible or not report.drift)

    def _after_batch(self, x: torch.Tensor, logits: torch.Tensor, report: DriftReport) -> None:
        self.clean_streak = self.clean_streak + 1 if self._drift_passed(report) else 0
        release_after = self._release_after(report)
        if self.clean_streak >= release_after and not report.warming_up:
            self._release()
            return
        if self.suspended:
            self._track(logits)  # dormant: the served logits are the source's
            return
        source_logits = self._served_source if self._served_source is not None else self._source_logits(x)
        self._remember_source(source_logits)
        stats = self._guard_statistics(logits, source_logits)
        self._track_merged(stats)
        if self._served_fast and self._in_run():
            # served as many classes, and the label-shift guard, with this
            # batch folded in, calls it a run (the check could not tell:
            # too few rows, or no check): its statistics move the recent
            # stream's moments only as a run's do
            self.adapters.refold_robust()
        self._merge_running()
        if self._guards(stats, report):
            return
        # (runs of classes included: the guard compares the adapted and the
        # source predictions of the same inputs, which a run does not bias)
        if self.bias_guard is not None and source_logits is not None:
            reason = self.bias_guard.update(x, logits, source_logits)
            if reason is not None:
                self._stop_adapting("bias", reason, **self.bias_guard.last)
                return
        self._adapt(x)
        if self.rules and self.active and not self.suspended:
            # every batch, stepped or not: statistics adaptation alone changes
            # predictions too (a violation in hold suspends adaptation)
            self._unchecked = False
            self._gate_rules()

    def _adapt(self, x: torch.Tensor) -> None:
        if self.hold:
            return
        if not self._policy_allows():
            return
        if self._in_run():
            # Batches far less diverse than healthy ones (classes arriving in
            # runs): entropy minimisation on them drives the adapters towards
            # the current class, the known failure of TENT-like updates on
            # label-ordered streams. Wait for diverse batches.
            # the statistics still moved (slowly): the state is hashed as for a step
            self._event("skip", state_hash=tensor_digest(self.adapters.state_dict()) if self.audit is not None
                        else None, reason="classes arrive in runs", label_shift=self._label_shift,
                        batch_information=self._batch_information, check_threshold=self._batch_threshold,
                        batch_spread=self._batch_spread, batch_classes=self._batch_classes)
            return
        x = self._gather_small(x)
        if x is None:
            return
        if self.config["mode"] == "inline":
            self._step(x)
        else:
            self._enqueue(x)

    # -------------------------------------------------------------- policy

    def _policy_allows(self) -> bool:
        """Allowed hours of the policy: outside them no step is taken (one
        ``policy`` event when the block starts)."""
        if self.policy.hours_allow():
            if self._policy_blocked == "hours":
                self._policy_blocked = None
            return True
        if self._policy_blocked != "hours":
            self._policy_blocked = "hours"
            self._event("policy", limit="allowed_hours", value=self.policy.clock().hour,
                        bound=list(self.policy.allowed_hours), action="no steps until the allowed hours")
        return False

    def _stop_adapting(self, kind: str, reason: str, **detail) -> None:
        """A limit was violated: back to the last good version (the source if
        none) and no more adapter training in this drift episode; violated
        again with training stopped (statistics adaptation alone, or a good
        version that was itself at fault): the source model, exactly."""
        self._event(kind, reason=reason, **detail)
        if self.bias_guard is not None:
            self.bias_guard.reset()  # judge what is served from now on, not the past
        if self.hold:
            self._restore(0, reason=kind, keep_active=True)
            self.suspended = True
            self.adapters.active = False
            self._event("suspend", reason=f"{kind} with adapter training stopped")
            return
        self._restore(self.good_version, reason=kind, keep_active=True)
        self.hold = True
        self._event("hold", reason=reason)

    def _gate_rules(self) -> None:
        """After a step: the adapted model against the source on the recent
        buffer; a rule it violates more than the source does trips the guard
        (the version is refused and rolled back)."""
        # The restored version is checked too: good version, then the source
        # weights (hold), then suspension (the source model exactly).
        for _ in range(_MAX_EPISODE_TRIPS + 2):
            if not self.active or self.suspended:
                return
            try:
                results = self._check_rules_on(self.model, self.adapters)
            except Exception as error:  # noqa: BLE001 - a rule that cannot be evaluated counts as broken
                self._trip(f"rule check failed: {type(error).__name__}: {error}", kind="rule_violation")
                continue
            failed = [r for r in results if not r.ok]
            if not failed:
                return
            self._trip("; ".join(f"rule {r.rule!r} violated ({r.violation:.4g} vs source "
                                 f"{r.source_violation if r.source_violation is None else round(r.source_violation, 6)})"
                                 for r in failed),
                       kind="rule_violation", results=[r.as_dict() for r in results])

    def _check_rules_on(self, model: nn.Module, adapters: AdapterSet, inputs: Optional[torch.Tensor] = None,
                        source_probs: Optional[torch.Tensor] = None):
        if inputs is None:
            inputs, source_probs = self._buffer(), self._buffer_source()
        if inputs is None or not self.rules:
            return []
        context = self._rule_context(model, adapters, inputs, grad=False, source_probs=source_probs)
        return check_rules(self.rules, context)

    def _rule_context(self, model: nn.Module, adapters: AdapterSet, inputs: torch.Tensor, grad: bool,
                      logits: Optional[torch.Tensor] = None,
                      source_probs: Optional[torch.Tensor] = None) -> RuleContext:
        """Adapted and source probabilities of ``inputs`` (``logits``: the
        adapted ones, already computed with grad), and model functions for
        rules that query other inputs. Runs without touching the monitor or
        the BatchNorm statistics; adapters in serving configuration."""
        quiet = self.monitor.paused if model is self.model else contextlib.nullcontext
        was_active, was_update = adapters.active, [a.update_running for a in adapters.norm_adapters()]

        def probs_fn(active: bool, with_grad: bool):
            def run(z: torch.Tensor) -> torch.Tensor:
                adapters.active = active
                adapters.set_update_running(False)
                try:
                    with quiet(), (torch.enable_grad() if with_grad else torch.no_grad()):
                        return torch.softmax(self._logits(model(z)).float(), dim=1)
                finally:
                    adapters.active = was_active
                    for a, flag in zip(adapters.norm_adapters(), was_update):
                        a.update_running = flag
            return run

        adapted_fn, source_fn = probs_fn(True, grad), probs_fn(False, False)
        probs = torch.softmax(logits.float(), dim=1) if logits is not None else adapted_fn(inputs)
        needs_source = any(r.needs_source or not grad for r in self.rules)
        source = source_probs if source_probs is not None else (source_fn(inputs) if needs_source else None)
        return RuleContext(inputs=inputs, probs=probs, source_probs=source, model=adapted_fn, source_model=source_fn)

    def _gather_small(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Small batches (fewer than ``min_step_samples`` rows, e.g. one
        sample at a time) are pooled until there are enough for one step: an
        entropy gradient from a single sample is mostly noise. Under a process
        group every rank steps on every batch (the steps are collectives)."""
        minimum = self.config["min_step_samples"]
        if self.process_group is not None or x.shape[0] >= minimum:
            return x
        self._pending.append(x.detach())
        if sum(p.shape[0] for p in self._pending) < minimum:
            return None
        pooled = torch.cat(self._pending)
        self._pending = []
        return pooled

    def _release_after(self, report: DriftReport) -> int:
        """Batches that fill the monitor's window (or ``release_after``)."""
        return self.config["release_after"] or max(
            1, math.ceil(self.monitor.config["window"] / max(report.samples, 1)))

    def _release(self) -> None:
        self._stop_worker()
        self.adapters.active = False
        self._to_source()
        self._reset_optimizer()
        self.version = 0
        self.hold = False
        self.suspended = False
        self._episode_trips = 0
        self._event("release", clean_batches=self.clean_streak)
        self.clean_streak = 0

    # -------------------------------------------------------------- guards

    def _merged(self, values: torch.Tensor) -> torch.Tensor:
        """Sums ``values`` over the process group's ranks (as is without one)."""
        if self.process_group is not None:
            import torch.distributed as dist
            values = values.clone()
            dist.all_reduce(values, group=self.process_group)
        return values

    def _merge_running(self) -> None:
        """Under a process group, sets every statistics adapter's running
        moments to those of the mixture of the ranks' (each rank worth the
        same): the recent stream is the whole fleet's traffic, and every rank
        normalises with, snapshots and hashes the same statistics. One
        all_reduce of two floats per channel, after each active batch's folds
        (every rank reaches it: the decisions before it are merged). A rank's
        batch is then worth ``count / (count + running_horizon)`` of its
        share: the horizon counts samples per rank."""
        norms = self.adapters.norm_adapters()
        if self.process_group is None or not norms:
            return
        import torch.distributed as dist
        moments = torch.cat([torch.cat([a.running_mean.double(), a.running_var.double() + a.running_mean.double() ** 2])
                             for a in norms])
        moments = self._merged(moments) / dist.get_world_size(self.process_group)
        offset = 0
        for a in norms:
            channels = a.running_mean.numel()
            mean, second = moments[offset: offset + channels], moments[offset + channels: offset + 2 * channels]
            a.running_mean.copy_(mean)
            a.running_var.copy_((second - mean * mean).clamp_min(0.0))
            offset += 2 * channels

    def _guard_statistics(self, logits, source_logits) -> Optional[torch.Tensor]:
        """[agreeing rows, rows, adapted probability sums [C], source probability
        sums [C]] over the batch, merged over ranks (every rank calls it)."""
        classes = logits.shape[1]
        stats = torch.zeros(2 + 2 * classes, dtype=torch.float64, device=logits.device)
        if source_logits is not None:
            finite = torch.isfinite(logits).all(dim=1) & torch.isfinite(source_logits).all(dim=1)
            adapted, source = logits[finite].float(), source_logits[finite].float()
            stats[0] = (adapted.argmax(dim=1) == source.argmax(dim=1)).sum()
            stats[1] = adapted.shape[0]
            stats[2: 2 + classes] = torch.softmax(adapted, dim=1).sum(dim=0).double()
            stats[2 + classes:] = torch.softmax(source, dim=1).sum(dim=0).double()
        return self._merged(stats)

    def _guards(self, stats: torch.Tensor, report) -> bool:
        """Collapse and divergence guards on merged statistics; True when one
        tripped (and was handled)."""
        rows = float(stats[1])
        if rows < 1:
            return False
        classes = (stats.numel() - 2) // 2
        adapted = (stats[2: 2 + classes] / rows).float()
        source = (stats[2 + classes:] / rows).float()
        agreement = float(stats[0]) / rows
        # Agreement: about the last 16 samples. Class mixes: about a monitor
        # window of samples, long enough to span several runs of classes, so a
        # model stuck on one class stands out against the source's mix.
        weight = min(0.4, rows / (rows + 16))
        momentum = rows / (rows + self.monitor.config["window"])
        # starts from full agreement (adapters begin at the source weights)
        previous = 1.0 if self._agreement is None else self._agreement
        self._agreement = (1 - weight) * previous + weight * agreement
        self._adapted_probs = adapted if self._adapted_probs is None else \
            (1 - momentum) * self._adapted_probs + momentum * adapted
        self._source_probs = source if self._source_probs is None else \
            (1 - momentum) * self._source_probs + momentum * source
        adapted_classes = _effective_from_mean(self._adapted_probs)
        source_classes = _effective_from_mean(self._source_probs)
        reason = None
        if adapted_classes < self.config["collapse_ratio"] * source_classes:
            reason = f"collapse: {adapted_classes:.2f} effective classes vs {source_classes:.2f} for the source"
        elif self._agreement < self.config["agreement_floor"]:
            # Off by default: under strong drift the source can be confidently
            # wrong on nearly every sample (digits at 30 % contrast: 98 % of
            # predictions above 0.9 confidence, 10 % accurate), and a good
            # adaptation then overturns most of its predictions.
            reason = f"collapse: agreement with the source fell to {self._agreement:.2f}"
        else:
            # Divergence of the layers the adapters act on (the input-side taps
            # only measure the drift itself). Its baseline is taken once the
            # window holds only batches seen since activation.
            downstream = [report.signals[name] for name in self.monitor.tap_names if name not in self._input_taps]
            level = max(downstream) if downstream else None
            if level is not None and self._downstream_baseline is None and self.steps >= self._release_after(report):
                self._downstream_baseline = max(level, self.monitor.window_threshold)
            elif level is not None and self._downstream_baseline is not None and \
                    level > self.config["divergence_rise"] * self._downstream_baseline:
                reason = (f"divergence of the adapted layers rose to {level:.2f} "
                          f"(baseline {self._downstream_baseline:.2f})")
        if reason is None:
            # A version is kept as good only when clearly healthy (the guard's
            # averages lag a little behind a collapse in progress).
            healthy = (self._agreement >= 2 * self.config["agreement_floor"]
                       and adapted_classes >= 0.75 * source_classes)
            if healthy and self.steps and self.steps % 10 == 0 and self.steps != self._last_snapshot_step:
                self._last_snapshot_step = self.steps
                self._snapshot(good=True)
            return False
        self._trip(reason)
        return True

    def _trip(self, reason: str, kind: str = "guard", **detail) -> None:
        """A guard (or a rule) refused the current version: restore the last
        good one (the source after repeated trips), halve the learning rate;
        three trips in one drift episode put adapter training on hold."""
        self.guard_trips += 1
        self._episode_trips += 1
        self._event(kind, reason=reason, trips_this_drift=self._episode_trips, **detail)
        target = self.good_version if self._episode_trips < _MAX_EPISODE_TRIPS else 0
        # The drift is still there: the adapters stay active (at the source
        # weights when no good version was kept), statistics adaptation included.
        self.learning_rate *= 0.5  # before the restore: a restarted deferred worker takes it
        self._restore(target, reason=kind, keep_active=True)
        if self.hold:
            # Tripped again with the weights held at the source: the statistics
            # adaptation itself hurts this stream. Serve the source model until
            # the drift passes or the healer is reset.
            self.suspended = True
            self.adapters.active = False
            self._event("suspend", reason="guard tripped with adapter training on hold")
        elif self._episode_trips >= _MAX_EPISODE_TRIPS:
            # Repeated collapses: stop training the adapters until this drift
            # passes or the healer is reset (statistics adaptation goes on).
            self.hold = True
            self._event("hold", reason=f"{self._episode_trips} guard trips in one drift episode")
        for group in (self.optimizer.param_groups if self.optimizer else []):
            group["lr"] = self.learning_rate
        self._adapted_probs = None
        self._source_probs = None
        self._agreement = None
        self._downstream_baseline = None

    # ---------------------------------------------------------- adaptation

    def _step(self, x: torch.Tensor, adapters: Optional[AdapterSet] = None, model: Optional[nn.Module] = None,
              optimizer=None, record: bool = True) -> Optional[Dict[str, Any]]:
        """One adaptation step on ``x``; returns the step's record (None when
        no step was taken), already logged unless ``record`` is False (the
        deferred worker logs it when the step is published). Under a process
        group every rank runs the same collectives whatever its own batch
        holds (a rank with no usable sample contributes zero gradients), and
        every skip is decided for all ranks together."""
        adapters = adapters or self.adapters
        model = model or self.model
        optimizer = optimizer or self.optimizer
        if self.hold or self.audit_error is not None:
            return None  # stopped meanwhile (a batch queued before a policy stop)
        if optimizer is None:
            # statistics-only adaptation: the served forward already updated them
            self.steps += 1
            detail = {"statistics_only": True, "samples": int(x.shape[0]),
                      "score": self.drift.score if self.drift is not None else None}
            if record:
                self._event("step", state_hash=tensor_digest(adapters.state_dict()) if self.audit is not None else None,
                            **detail)
            return detail
        limit = self.policy.max_steps_per_minute
        now = time.monotonic()
        skip = None
        if limit is not None:
            if self._rate_exhausted(now):
                skip = "rate limit"
                if self._policy_blocked != "rate":
                    self._policy_blocked = "rate"
                    self._event("policy", limit="max_steps_per_minute", value=len(self._step_times),
                                bound=limit, action="steps refused until the rate allows")
            elif self._policy_blocked == "rate":
                self._policy_blocked = None
        # The served forward of this very batch recorded its graph (inline,
        # every row finite): the step starts from it instead of a forward of
        # its own. Same values: the served forward normalised with the same
        # statistics, and no weight has changed since.
        served, self._served_graph = self._served_graph, None
        finite = _finite_rows(x)
        reuse = served is not None and model is self.model and served[0] is x and bool(finite.all())
        x = x if reuse else x[finite]
        parameters = dict(adapters.named_parameters())
        count, loss = 0, None
        optimizer.zero_grad(set_to_none=True)
        adapters.set_update_running(False)
        # The served model's monitor must not count this extra forward; the
        # deferred worker's copy has no monitor (its hooks were stripped).
        quiet = self.monitor.paused() if model is self.model else contextlib.nullcontext()
        try:
            if skip is None and x.shape[0] > 0:
                with torch.enable_grad(), quiet:
                    for p in parameters.values():
                        p.requires_grad_(True)
                    try:
                        loss, count = self._loss(served[1] if reuse else model(x), parameters, x, model, adapters)
                    except RuleError as error:
                        skip, loss, count = str(error), None, 0
                    if loss is not None and bool(torch.isfinite(loss)) and count:
                        loss.backward()
                    elif loss is not None and not bool(torch.isfinite(loss)):
                        skip = "non-finite loss"
            # (no finite row: this rank uses no sample; the others may)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters.values()]
            total = count
            if self.process_group is not None:
                import torch.distributed as dist
                flat = torch.cat([g.flatten() for g in grads] + [
                    torch.tensor([float(count), float(skip is not None)],
                                 dtype=grads[0].dtype if grads else torch.float32,
                                 device=grads[0].device if grads else None)])
                dist.all_reduce(flat, group=self.process_group)
                total, vetoes = int(round(float(flat[-2]))), float(flat[-1])
                flat = flat[:-2] / dist.get_world_size(self.process_group)
                offset = 0
                for p, g in zip(parameters.values(), grads):
                    p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
                    offset += g.numel()
                if vetoes and skip is None:
                    skip = "another rank skipped"
            if skip is None and total == 0:
                skip = "no reliable sample"
            if skip is None and not all(bool(torch.isfinite(p.grad).all()) for p in parameters.values()
                                        if p.grad is not None):
                skip = "non-finite gradient"
            if skip is not None:
                optimizer.zero_grad(set_to_none=True)
                if skip != "rate limit":
                    self._event("skip", reason=skip, samples=int(x.shape[0]))
                return None
            before = {name: p.detach().clone() for name, p in parameters.items()}
            torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)
            optimizer.step()
            shift = self._project(parameters)
            with torch.no_grad():
                change = math.sqrt(float(sum(((p - before[name]) ** 2).sum() for name, p in parameters.items())))
            cap = self.policy.max_weight_change
            if cap is not None and shift > cap:
                with torch.no_grad():
                    for name, p in parameters.items():
                        p.copy_(before[name])
                optimizer.state.clear()
                self.hold = True
                self._event("policy", limit="max_weight_change", value=shift, bound=cap,
                            action="step undone; adapter training stopped until the drift passes or resume()")
                return None
        finally:
            adapters.set_update_running(True)
        self.steps += 1
        self._step_times.append(now)
        detail = {"loss": float(loss.detach()) if loss is not None else 0.0, "selected": count,
                  "samples": int(x.shape[0]), "shift": shift, "change": change,
                  "score": self.drift.score if self.drift is not None else None,
                  "learning_rate": optimizer.param_groups[0]["lr"]}
        if self._check is True and model is self.model:
            # looked like a run of one class, but its own statistics say many classes
            detail["batch_information"] = self._batch_information
            detail["check_threshold"] = self._batch_threshold
        if record:
            self._event("step", state_hash=tensor_digest(adapters.state_dict()) if self.audit is not None else None, **detail)
        if self.config["reset_every"] and self.steps % self.config["reset_every"] == 0:
            # the adapters and optimizer this step trained (the deferred
            # worker's copies in deferred mode; its next publish carries it)
            self._to_source(adapters)
            optimizer.state.clear()
            detail["periodic_reset"] = True
            if record:
                self._event("reset", reason="periodic")
        return detail

    def _loss(self, output, parameters, x=None, model=None, adapters=None) -> Tuple[torch.Tensor, int]:
        """EATA's objective: confidence-weighted entropy over reliable
        (entropy below ``entropy_margin * ln C``), non-redundant samples, plus
        the Fisher anchor to the source adapters and the rules' penalties.
        Returns (loss, samples used)."""
        logits = self._logits(output)
        entropy, _ = ops.softmax_entropy(logits.float())
        margin = self.config["entropy_margin"] * math.log(logits.shape[1])
        probs = torch.softmax(logits.detach().float(), dim=1)
        selected = entropy.detach() < margin
        if self._mean_probs is not None and self.config["redundancy"] > 0:
            similarity = nn.functional.cosine_similarity(probs, self._mean_probs.unsqueeze(0), dim=1)
            selected &= similarity < 1 - self.config["redundancy"]
        count = int(selected.sum())
        self.selected_last_step = count
        anchor = sum((self.fisher[name] * (p - self._source_state[name]) ** 2).sum()
                     for name, p in parameters.items() if name in self.fisher)
        if count:
            weights = torch.exp(-(entropy.detach()[selected] - margin))
            loss = (weights * entropy[selected]).sum() / count
            chosen = probs[selected].mean(dim=0)
            self._mean_probs = chosen if self._mean_probs is None else 0.9 * self._mean_probs + 0.1 * chosen
        else:
            loss = entropy.sum() * 0.0
        loss = loss + self.config["anchor"] * anchor
        if self.rules and x is not None and x.shape[0] > 0:
            try:
                penalty = total_penalty(self.rules, self._rule_context(model, adapters, x, grad=True, logits=logits))
            except Exception as error:  # noqa: BLE001 - a user's rule: no step, recorded
                raise RuleError(f"rule penalty failed: {type(error).__name__}: {error}") from error
            if penalty is not None:
                loss = loss + penalty
        return loss, count

    def _project(self, parameters: Dict[str, torch.Tensor]) -> float:
        """Keeps the adapters within ``max_shift`` (L2) of the source; returns
        their distance from it afterwards."""
        shift = self._shift(parameters)
        cap = self.config["max_shift"]
        if shift > cap:
            factor = cap / shift
            with torch.no_grad():
                for name, p in parameters.items():
                    source = self._source_state[name]
                    p.copy_(source + (p - source) * factor)
            shift = cap
        return shift

    def _shift(self, parameters: Dict[str, torch.Tensor]) -> float:
        with torch.no_grad():  # one host read for all parameters
            total = sum(((p - self._source_state[name]) ** 2).sum() for name, p in parameters.items())
        return math.sqrt(float(total))

    def _reset_optimizer(self) -> None:
        if self.optimizer is not None:
            self.optimizer = torch.optim.Adam(self.adapters.trainable(), lr=self.learning_rate)

    # ------------------------------------------------------------ approval

    def _serve_approved(self, x: torch.Tensor) -> torch.Tensor:
        """Approval mode: the served model is the last approved version,
        exactly (its BatchNorm statistics are the approved ones, not updated
        by the stream); adaptation runs on a staged copy and is offered as
        proposals."""
        self._poll_decisions()
        self.adapters.active = self.approved_version != 0
        self.adapters.set_robust(True)
        self.adapters.set_update_running(False)
        self.monitor.read_all = self._stage is not None
        output, logits, report = self._served_forward(x)
        self._remember(x)
        self._stage_batch(x, logits, report)
        self._end_timing()
        return output

    def _stage_batch(self, x: torch.Tensor, logits: torch.Tensor, report: DriftReport) -> None:
        self._check, self._batch_information, self._batch_spread, self._batch_classes = None, None, None, None
        self._batch_threshold = None
        if self._stage is None:
            if not report.read:
                return
            if not report.drift or self.audit_error is not None:
                self._track(logits)
                return
            self._start_stage(report)
        else:
            # (the served version's statistics are held, so the layers after
            # the adapters keep looking drifted on clean data until release)
            self.clean_streak = self.clean_streak + 1 if self._drift_passed(report) else 0
            if self.clean_streak >= self._release_after(report) and not report.warming_up:
                self._end_stage()
                return
        # The label-shift guard, and the batch-statistics check when it says
        # or hints "run" (as for served batches outside approval mode; the
        # check re-normalises the source model, whatever version is served).
        stats = self._guard_statistics(logits, logits)
        if not self.hold and not self.suspended and self.policy.hours_allow() and \
                (self._robust_norm() or self._looks_like_run(stats)):
            self._check = self._batch_is_diverse(x)
        self._track_merged(stats)
        if self.hold or self.suspended or not self._policy_allows():
            return
        if any(p["status"] == "pending" for p in self.proposals.values()):
            return  # one proposal at a time: wait for the decision
        if self._in_run():
            # classes in runs: no step; the staged statistics follow the
            # stream slowly, as the served ones do outside approval mode
            model, shadow, _ = self._stage
            with torch.no_grad():
                shadow.set_robust(True)
                shadow.set_update_running(True)
                model(x)
            self._event("skip", reason="classes arrive in runs", label_shift=self._label_shift, staged=True,
                        batch_information=self._batch_information, check_threshold=self._batch_threshold,
                        batch_spread=self._batch_spread, batch_classes=self._batch_classes)
            return
        x = self._gather_small(x)
        if x is None:
            return
        model, shadow, optimizer = self._stage
        with torch.no_grad():
            # the staged copy's BatchNorm statistics follow the stream
            shadow.set_robust(False)
            shadow.set_update_running(True)
            model(x)
        if self._step(x, adapters=shadow, model=model, optimizer=optimizer):
            self._stage_steps += 1
            if self._stage_steps >= self.config["proposal_steps"]:
                self._propose()

    def _start_stage(self, report: DriftReport) -> None:
        self._input_visible = False
        self._drift_passed(report)
        self._stage = self._detached_copy(self.versions[self.approved_version])
        self._stage_steps = 0
        self._check_prior = 1.0  # (a new episode: see _information_threshold)
        self.clean_streak = 0
        self._pending = []
        self._event("activate", staged=True, score=report.score, reasons=list(report.reasons),
                    top_signal=report.attribution.top_signal if report.attribution else None)

    def _reset_stage_optimizer(self) -> None:
        model, shadow, _ = self._stage
        self._stage = (model, shadow, torch.optim.Adam(shadow.trainable(), lr=self.learning_rate)
                       if shadow.trainable() else None)

    def _end_stage(self) -> None:
        """The drift passed: staging stops, pending proposals expire, the
        served model is the source again."""
        self._stage = None
        for pid, proposal in self.proposals.items():
            if proposal["status"] == "pending":
                proposal["status"] = "expired"
                self._event("proposal_expired", proposal=pid)
        self.approved_version = 0
        self.adapters.active = False
        self._to_source()
        self.version = 0
        self.hold = False
        self.suspended = False
        self._episode_trips = 0
        self.learning_rate = self.config["lr"]
        self._event("release", clean_batches=self.clean_streak, staged=True)
        self.clean_streak = 0

    def _propose(self) -> Optional[str]:
        """The staged adapters become a proposal, with the evidence for a
        decision; one that collapses, breaks a rule or trips the bias guard on
        the recent buffer is refused at once (and staging restarts from the
        approved version at half the learning rate)."""
        model, shadow, _ = self._stage
        self._stage_steps = 0
        state = {name: t.detach().clone() for name, t in shadow.state_dict().items()}
        version = self._snapshot(state=state, event=False)
        digest = self.version_digests[version]
        pid = digest[:12]
        evidence, problems = self._evidence(model, shadow)
        if problems:
            self.guard_trips += 1
            self._episode_trips += 1
            self._event("proposal_refused", state_hash=digest, proposal=pid, proposed_version=version,
                        problems=problems, evidence=evidence)
            shadow.load_state_dict(self.versions[self.approved_version])
            self.learning_rate *= 0.5
            self._reset_stage_optimizer()
            if self._episode_trips >= _MAX_EPISODE_TRIPS and not self.hold:
                self.hold = True
                self._event("hold", reason=f"{self._episode_trips} refused proposals in one drift episode")
            return None
        self.proposals[pid] = {"id": pid, "version": version, "digest": digest, "status": "pending",
                               "evidence": evidence, "time": time.time()}
        self._event("proposal", state_hash=digest, proposal=pid, proposed_version=version, evidence=evidence)
        return pid

    def _evidence(self, model: nn.Module, shadow: AdapterSet) -> Tuple[Dict[str, Any], List[str]]:
        """Source, approved and proposed models on the recent buffer: mean
        entropy, estimated accuracy (calibrated confidence), effective number
        of predicted classes, agreement with the source; rule checks; bias."""
        x = self._buffer()
        if x is None:
            return {"rows": 0}, ["no buffered inputs to evaluate the proposal on"]
        temperature = self.monitor.temperature

        def summary(logits: torch.Tensor, source: torch.Tensor) -> Dict[str, float]:
            probs = torch.softmax(logits.float() / temperature, dim=1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
            return {"entropy": float(entropy.mean()), "accuracy_estimate": float(probs.max(dim=1).values.mean()),
                    "effective_classes": _effective_from_mean(probs.mean(dim=0)),
                    "agreement_with_source": float((logits.argmax(dim=1) == source.argmax(dim=1)).float().mean())}

        shadow.set_robust(True)
        shadow.set_update_running(False)
        try:
            with torch.no_grad():
                proposed = self._logits(model(x)).float()
                with self.monitor.paused():
                    approved = self._logits(self.model(x)).float()
                source = self._source_logits(x).float()
            results = self._check_rules_on(model, shadow, x)
        finally:
            shadow.set_robust(False)
            shadow.set_update_running(True)
        parameters = dict(shadow.named_parameters())
        evidence = {"rows": int(x.shape[0]), "source": summary(source, source), "approved": summary(approved, source),
                    "proposed": summary(proposed, source), "rules": [r.as_dict() for r in results],
                    "shift": self._shift(parameters) if parameters else 0.0}
        problems = []
        if evidence["proposed"]["effective_classes"] < \
                self.config["collapse_ratio"] * evidence["source"]["effective_classes"]:
            problems.append(f"collapse: {evidence['proposed']['effective_classes']:.2f} effective classes vs "
                            f"{evidence['source']['effective_classes']:.2f} for the source")
        problems.extend(f"rule {r.rule!r} violated" for r in results if not r.ok)
        if self.bias_guard is not None:
            reason, detail = self.bias_guard.evaluate(x, proposed, source)
            evidence["bias"] = detail
            if reason is not None:
                problems.append(reason)
        return evidence, problems

    def pending_proposals(self) -> List[Dict[str, Any]]:
        return [dict(p) for p in self.proposals.values() if p["status"] == "pending"]

    def _proposal(self, proposal_id: str) -> Dict[str, Any]:
        matches = [p for pid, p in self.proposals.items() if pid.startswith(str(proposal_id))] if proposal_id else []
        if len(matches) != 1:
            raise KeyError(f"selfheal: {'no' if not matches else 'more than one'} proposal matches "
                           f"{proposal_id!r}; known: {sorted(self.proposals)}")
        return matches[0]

    def approve(self, proposal_id: str, by: str = "api", note: str = "", request: Optional[int] = None) -> int:
        """Serves proposal ``proposal_id`` (its id or a unique prefix) from the
        next batch on; returns its version."""
        with self._lock:
            proposal = self._proposal(proposal_id)
            if proposal["status"] != "pending":
                raise ValueError(f"selfheal: proposal {proposal['id']} is {proposal['status']}, not pending")
            if self.audit_error is not None:
                raise RuntimeError(f"selfheal: the audit log failed ({self.audit_error}); nothing is approved "
                                   "until it works again and reset() is called")
            state = self.versions.get(proposal["version"])
            if state is None:
                state = self.versions[self._version_of_digest(proposal["digest"])]
            # recorded first: a version is never served without its approval on record
            self._event("approve", state_hash=proposal["digest"], proposal=proposal["id"],
                        approved_version=proposal["version"], by=by, note=note, request=request)
            if self.audit_error is not None:
                raise RuntimeError(f"selfheal: the approval could not be recorded ({self.audit_error}); "
                                   "the proposal was not applied")
            self.adapters.load_state_dict(state)
            self.approved_version = self.version = proposal["version"]
            self._approved_digests.add(proposal["digest"])
            self.adapters.active = True
            proposal["status"] = "approved"
            return proposal["version"]

    def reject(self, proposal_id: str, by: str = "api", note: str = "", request: Optional[int] = None) -> None:
        """Refuses a proposal: staging restarts from the approved version."""
        with self._lock:
            proposal = self._proposal(proposal_id)
            if proposal["status"] != "pending":
                raise ValueError(f"selfheal: proposal {proposal['id']} is {proposal['status']}, not pending")
            proposal["status"] = "rejected"
            if self._stage is not None:
                self._stage[1].load_state_dict(self.versions[self.approved_version])
                self._reset_stage_optimizer()
            self._event("reject", state_hash=proposal["digest"], proposal=proposal["id"], by=by, note=note,
                        request=request)

    def _poll_decisions(self) -> None:
        """Applies decisions written to the audit log by ``selfheal audit
        approve/reject`` (checked at most every ``poll_interval`` seconds)."""
        if self.audit is None or not self.proposals:
            return
        now = time.monotonic()
        if now - self._last_poll < self.config["poll_interval"]:
            return
        self._last_poll = now
        try:
            requests = self.audit.records(kinds=["approval_request"], after_seq=self._request_seq)
        except (AuditError, AttributeError) as error:  # unreadable log: serve on, decide nothing
            warnings.warn(f"selfheal: cannot read decisions from the audit log ({error})", RuntimeWarning,
                          stacklevel=3)
            return
        for record in requests:
            self._request_seq = record.seq
            pid = str(record.payload.get("proposal", ""))
            if pid not in self.proposals:
                continue  # another healer's proposal
            action = self.approve if record.payload.get("decision") == "approve" else self.reject
            try:
                action(pid, by=str(record.payload.get("by", "cli")), note=str(record.payload.get("note", "")),
                       request=record.seq)
            except ValueError as error:
                self._event("decision_ignored", proposal=pid, request=record.seq, reason=str(error))

    def _sync_proposals_with_log(self) -> None:
        """A loaded state's pending proposals that the audit log says were
        expired or rejected since are not pending any more."""
        if self.audit is None or not self.proposals:
            return
        try:
            logged = {p["id"]: p["status"] for p in self.audit.proposals()}
        except (AuditError, AttributeError):
            return
        for pid, proposal in self.proposals.items():
            if proposal["status"] == "pending" and logged.get(pid) in ("expired", "rejected"):
                proposal["status"] = logged[pid]

    def _expire_logged_proposals(self, reason: str) -> None:
        """Pending proposals in the audit log (this healer's or an earlier
        process's) can no longer be applied after a reset or a new
        calibration: recorded as expired so the CLI does not offer them."""
        if self.audit is None:
            return
        try:
            open_ones = [p for p in self.audit.proposals()
                         if p["status"] == "pending" or p["status"].startswith("requested")]
        except (AuditError, AttributeError):
            return
        for proposal in open_ones:
            self._event("proposal_expired", proposal=proposal["id"], reason=reason)

    def resume(self) -> None:
        """Lifts a hold or suspension (policy, guard or bias stop) for the
        current drift episode. After an audit failure only ``reset()`` does."""
        with self._lock:
            if self.audit_error is not None:
                raise RuntimeError(f"selfheal: the audit log failed ({self.audit_error}); reset() after fixing it")
            self.hold = False
            self.suspended = False
            self._episode_trips = 0
            self._policy_blocked = None
            if self.version == 0 and self.drift is not None and self.drift.drift and not self.config["approval"]:
                self.adapters.active = True
            self._event("resume")

    # ------------------------------------------------------------ deferred

    def _enqueue(self, x: torch.Tensor) -> None:
        if self._worker is None or not self._worker.is_alive():
            return  # the worker failed (see events / worker_error): serve without healing
        item = x.detach().clone()
        try:
            self._queue.put_nowait(item)
        except queue.Full:  # the replay buffer keeps the newest batches
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                pass
            self._queue.put_nowait(item)

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        model, shadow, optimizer = self._detached_copy(self.adapters.state_dict())
        self._shadow = (model, shadow, optimizer)
        # The thread holds this healer only weakly (selfheal_ext/deferred.py):
        # a dropped healer is collected and its worker stops; exit joins it.
        self._deferred = DeferredWorker(self, self._queue, SelfHealer._deferred_step)
        self._stop = self._deferred.stop
        self._worker = self._deferred.thread
        self._deferred.start()

    def _deferred_step(self, x: torch.Tensor) -> bool:
        """One step of the deferred worker on its own copy; False stops it."""
        if self._shadow is None:
            return False
        model, shadow, optimizer = self._shadow
        try:
            detail = self._step(x, adapters=shadow, model=model, optimizer=optimizer, record=False)
            if detail is not None:
                self._publish(shadow, detail)
        except Exception as error:  # noqa: BLE001 - reported; serving goes on, dormant worker
            self._worker_error = f"{type(error).__name__}: {error}"
            self._event("worker_error", error=self._worker_error)
            return False
        return True

    def _detached_copy(self, state: Dict[str, torch.Tensor]):
        """A copy of the model with its own active adapters loaded with
        ``state`` and an optimizer for them: the deferred worker's and the
        approval stage's model. It has no monitor."""
        model = copy.deepcopy(self.model)
        # The copy carries the served model's hooks (monitor taps, live
        # adapters); it must run only its own adapters.
        for module in model.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        for p in model.parameters():
            p.requires_grad_(False)
        shadow = AdapterSet(model, [copy.copy(p) for p in self.adapters.placements], seed=self.config["seed"],
                            robust_horizon=self.config["robust_horizon"], norm_prior=self.config["norm_prior"])
        shadow.load_state_dict(state)
        for copied, served in zip(shadow.norm_adapters(), self.adapters.norm_adapters()):
            copied.class_agnostic = served.class_agnostic  # (calibrated, not part of the state)
        shadow.active = True
        optimizer = torch.optim.Adam(shadow.trainable(), lr=self.learning_rate) if shadow.trainable() else None
        return model, shadow, optimizer

    def _publish(self, shadow: AdapterSet, detail: Dict[str, Any]) -> None:
        """Copies the worker's adapter weights into the served ones between two
        served batches, and records the step with the hash of the state now
        served (the served BatchNorm statistics included). The rule gate runs
        on it before the next batch is served. The lock is polled, never
        waited on: whoever stops the worker holds the lock while joining it."""
        while not self._stop.is_set():
            if self._lock.acquire(timeout=0.02):
                try:
                    if not self._stop.is_set() and self.audit_error is None and not self.hold:
                        with torch.no_grad():
                            live = dict(self.adapters.named_parameters())
                            for name, p in shadow.named_parameters():
                                live[name].copy_(p)
                        periodic = detail.pop("periodic_reset", False)
                        self._event("step", state_hash=tensor_digest(self.adapters.state_dict())
                                    if self.audit is not None else None, deferred=True, **detail)
                        if periodic:
                            self._event("reset", reason="periodic")
                        self._unchecked = True
                finally:
                    self._lock.release()
                return

    def _stop_worker(self) -> None:
        if self._worker is None:
            return
        self._deferred.halt()  # (no join when called from the worker itself)
        self._worker = None
        self._deferred = None
        self._shadow = None
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()

    def flush(self, timeout: float = 30.0) -> None:
        """Deferred mode: waits until the replay buffer has been consumed."""
        deadline = time.monotonic() + timeout
        while (self._worker is not None and self._worker.is_alive() and self._queue.unfinished_tasks
               and time.monotonic() < deadline):
            time.sleep(0.01)

    def close(self) -> None:
        """Stops and joins the deferred worker (if any); idempotent. The
        healer still serves; a later drift episode starts a new worker.
        A healer that is dropped, or still running at interpreter exit, is
        stopped as well (selfheal_ext/deferred.py)."""
        with self._lock:
            self._stop_worker()

    def __enter__(self) -> "SelfHealer":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    # ------------------------------------------------- versions and state

    def _adapter_state(self) -> Dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self.adapters.state_dict().items()}

    def _snapshot(self, good: bool = False, state: Optional[Dict[str, torch.Tensor]] = None,
                  event: bool = True) -> int:
        version = self._register(self._adapter_state() if state is None else state)
        if state is None:
            self.version = version
        if good:
            self.good_version = version
        if event:
            self._event("snapshot", state_hash=self.version_digests[version], good=good, snapshot=version)
        return version

    def _register(self, state: Dict[str, torch.Tensor]) -> int:
        """Adds ``state`` as a new version (stored on disk with a snapshot
        store) and applies the retention policy: the source, the last good,
        every approved and the newest ``keep_versions`` versions are kept."""
        version = self._next_version
        self._next_version += 1
        digest = tensor_digest(state)
        self.versions[version] = state
        self.version_digests[version] = digest
        if self.snapshots is not None:
            if digest not in self.snapshots:
                self._created_files.add(digest)
            self.snapshots.save(state, {"version": version, "steps": self.steps, "batches": self.batches,
                                        "learning_rate": self.learning_rate, "time": time.time()})
        keep = self.config["keep_versions"]
        protected = {0, self.good_version, self.approved_version, version}
        for old in sorted(self.versions)[1:-keep]:
            if old in protected or self.version_digests.get(old) in self._approved_digests:
                continue
            if any(p["version"] == old and p["status"] == "pending" for p in self.proposals.values()):
                continue
            del self.versions[old]
            dropped = self.version_digests.pop(old)
            if self.snapshots is not None and dropped not in self.version_digests.values() \
                    and dropped not in self._approved_digests and dropped in self._created_files:
                self._created_files.discard(dropped)
                path = self.snapshots.path(dropped)
                path.unlink(missing_ok=True)
        return version

    def snapshot(self) -> int:
        """Stores the current adapters as a new version and returns its number."""
        with self._lock:
            return self._snapshot(good=True)

    @_outside_inference_mode
    def rollback(self, version, reason: str = "requested") -> int:
        """Restores adapter ``version`` exactly: a version number of this
        healer (0: the source model, dormant) or the ``state_hash`` of any
        audited version held in the snapshot store. Returns the version now
        served. In approval mode the restored version counts as approved
        (the rollback is the operator's decision)."""
        if isinstance(version, bool) or not isinstance(version, (str, numbers.Integral)):
            raise TypeError(f"selfheal: argument 'version' must be a version number (int) or a state hash "
                            f"(str), got {version!r} ({type(version).__name__})")
        with self._lock:
            if isinstance(version, str):
                version = self._version_of_digest(version)
            version = int(version)
            if version != 0 and version in self.versions:
                self.adapters.active = True  # the restored version is served
            self._restore(version, reason)
            if self.config["approval"]:
                self.approved_version = self.version
                self._approved_digests.add(self.version_digests[self.version])
                self.adapters.active = self.version != 0
                if self._stage is not None:
                    self._stage[1].load_state_dict(self.versions[self.version])
                    self._reset_stage_optimizer()
            return self.version

    def _version_of_digest(self, digest: str) -> int:
        for number, known in self.version_digests.items():
            if known == digest:
                return number
        if self.snapshots is None:
            raise KeyError(f"selfheal: no adapter version with state hash {digest[:16]}… in memory and no "
                           "snapshot store to load it from")
        tensors, _ = self.snapshots.load(digest)
        try:  # names, shapes, dtypes, finite: before the state is registered as a version
            self.adapters.check_state(tensors, f"snapshot {digest[:16]}…")
        except ValueError as error:
            raise SnapshotError(str(error)) from None
        device = self._device()
        return self._snapshot(state={k: v.to(device) for k, v in tensors.items()}, event=False)

    def _restore(self, version: int, reason: str, keep_active: bool = False) -> None:
        if version not in self.versions:
            raise KeyError(f"selfheal: no adapter version {version}; known: {sorted(self.versions)}")
        self.adapters.check_state(self.versions[version], f"version {version}")  # before anything changes
        self._stop_worker()
        self.adapters.load_state_dict(self.versions[version])
        self.version = version
        if version == 0 and not keep_active:
            self.adapters.active = False
        self._reset_optimizer()
        self._event("rollback", state_hash=self.version_digests.get(version), to=version, reason=reason)
        if self.active and self.config["mode"] == "deferred":
            self._start_worker()

    @_outside_inference_mode
    def reset(self) -> None:
        """Back to the source model exactly: adapters dormant and re-initialised,
        optimizer, guards and monitor window cleared (the calibration is kept)."""
        with self._lock:
            self._stop_worker()
            self.audit_error = None
            self._expire_logged_proposals("reset")
            self._reset_runtime()
            self.monitor.reset()
            self._event("reset", state_hash=self._source_digest, reason="requested")

    def _event(self, kind: str, state_hash: Optional[str] = None, **detail) -> None:
        self.event_count += 1
        self.events.append(HealEvent(self.batches, kind, self.version, detail, seq=self.event_count))
        if len(self.events) > _EVENT_LIMIT:
            del self.events[: len(self.events) - _EVENT_LIMIT]
        if self.audit is None or self.audit_error is not None:
            return
        try:
            self.audit.append(kind, version=self.version, batch=self.batches, state_hash=state_hash, **detail)
        except Exception as error:  # noqa: BLE001 - disk full, locked database, ...
            # Never adapt unaudited: serve the source model (or, in approval
            # mode, the approved version) and stop adapting until reset().
            self.audit_error = f"{type(error).__name__}: {error}"
            warnings.warn(f"selfheal: audit log write failed ({self.audit_error}); adaptation is suspended "
                          "until reset()", RuntimeWarning, stacklevel=3)
            # the serving thread switches the adapters off before the next batch
            self.suspended = True
            self.hold = True

    def state_dict(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "config": dict(self.config),
                "adapters": self._adapter_state(),
                "active": self.active,
                # deep copies: Adam's load_state_dict keeps tensors it is given,
                # so a shared state would be updated by both healers
                "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
                "learning_rate": self.learning_rate,
                "fisher": {k: v.clone() for k, v in self.fisher.items()},
                "versions": {k: {n: t.clone() for n, t in v.items()} for k, v in self.versions.items()},
                "version": self.version, "good_version": self.good_version, "next_version": self._next_version,
                "counters": {"steps": self.steps, "batches": self.batches, "guard_trips": self.guard_trips,
                             "clean_streak": self.clean_streak, "episode_trips": self._episode_trips,
                             "hold": self.hold, "suspended": self.suspended, "input_visible": self._input_visible},
                "mean_probs": None if self._mean_probs is None else self._mean_probs.clone(),
                "label_shift": self._label_shift, "robust": self._robust, "check_prior": self._check_prior,
                "pending": [t.clone() for t in self._pending],
                "reference_probs": None if self._reference_probs is None else self._reference_probs.clone(),
                "diversity": None if self._diversity is None else dict(self._diversity),
                "class_shift": None if self._class_shift is None else list(self._class_shift),
                "long_probs": None if self._long_probs is None else self._long_probs.clone(),
                "input_taps": list(self._input_taps),
                "guard_averages": {"agreement": self._agreement,
                                   "adapted": None if self._adapted_probs is None else self._adapted_probs.clone(),
                                   "source": None if self._source_probs is None else self._source_probs.clone()},
                "last_snapshot_step": self._last_snapshot_step,
                "downstream_baseline": self._downstream_baseline,
                "monitor": self.monitor.state_dict(),
                "governance": {
                    "version_digests": dict(self.version_digests),
                    "approved_digests": sorted(self._approved_digests),
                    "approved_version": self.approved_version,
                    "proposals": copy.deepcopy(self.proposals),
                    "stage": None if self._stage is None else {
                        "adapters": {n: t.detach().clone() for n, t in self._stage[1].state_dict().items()},
                        "optimizer": copy.deepcopy(self._stage[2].state_dict()) if self._stage[2] else None,
                        "steps": self._stage_steps},
                    "bias_guard": None if self.bias_guard is None else copy.deepcopy(self.bias_guard.state_dict()),
                    "policy_blocked": self._policy_blocked,
                    "recent": [entry[0].clone() for entry in self._recent],
                    "request_seq": self._request_seq,
                },
            }

    @_outside_inference_mode
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Loads a ``state_dict()``; all or nothing. Every tensor (adapters,
        versions, approval stage, Fisher, optimizer, class mixes, monitor) is
        checked for name, shape, dtype and finiteness before anything is
        written; a failure while writing restores the healer as it was."""
        with self._lock:
            self._check_state(state)
            backup = self.state_dict() if self.monitor.calibrated else None
            try:
                self._load_state(state)
            except BaseException:
                if backup is not None:
                    self._load_state(backup)
                raise

    def _check_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"selfheal: argument 'state' must be a SelfHealer state_dict(), got {type(state).__name__}")
        self.adapters.check_state(state["adapters"], "state's adapters")
        for number, tensors in state["versions"].items():
            self.adapters.check_state(tensors, f"state's version {number}")
        stage = (state.get("governance") or {}).get("stage")
        if stage is not None:
            self.adapters.check_state(stage["adapters"], "state's approval stage")
        parameters = dict(self.adapters.named_parameters())
        averages = state.get("guard_averages") or {}
        optimizer = (state.get("optimizer") or {}).get("state", {})
        named = [(f"fisher {name!r}", t, parameters[name].shape if name in parameters else None)
                 for name, t in state["fisher"].items()]
        named += [(key, state.get(key), None) for key in ("mean_probs", "reference_probs", "long_probs")]
        named += [(f"guard average {key!r}", averages.get(key), None) for key in ("adapted", "source")]
        named += [(f"optimizer state {key!r}", t, None) for key, value in optimizer.items()
                  for t in (value.values() if isinstance(value, dict) else [])]
        for what, tensor, shape in named:
            if tensor is None or not isinstance(tensor, torch.Tensor):
                continue
            if what.startswith("fisher") and tensor.shape != shape:
                raise ValueError(f"selfheal: the state's {what} must have the shape of this model's adapter "
                                 f"parameter {tuple(shape) if shape is not None else '(none by that name)'}, "
                                 f"got {tuple(tensor.shape)}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"selfheal: the state's {what} holds NaN or Inf")
        self.monitor.check_state(state["monitor"])

    def _load_state(self, state: Dict[str, Any]) -> None:
        """load_state_dict's writing part (after _check_state)."""
        with self._lock:
            self._stop_worker()
            expected = set(self.adapters.state_dict())
            if set(state["adapters"]) != expected:
                raise ValueError("selfheal: the state's adapters do not match this model's "
                                 f"(missing {sorted(expected - set(state['adapters']))}, "
                                 f"unexpected {sorted(set(state['adapters']) - expected)})")
            # (absent from states saved before class-agnostic layers: none is
            # marked; checked before anything is loaded)
            class_shift = state.get("class_shift")
            if class_shift is not None:
                layers = len(self.adapters.norm_adapters())
                if not isinstance(class_shift, (list, tuple)) or len(class_shift) != layers or \
                        not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in class_shift):
                    raise ValueError(f"selfheal: the state's class_shift must hold one number per statistics "
                                     f"adapter ({layers}), got {class_shift!r}")
                class_shift = [float(v) for v in class_shift]
            self.monitor.load_state_dict(state["monitor"])
            # the reading unread batches repeat (read_every): a drift that was
            # already on when saved is not a new onset
            self.drift = self.monitor.last_report
            self.adapters.load_state_dict(state["adapters"])
            self.adapters.active = bool(state["active"])
            self.learning_rate = float(state["learning_rate"])
            self._reset_optimizer()
            if self.optimizer is not None and state["optimizer"] is not None:
                self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
            device = self._device()
            self.fisher = {k: v.to(device, copy=True) for k, v in state["fisher"].items()}
            self.versions = {int(k): {n: t.to(device, copy=True) for n, t in v.items()}
                             for k, v in state["versions"].items()}
            self.version, self.good_version = int(state["version"]), int(state["good_version"])
            self._next_version = int(state["next_version"])
            counters = state["counters"]
            self.steps, self.batches = int(counters["steps"]), int(counters["batches"])
            self.guard_trips, self.clean_streak = int(counters["guard_trips"]), int(counters["clean_streak"])
            self._episode_trips, self.hold = int(counters["episode_trips"]), bool(counters["hold"])
            self.suspended = bool(counters["suspended"])
            self._input_visible = bool(counters.get("input_visible", False))
            self._mean_probs = None if state["mean_probs"] is None else state["mean_probs"].to(device, copy=True)
            self._label_shift = state["label_shift"]
            self._pending = [t.to(device, copy=True) for t in state["pending"]]
            self._robust = bool(state["robust"])
            self._check_prior = float(state.get("check_prior", 1.0))  # (absent from older states)
            self._reference_probs = None if state["reference_probs"] is None else state["reference_probs"].clone()
            self._long_probs = None if state["long_probs"] is None else state["long_probs"].clone()
            # (absent from states saved before batch_diversity; levels of the
            # older entropy measure cannot be converted: recalibrate)
            diversity = state.get("diversity")
            if diversity is not None and diversity.get("measure") != "information":
                warnings.warn("selfheal: this state's batch-statistics check levels come from an older version "
                              "(entropy, not information); the check is off until calibrate() runs again",
                              RuntimeWarning, stacklevel=4)  # (load_state_dict and the decorator's wrapper)
                diversity = None
            self._diversity = None if diversity is None else \
                {k: (v if k == "measure" or v is None else float(v)) for k, v in diversity.items()}
            self._class_shift = class_shift
            self._mark_class_agnostic()
            self._input_taps = list(state["input_taps"])
            averages = state["guard_averages"]
            self._agreement = averages["agreement"]
            self._adapted_probs = None if averages["adapted"] is None else averages["adapted"].clone()
            self._source_probs = None if averages["source"] is None else averages["source"].clone()
            self._last_snapshot_step = int(state["last_snapshot_step"])
            self._downstream_baseline = state["downstream_baseline"]
            self._source_state = dict(self.versions[0])
            governance = state.get("governance")
            if governance is not None:
                self.version_digests = {int(k): str(v) for k, v in governance["version_digests"].items()}
                self._approved_digests = set(governance["approved_digests"]) | {self._source_digest}
                self.approved_version = int(governance["approved_version"])
                self.proposals = copy.deepcopy(governance["proposals"])
                stage = governance["stage"]
                self._stage = None
                if stage is not None:
                    self._stage = self._detached_copy(stage["adapters"])
                    if self._stage[2] is not None and stage["optimizer"] is not None:
                        self._stage[2].load_state_dict(copy.deepcopy(stage["optimizer"]))
                    self._stage_steps = int(stage["steps"])
                if self.bias_guard is not None and governance["bias_guard"] is not None:
                    self.bias_guard.load_state_dict(governance["bias_guard"])
                self._policy_blocked = governance["policy_blocked"]
                self._recent = deque([t.to(device, copy=True), torch.ones(t.shape[0], dtype=torch.bool, device=device),
                                      None, -1] for t in governance["recent"])
                self._recent_rows = sum(entry[0].shape[0] for entry in self._recent)
                # decisions written with the CLI while this state was saved are applied at the next poll
                self._request_seq = int(governance.get("request_seq", self._request_seq))
                self._sync_proposals_with_log()
            if self.active and self.config["mode"] == "deferred":
                self._start_worker()


def _map_tensors(function, value):
    """``value`` (nested lists, tuples, dicts) with ``function`` applied to each tensor."""
    return torch.utils._pytree.tree_map(lambda t: function(t) if isinstance(t, torch.Tensor) else t, value)


def _has_inference_tensor(value) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_inference() for t in torch.utils._pytree.tree_leaves(value))


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        raise ValueError("selfheal: a batch needs a batch dimension, got a 0-d tensor")
    if not x.is_floating_point():
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if x.numel() == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


def _effective_from_mean(mean: torch.Tensor) -> float:
    mean = mean.clamp_min(1e-12)
    return float(torch.exp(-(mean * mean.log()).sum()))
