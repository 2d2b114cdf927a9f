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
import logging
import math
import numbers
import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from .adapters import ADAPTER_KINDS, AdapterSet, attach_adapters, healing_summary
from .batches import calibration_batches
from .deferred import DeferredWorker
from .governance import DEFAULT_AUDIT_FILE, AuditLog, BiasGuard, Policy, SnapshotError, SnapshotStore, tensor_digest
from .monitor import DriftMonitor, DriftReport, as_logits
from .governance import AuditError
from .heal.batch_check import BatchCheck
from .heal.config import FROM_CONFIG, HealerConfig
from .heal.guards import CollapseGuard
from .heal.label_shift import LabelShiftTracker
from .heal.objective import distance_from, fisher_anchor, fit_fisher, project_within, reliable_entropy
from .heal.tensors import batch_inputs, effective_classes, finite_rows, model_device, summed_over
from .rules import RuleContext, RuleError, check_rules, total_penalty, validate_rules
from .taps import default_taps

_log = logging.getLogger(__name__)
# events of every batch while healing: logged at DEBUG, the decisions at INFO
_ROUTINE_EVENTS = frozenset({"drift", "step", "skip", "snapshot"})


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
        config: a ``HealerConfig`` holding every tunable number (default:
            ``HealerConfig()``). The keyword arguments below that name a
            setting override it for this healer; ``healer.config`` is the
            result, saved in ``state_dict()`` and in the audit log's
            activation record.
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
        config: Optional[HealerConfig] = None,
        budget: float = FROM_CONFIG,
        adapter_kinds: Sequence[str] = ADAPTER_KINDS,
        adapter_targets=None,
        max_rank: int = FROM_CONFIG,
        lr: float = FROM_CONFIG,
        anchor: float = FROM_CONFIG,
        entropy_margin: float = FROM_CONFIG,
        redundancy: float = FROM_CONFIG,
        max_shift: float = FROM_CONFIG,
        max_steps_per_minute: Optional[float] = FROM_CONFIG,
        reset_every: Optional[int] = FROM_CONFIG,
        release_after: Optional[int] = FROM_CONFIG,
        collapse_ratio: float = FROM_CONFIG,
        agreement_floor: float = FROM_CONFIG,
        label_shift: float = FROM_CONFIG,
        batch_diversity: bool = FROM_CONFIG,
        robust_horizon: float = FROM_CONFIG,
        norm_prior: float = FROM_CONFIG,
        min_step_samples: int = FROM_CONFIG,
        divergence_rise: float = FROM_CONFIG,
        mode: str = FROM_CONFIG,
        replay_size: int = FROM_CONFIG,
        monitor_options: Optional[Dict[str, Any]] = None,
        logits_fn: Optional[Callable] = None,
        process_group=None,
        seed: int = FROM_CONFIG,
        audit=None,
        snapshots=None,
        approval: bool = FROM_CONFIG,
        policy: Optional[Policy] = None,
        rules: Sequence = (),
        bias_guard: Optional[BiasGuard] = None,
        keep_versions: int = FROM_CONFIG,
        buffer_size: int = FROM_CONFIG,
        proposal_steps: int = FROM_CONFIG,
        poll_interval: float = FROM_CONFIG,
        audit_every: Optional[int] = FROM_CONFIG,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"selfheal: SelfHealer wraps an nn.Module, got {type(model).__name__}")
        if config is not None and not isinstance(config, HealerConfig):
            raise TypeError(f"selfheal: config must be a HealerConfig, got {type(config).__name__}")
        overrides = dict(
            budget=budget, max_rank=max_rank, lr=lr, anchor=anchor, entropy_margin=entropy_margin,
            redundancy=redundancy, max_shift=max_shift, max_steps_per_minute=max_steps_per_minute,
            reset_every=reset_every, release_after=release_after, collapse_ratio=collapse_ratio,
            agreement_floor=agreement_floor, label_shift=label_shift, batch_diversity=batch_diversity,
            robust_horizon=robust_horizon, norm_prior=norm_prior, min_step_samples=min_step_samples,
            divergence_rise=divergence_rise, mode=mode, replay_size=replay_size, seed=seed, approval=approval,
            keep_versions=keep_versions, buffer_size=buffer_size, proposal_steps=proposal_steps,
            poll_interval=poll_interval, audit_every=audit_every)
        self.config = (config or HealerConfig()).replace(
            **{name: value for name, value in overrides.items() if value is not FROM_CONFIG})
        self._check_combination(process_group, policy, bias_guard, given_rate=max_steps_per_minute)
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.policy = policy if policy is not None else Policy(max_steps_per_minute=self.config.max_steps_per_minute)
        self.rules = validate_rules(rules)
        self.bias_guard = bias_guard
        self._open_governance(audit, snapshots)
        self.logits_fn = logits_fn
        self.process_group = process_group
        self.batch_samples = 0  # samples in the last served batch (metrics)
        config = self.config
        self.adapters: AdapterSet = attach_adapters(model, budget=config.budget, targets=adapter_targets,
                                                    kinds=adapter_kinds, max_rank=config.max_rank, seed=config.seed,
                                                    robust_horizon=config.robust_horizon, norm_prior=config.norm_prior)
        _log.info("SelfHealer on %s: %s", type(model).__name__, healing_summary(self.adapters))
        self.monitor = self._make_monitor(monitor_options)
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
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, int(config.replay_size)))
        self._shadow = None
        self.label_shift = LabelShiftTracker(config.label_shift)
        self.guard = CollapseGuard(config)
        # (the parts get functions that do not hold the healer: no reference cycle)
        self.batch_check = BatchCheck(self.model, self.adapters, self.monitor,
                                      functools.partial(as_logits, logits_fn=logits_fn), summed_over(process_group),
                                      config)
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

    def _check_combination(self, process_group, policy, bias_guard, given_rate) -> None:
        """Settings that cannot go together, and arguments of the wrong type."""
        mode = self.config.mode
        if mode == "deferred" and process_group is not None:
            raise ValueError("selfheal: mode='deferred' cannot be combined with a process_group (the worker's "
                             "collectives would interleave with the serving thread's); use mode='inline'")
        if self.config.approval and process_group is not None:
            raise ValueError("selfheal: approval mode runs inline on one process (mode='inline', no process_group)")
        if policy is not None and given_rate is not FROM_CONFIG and given_rate is not None:
            raise ValueError("selfheal: give max_steps_per_minute either directly or in the policy, not both")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"selfheal: policy must be a selfheal_ext.governance.Policy, got {type(policy).__name__}")
        if bias_guard is not None and not isinstance(bias_guard, BiasGuard):
            raise TypeError(f"selfheal: bias_guard must be a BiasGuard, got {type(bias_guard).__name__}")

    def _open_governance(self, audit, snapshots) -> None:
        """The audit log (``True``: ``selfheal_audit.db`` in the working
        directory) and the snapshot store (default: beside the audit log)."""
        if audit is True:
            audit = DEFAULT_AUDIT_FILE
        if audit is False:
            audit = None
        self.audit: Optional[AuditLog] = audit if audit is None or isinstance(audit, AuditLog) else AuditLog(audit)
        if snapshots is None and self.audit is not None:
            snapshots = str(self.audit.path) + ".snapshots"
        self.snapshots: Optional[SnapshotStore] = \
            snapshots if snapshots is None or isinstance(snapshots, SnapshotStore) else SnapshotStore(snapshots)
        self.audit_error: Optional[str] = None

    def _make_monitor(self, monitor_options: Optional[Dict[str, Any]]) -> DriftMonitor:
        options = dict(monitor_options or {})
        if "taps" not in options:
            options["taps"] = self._default_taps(options.get("tap_count", 3))
            # the input-side tap decides when a drift has passed: it must see
            # a raw image's noise, blur and contrast, not only its mean level
            options.setdefault("pooling", {options["taps"][0]: "moments"})
        options.setdefault("logits_fn", self.logits_fn)
        options.setdefault("process_group", self.process_group)
        options.setdefault("seed", self.config.seed)
        monitor = DriftMonitor(self.model, **options)
        if monitor.config["read_every"] > 1 and monitor.process_group is not None:
            # the healer reads every batch while adapting or suspended, and a
            # suspension (an audit write failure) can be one rank's alone: the
            # ranks' all_reduce calls would no longer pair up
            raise ValueError("selfheal: SelfHealer cannot combine monitor_options read_every > 1 with a "
                             "process_group; use read_every=1 on several processes")
        monitor.explicit = True  # only the healer's served forward is counted
        return monitor

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
        self.optimizer = torch.optim.Adam(self.adapters.trainable(), lr=self.config.lr) \
            if self.adapters.trainable() else None
        self.learning_rate = self.config.lr
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
        self.guard.reset()
        self.label_shift.reset()
        # the batch-statistics check of the batch being served: True (many
        # classes), False (a run), None (not checked); and its information
        self._check: Optional[bool] = None
        self._served_fast = False
        self._served_source = None
        self.batch_check.clear_reading()
        self.batch_check.new_episode()
        self._check_seconds = 0.0
        # the served forward's autograd graph, kept for this batch's step
        self._served_graph = None
        self._plain_output = False
        self._pending: List[torch.Tensor] = []
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
        """Calibrates the monitor on healthy ``batches`` (a tensor of inputs, one
        ``(x, y)`` pair of tensors, a ``DataLoader`` or another iterable of
        batches: inputs, or ``(x, y)`` pairs whose labels only fit the accuracy
        estimate's temperature; see ``DriftMonitor.calibrate``) and
        estimates the Fisher information of the adapter parameters from the
        model's own pseudo-labels on the same data. Returns the monitor's
        ``CalibrationReport``."""
        # (the Fisher estimate needs autograd, which inference tensors cannot enter)
        batches = [_map_tensors(torch.Tensor.clone, b) if _has_inference_tensor(b) else b
                   for b in calibration_batches(batches, monitor_kwargs.get("batch_size"))]
        progress = monitor_kwargs.pop("progress", True)
        with self._lock, tqdm(total=4, desc="selfheal: calibrating", unit="stage", leave=False,
                              disable=None if progress else True) as stages:
            self._stop_worker()
            self._expire_logged_proposals("calibrate")
            self._reset_runtime()
            report = self.monitor.calibrate(batches, progress=False, **monitor_kwargs)
            stages.update()
            self._input_taps = [self.monitor.tap_names[0]]
            self._fit_fisher(batches)
            stages.update()
            self.label_shift.calibrate(self._reference_class_mix(batches))
            stages.update()
            self.batch_check.calibrate(batches, classes=self.label_shift.recent.numel())
            stages.update()
        return report

    def _inputs(self, batch):
        return batch_inputs(batch)

    def _logits(self, output) -> torch.Tensor:
        return as_logits(output, self.logits_fn)

    def _fit_fisher(self, batches) -> None:
        """The Fisher anchor's weights (``objective.fit_fisher``), unseen by the monitor."""
        try:
            with self.monitor.paused():
                self.fisher = fit_fisher(self.model, self.adapters, batches, self._logits, self._device())
        finally:
            self._to_source()

    def _reference_class_mix(self, batches) -> torch.Tensor:
        """Mean predicted class probabilities of the source on healthy data."""
        total, rows = None, 0
        with torch.no_grad(), self.monitor.paused():
            for batch in batches[:32]:
                x = self._inputs(batch).to(self._device())
                x = x[finite_rows(x)]
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
        return model_device(self.model)

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
                output = self._serve_approved(x) if self.config.approval else self._serve(x)
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
        self._check = None
        self.batch_check.clear_reading()
        self._served_source = None
        checked = time.perf_counter()
        if not held and self.active and not self.suspended:
            hinted = self.label_shift.in_run() or self.label_shift.hinted()
            if not hinted:
                # this batch's own source class mix (the source forward the
                # guards take anyway, taken before serving): a run that
                # begins here is checked before it is served, never served
                # with its own statistics nor folded into the recent
                # stream's moments at the fast rate
                self._served_source = self._source_logits(x)
                source = self._served_source if self._served_source is not None else \
                    torch.empty(0, self.label_shift.recent.numel(), device=self._device())  # (an empty batch)
                hinted = self.label_shift.looks_like_run(self._guard_statistics(source, source), self._check)  # (a collective)
            if hinted:
                self._check = self.batch_check.is_diverse(x)
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
                and self.config.mode == "inline" and self.optimizer is not None and self._plain_output
                and not self._in_run() and x.dim() > 0 and x.shape[0] >= self.config.min_step_samples
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
        if not norms or self.batch_check.levels is None:
            return output, logits
        self._check = self.batch_check.is_diverse(x, onset=True)  # (a collective: before any rank-local branch)
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
        every = self.config.audit_every
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
                active=self.active, approved_version=self.approved_version,
                signals=report.signals, accuracy_estimates=report.accuracy_estimates,
                estimated_drop=report.estimated_drop, suppressed=list(report.suppressed))
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
        finite = finite_rows(x)
        rows = x[finite].detach()
        if rows.shape[0] == 0:
            return
        if self._recent and self._recent[0][0].shape[1:] != rows.shape[1:]:
            self._recent.clear()  # the input shape changed: old rows cannot be batched with new ones
            self._recent_rows = 0
        self._recent.append([rows.clone(), finite, None, self.batches])
        self._recent_rows += rows.shape[0]
        limit = self.config.buffer_size
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
        return torch.cat([entry[0] for entry in self._recent])[-self.config.buffer_size:]

    def _buffer_source(self) -> Optional[torch.Tensor]:
        """The source probabilities of ``_buffer()``'s rows, when all are known."""
        if not self._recent or any(entry[2] is None for entry in self._recent):
            return None
        return torch.cat([entry[2] for entry in self._recent])[-self.config.buffer_size:]

    def _in_run(self) -> bool:
        """This batch is treated as part of a run of classes (robust
        statistics, no entropy step): the batch-statistics check decides when
        it ran, the label-shift tracker otherwise."""
        if self._check is not None:
            return not self._check
        return self.label_shift.in_run()

    def _check_detail(self) -> Dict[str, Optional[float]]:
        """The batch-statistics check's measures of this batch, for events."""
        reading = self.batch_check.reading
        return {"batch_information": reading.information, "check_threshold": reading.threshold,
                "batch_spread": reading.spread, "batch_classes": reading.classes}

    def _track(self, source_logits: torch.Tensor) -> None:
        """Class mix of a batch served by the source model."""
        self._track_merged(self._guard_statistics(source_logits, source_logits))

    def _track_merged(self, stats: torch.Tensor) -> None:
        """Folds the batch's merged guard statistics into the label-shift tracker."""
        self.label_shift.track(stats, self.monitor.config["window"], self._check)

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
        self.batch_check.new_episode()
        self.adapters.active = True
        self.clean_streak = 0
        self.guard.reset()
        self._pending = []
        self._input_visible = False
        self._drift_passed(report)  # the activating batch may already show it on the input side
        self._event("activate", score=report.score, reasons=list(report.reasons),
                    top_signal=report.attribution.top_signal if report.attribution else None,
                    config=self.config.as_dict())
        if self.config.mode == "deferred":
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
                        else None, reason="classes arrive in runs", label_shift=self.label_shift.level,
                        **self._check_detail())
            return
        x = self._gather_small(x)
        if x is None:
            return
        if self.config.mode == "inline":
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
        for _ in range(self.config.max_episode_trips + 2):
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
        minimum = self.config.min_step_samples
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
        return self.config.release_after or max(
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
        return summed_over(self.process_group)(values)

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
        """The collapse and divergence guard (``heal/guards.py``) on merged
        statistics; True when it tripped (and the trip was handled). A
        healthy version is kept as good every ``good_every`` steps."""
        downstream = [report.signals[name] for name in self.monitor.tap_names if name not in self._input_taps]
        reason = self.guard.check(stats, self.monitor.config["window"], downstream, self.monitor.window_threshold,
                                  window_turned=self.steps >= self._release_after(report))
        if reason is None:
            if self.guard.healthy and self.steps and self.steps % self.config.good_every == 0 and \
                    self.steps != self._last_snapshot_step:
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
        target = self.good_version if self._episode_trips < self.config.max_episode_trips else 0
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
        elif self._episode_trips >= self.config.max_episode_trips:
            # Repeated collapses: stop training the adapters until this drift
            # passes or the healer is reset (statistics adaptation goes on).
            self.hold = True
            self._event("hold", reason=f"{self._episode_trips} guard trips in one drift episode")
        for group in (self.optimizer.param_groups if self.optimizer else []):
            group["lr"] = self.learning_rate
        self.guard.reset()

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
        finite = finite_rows(x)
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
            shift = project_within(parameters, self._source_state, self.config.max_shift)
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
            detail["batch_information"] = self.batch_check.reading.information
            detail["check_threshold"] = self.batch_check.reading.threshold
        if record:
            self._event("step", state_hash=tensor_digest(adapters.state_dict()) if self.audit is not None else None, **detail)
        if self.config.reset_every and self.steps % self.config.reset_every == 0:
            # the adapters and optimizer this step trained (the deferred
            # worker's copies in deferred mode; its next publish carries it)
            self._to_source(adapters)
            optimizer.state.clear()
            detail["periodic_reset"] = True
            if record:
                self._event("reset", reason="periodic")
        return detail

    def _loss(self, output, parameters, x=None, model=None, adapters=None) -> Tuple[torch.Tensor, int]:
        """The step's objective (``objective.py``): reliable, non-redundant,
        certainty-weighted entropy plus the Fisher anchor to the source
        adapters, and the rules' penalties. Returns (loss, samples used)."""
        logits = self._logits(output)
        loss, count, self._mean_probs = reliable_entropy(logits, self.config.entropy_margin,
                                                         self.config.redundancy, self._mean_probs)
        self.selected_last_step = count
        loss = loss + self.config.anchor * fisher_anchor(self.fisher, parameters, self._source_state)
        if self.rules and x is not None and x.shape[0] > 0:
            try:
                penalty = total_penalty(self.rules, self._rule_context(model, adapters, x, grad=True, logits=logits))
            except Exception as error:  # noqa: BLE001 - a user's rule: no step, recorded
                raise RuleError(f"rule penalty failed: {type(error).__name__}: {error}") from error
            if penalty is not None:
                loss = loss + penalty
        return loss, count

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
        self._check = None
        self.batch_check.clear_reading()
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
                (self.label_shift.in_run() or self.label_shift.looks_like_run(stats, self._check)):
            self._check = self.batch_check.is_diverse(x)
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
            self._event("skip", reason="classes arrive in runs", label_shift=self.label_shift.level, staged=True,
                        **self._check_detail())
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
            if self._stage_steps >= self.config.proposal_steps:
                self._propose()

    def _start_stage(self, report: DriftReport) -> None:
        self._input_visible = False
        self._drift_passed(report)
        self._stage = self._detached_copy(self.versions[self.approved_version])
        self._stage_steps = 0
        self.batch_check.new_episode()
        self.clean_streak = 0
        self._pending = []
        self._event("activate", staged=True, score=report.score, reasons=list(report.reasons),
                    top_signal=report.attribution.top_signal if report.attribution else None,
                    config=self.config.as_dict())

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
        self.learning_rate = self.config.lr
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
            if self._episode_trips >= self.config.max_episode_trips and not self.hold:
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
                    "effective_classes": effective_classes(probs.mean(dim=0)),
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
                    "shift": distance_from(parameters, self._source_state) if parameters else 0.0}
        problems = []
        if evidence["proposed"]["effective_classes"] < \
                self.config.collapse_ratio * evidence["source"]["effective_classes"]:
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
        if now - self._last_poll < self.config.poll_interval:
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
            if self.version == 0 and self.drift is not None and self.drift.drift and not self.config.approval:
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
        shadow = AdapterSet(model, [copy.copy(p) for p in self.adapters.placements], seed=self.config.seed,
                            robust_horizon=self.config.robust_horizon, norm_prior=self.config.norm_prior)
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
        keep = self.config.keep_versions
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
            if self.config.approval:
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
        if self.active and self.config.mode == "deferred":
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
        _log.log(logging.DEBUG if kind in _ROUTINE_EVENTS else logging.INFO, "batch %d, version %d: %s %s",
                 self.batches, self.version, kind, detail)
        self.event_count += 1
        self.events.append(HealEvent(self.batches, kind, self.version, detail, seq=self.event_count))
        if len(self.events) > self.config.event_limit:
            del self.events[: len(self.events) - self.config.event_limit]
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
                "config": self.config.as_dict(),
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
                **self.label_shift.state_dict(),
                "pending": [t.clone() for t in self._pending],
                **self.batch_check.state_dict(),
                "input_taps": list(self._input_taps),
                **self.guard.state_dict(),
                "last_snapshot_step": self._last_snapshot_step,
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
            check = self.batch_check.checked_state(state)  # (validated before anything is loaded)
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
            self._pending = [t.to(device, copy=True) for t in state["pending"]]
            self.label_shift.load_state_dict(state)
            self.batch_check.load_checked(check)
            self._input_taps = list(state["input_taps"])
            self.guard.load_state_dict(state)
            self._last_snapshot_step = int(state["last_snapshot_step"])
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
            if self.active and self.config.mode == "deferred":
                self._start_worker()


def _map_tensors(function, value):
    """``value`` (nested lists, tuples, dicts) with ``function`` applied to each tensor."""
    return torch.utils._pytree.tree_map(lambda t: function(t) if isinstance(t, torch.Tensor) else t, value)


def _has_inference_tensor(value) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_inference() for t in torch.utils._pytree.tree_leaves(value))
