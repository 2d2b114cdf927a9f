"""DriftMonitor: calibrated, batch-by-batch drift detection for any ``nn.Module``.

The monitor taps a few layers of the model (forward pre-hooks), bins their
features into integer histograms with the fused ``histogram_update_`` op, reads
the prediction entropy with the fused ``softmax_entropy`` op, and compares a
window of recent data with a healthy reference fixed by ``calibrate``:

* **window test**: per-layer divergence (JS or KL, fused op) of the window's
  histograms from the reference, and the window's mean entropy and tail mass
  of high-entropy predictions; each is standardised by its bootstrap null
  distribution and the largest is compared with a threshold set so that a
  clean stream raises it once per ``false_alarm_every`` batches on average.
* **CUSUM**: a two-sided CUSUM on a per-batch score (reference log-likelihood
  of the batch's binned features plus its mean entropy, standardised) reacts to
  small persistent shifts; its threshold comes from the same false-alarm budget
  (Brook–Evans average run length on the bootstrap score distribution).
* **batch test**: the same per-batch score, alone, against a two-sided limit
  at the budget's level (a Shewhart limit beside the CUSUM): a large shift
  alarms on its first batch, even right after ``reset`` while the window is
  still filling.
* **non-finite surge**: batches with more NaN/Inf samples than the reference
  rate allows (binomial tail at the same budget).

The false-alarm budget ``1 / false_alarm_every`` per batch is split 80 % window
test, 5 % batch test, 5 % each CUSUM side, 5 % non-finite test.

``read_every=k`` reads one served batch in ``k`` (the taps are detached on
the others): the cost of watching falls ``k``-fold, the tests run at the level of
``false_alarm_every / k`` read batches, so false alarms per *served* batch stay
at the configured rate. Detection needs about as many *read* batches as
before, so its delay in served batches grows up to ``k``-fold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from . import ops, reference
from .accuracy_estimate import ESTIMATORS, AccuracyEstimator
from .batches import automatic_window, calibration_batches
from .taps import (POOLINGS, Tap, TapSpec, apply_sketch, first_tensor, pool_features, random_projection, resolve_taps,
                   sketch_plan)
from .thresholds import binomial_upper_tail, cusum_threshold, fit_temperature, upper_quantile
from .windows import ExponentialWindow, SlidingWindow

_log = logging.getLogger(__name__)

_BUDGET_WINDOW, _BUDGET_BATCH, _BUDGET_CUSUM_SIDE, _BUDGET_NONFINITE = 0.80, 0.05, 0.05, 0.05
_ENTROPY_TAIL_QUANTILE = 0.9
# Float64 sums kept per batch beside the integer histogram tables: entropy and
# calibrated confidence of the rows with finite logits, rows whose entropy is
# above the reference tail level, rows with finite logits, rows without, rows
# whose confidence is above the ATC threshold (accuracy_estimate.py).
_STAT_ENTROPY, _STAT_CONFIDENCE, _STAT_TAIL, _STAT_FINITE, _STAT_NONFINITE, _STAT_ATC, _STATS = 0, 1, 2, 3, 4, 5, 6
_FORMAT_VERSION = 1
_MAX_BOOTSTRAP = 10_000


@dataclass
class Attribution:
    """Which signal moved: ``signals`` holds each signal's share of the positive
    standardised scores (sums to 1 when any is positive); ``features`` the
    features of each tapped layer that diverge most from the reference, as
    ``(feature index, divergence)`` pairs (indices are projection components
    for projected layers)."""

    signals: Dict[str, float]
    features: Dict[str, List[Tuple[int, float]]]

    @property
    def top_signal(self) -> str:
        return max(self.signals, key=self.signals.get) if self.signals else ""


@dataclass
class DriftReport:
    """The monitor's reading after one batch."""

    batch: int
    drift: bool
    reasons: Tuple[str, ...]
    score: float
    threshold: float
    cusum: Tuple[float, float]
    cusum_threshold: float
    signals: Dict[str, float]
    divergence: Dict[str, float]
    entropy_mean: float
    entropy_tail: float
    accuracy_estimate: float
    batch_accuracy_estimate: float
    samples: int
    nonfinite_samples: int
    window_samples: float
    warming_up: bool
    attribution: Optional[Attribution] = None
    # False for a batch the monitor did not read (``read_every``): the fields
    # are those of the last batch read.
    read: bool = True
    # The window's label-free accuracy estimates (accuracy_estimate.py):
    # {"confidence", "atc", "doc", "reference", "labelled"}; atc/doc are None
    # when calibrated without labels.
    accuracy_estimates: Optional[Dict[str, object]] = None
    # reference accuracy minus the estimate of the monitor's ``accuracy_estimator``
    estimated_drop: float = float("nan")
    # alarms raised by a test but withheld because the estimated drop was
    # under ``alarm_min_drop`` (a benign drift)
    suppressed: Tuple[str, ...] = ()


@dataclass
class CalibrationReport:
    """What ``calibrate`` saw and set."""

    samples: int
    dropped_nonfinite: int
    batch_size: int
    features: Dict[str, int]
    window_threshold: float
    cusum_threshold: float
    bootstrap_windows: int
    reference_entropy: float
    reference_confidence: float
    temperature: float
    reference_accuracy: Optional[float] = None
    tail_extrapolated: bool = False
    notes: List[str] = field(default_factory=list)
    batch_threshold: float = math.inf
    # the monitor window in samples, and whether calibration chose it from
    # the amount of healthy data (``DriftMonitor(window=None)``, the default)
    window: int = 0
    window_chosen: bool = False


_UNSET = object()


class DriftMonitor:
    """Watches a model for data drift, batch by batch, without labels.

    Args:
        model: the model to watch; it is not modified (hooks only).
        taps: module names and/or ``nn.Module`` types whose *inputs* are
            watched. Default: the classifier head and the last blocks before it.
        tap_count: how many layers the default choice taps.
        pooling: per tap name, ``"mean"`` (default: per-channel means) or
            ``"moments"`` (means and standard deviations of each channel).
        bins: histogram bins per feature between the reference quantiles
            ``quantile_range`` (plus an underflow and an overflow bin).
        window: samples in the window the divergences are computed on.
            Default (None): chosen at calibration from the amount of healthy
            data, the largest power of two that it fills 4 times, from 32 to
            512 samples (``CalibrationReport.window`` says which).
        window_kind: ``"sliding"`` (the last ``window`` samples, exact integer
            counts) or ``"exponential"`` (weights decaying so the effective
            sample size is ``window``).
        false_alarm_every: target expected number of clean batches between
            false alarms (ERT); sets every threshold.
        divergence: ``"js"`` (Jensen–Shannon) or ``"kl"`` (KL with ½ pseudo-counts).
        max_features: features wider than this are reduced by a fixed sparse
            random projection (count sketch) to ``max_features`` components.
        cusum_allowance: CUSUM reference value ``k`` in standard deviations of
            the per-batch score (``k = δ/2`` detects a persistent shift ``δ`` fastest).
        bootstrap: number of bootstrap windows drawn from the reference for the
            window threshold (default: enough for 20 exceedances at the target
            level, at most 10,000; beyond that the tail is extrapolated).
        logits_fn: maps the model's output to ``[N, C]`` logits (default: the
            output itself, or its first element if it is a tuple/list). A single
            logit ``[N, 1]`` is read as a binary classifier's positive class.
        process_group: a ``torch.distributed`` group; per-batch counts are
            summed over it (``all_reduce``) so every rank decides the same.
        seed: seeds the projection, the reference split and the bootstrap.
        read_every: read one served batch in this many; on the others the
            model runs with the taps' hooks detached, and ``update`` returns
            the last reading with ``read=False``. Thresholds keep ``false_alarm_every`` per *served*
            batch; detection needs about as many read batches as before, so
            its delay in served batches grows up to ``read_every``-fold. Set
            ``read_all`` to read every batch for a while (``SelfHealer`` does
            while it adapts); the tests keep their per-read level then, so
            false alarms per served batch are up to ``read_every`` times the
            configured rate while it is on. Under a process group every rank
            must set it alike.
        alarm_min_drop: when set, the monitor alarms only on drifts whose
            estimated accuracy drop (``DriftReport.estimated_drop``, reference
            accuracy minus the window's estimate, as a fraction: 0.05 is five
            points) is at least this; other alarms are withheld and listed in
            ``DriftReport.suppressed``. Non-finite surges always alarm.
        accuracy_estimator: which estimate ``estimated_drop`` and
            ``alarm_min_drop`` use: ``"atc"``, ``"doc"`` (both need ``(x, y)``
            calibration batches), ``"confidence"``, or ``"auto"`` (ATC with
            labels, average confidence without).

    Example::

        monitor = DriftMonitor(model, window=256, false_alarm_every=1000)
        monitor.calibrate(healthy_batches)
        logits = monitor(x)               # runs the model, then reads the batch
        if monitor.drift_detected:
            print(monitor.last_report.attribution)
    """

    # options left out of a saved state at their default, so the state loads
    # where the option does not exist yet
    _DEFAULTS_LEFT_OUT = {"read_every": 1, "alarm_min_drop": None, "accuracy_estimator": "auto"}

    def __init__(
        self,
        model: nn.Module,
        taps: Optional[Sequence[TapSpec]] = None,
        *,
        tap_count: int = 3,
        bins: int = 16,
        window: Optional[int] = None,
        window_kind: str = "sliding",
        false_alarm_every: float = 10_000,
        divergence: str = "js",
        max_features: int = 64,
        quantile_range: Tuple[float, float] = (0.005, 0.995),
        cusum_allowance: float = 0.5,
        bootstrap: Optional[int] = None,
        logits_fn: Optional[Callable] = None,
        process_group=None,
        seed: int = 0,
        max_calibration_samples: int = 65_536,
        pooling: Optional[Dict[str, str]] = None,
        read_every: int = 1,
        alarm_min_drop: Optional[float] = None,
        accuracy_estimator: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"selfheal: DriftMonitor watches an nn.Module, got {type(model).__name__}")
        if window_kind not in ("sliding", "exponential"):
            raise ValueError(f"selfheal: window_kind must be 'sliding' or 'exponential', got {window_kind!r}")
        if divergence not in ("js", "kl"):
            raise ValueError(f"selfheal: divergence must be 'js' or 'kl', got {divergence!r}")
        if bins < 2:
            raise ValueError(f"selfheal: bins must be >= 2, got {bins}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 16):
            raise ValueError(f"selfheal: window must be >= 16 samples, got {window}")
        if not false_alarm_every > 1:
            raise ValueError(f"selfheal: false_alarm_every must be > 1 batch, got {false_alarm_every}")
        low, high = quantile_range
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"selfheal: quantile_range must satisfy 0 <= low < high <= 1, got {quantile_range}")
        if max_features < 1:
            raise ValueError(f"selfheal: max_features must be >= 1, got {max_features}")
        if isinstance(read_every, bool) or not isinstance(read_every, int) or read_every < 1:
            raise ValueError(f"selfheal: read_every must be an integer >= 1, got {read_every!r}")
        if not false_alarm_every / read_every > 1:
            raise ValueError(f"selfheal: false_alarm_every ({false_alarm_every}) must exceed read_every "
                             f"({read_every}): the tests run once per {read_every} batches")
        if alarm_min_drop is not None and not (isinstance(alarm_min_drop, (int, float))
                                               and 0.0 <= alarm_min_drop <= 1.0):
            raise ValueError(f"selfheal: alarm_min_drop must be a fraction in [0, 1] (0.05 = five accuracy "
                             f"points) or None, got {alarm_min_drop!r}")
        if accuracy_estimator not in ESTIMATORS + ("auto",):
            raise ValueError(f"selfheal: accuracy_estimator must be one of {ESTIMATORS + ('auto',)}, "
                             f"got {accuracy_estimator!r}")
        if bootstrap is not None and bootstrap < 200:
            raise ValueError(f"selfheal: bootstrap must be >= 200 windows, got {bootstrap}")
        self.model = model
        self.taps: List[Tap] = resolve_taps(model, taps, tap_count)
        pooling = dict(pooling or {})
        for name, kind in pooling.items():
            if kind not in POOLINGS:
                raise ValueError(f"selfheal: pooling for {name!r} must be one of {POOLINGS}, got {kind!r}")
            if name not in [tap.name for tap in self.taps]:
                raise ValueError(f"selfheal: pooling given for {name!r}, which is not a tap ({self.tap_names})")
        for tap in self.taps:
            tap.pooling = pooling.get(tap.name, "mean")
        # None until calibration chooses it (window=None)
        self._window_chosen = window is None
        self.config = {
            "bins": int(bins), "window": None if window is None else int(window), "window_kind": window_kind,
            "false_alarm_every": float(false_alarm_every), "divergence": divergence,
            "max_features": int(max_features), "quantile_range": (float(low), float(high)),
            "cusum_allowance": float(cusum_allowance), "bootstrap": bootstrap, "seed": int(seed),
            "max_calibration_samples": int(max_calibration_samples),
            "pooling": {name: kind for name, kind in sorted(pooling.items()) if kind != "mean"},
            "read_every": int(read_every),
            "alarm_min_drop": None if alarm_min_drop is None else float(alarm_min_drop),
            "accuracy_estimator": accuracy_estimator,
        }
        self.logits_fn = logits_fn
        self.process_group = process_group
        self.calibrated = False
        self.last_report: Optional[DriftReport] = None
        self.calibration: Optional[CalibrationReport] = None
        self._mode = "off"
        self._paused = 0
        # explicit: the taps count only inside watching() (an owner such as
        # SelfHealer decides which model calls are served batches).
        self.explicit = False
        self._watching = 0
        # read_every: batches still to pass unread before the next read;
        # read_all (set by an owner) reads every batch whatever the count.
        self._skip_left = 0
        self._read_all = False
        self._removed = False
        # (mask, lo, hi) per feature: edges calibrate keeps instead of the
        # quantiles (FeatureMonitor's categorical columns: one bin per category)
        self._fixed_edges: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._unread_report: Optional[DriftReport] = None
        self._unread_of: Optional[DriftReport] = None
        self._projections: Dict[str, Optional[torch.Tensor]] = {}
        self._sketch_plans: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._collected: Dict[str, List[torch.Tensor]] = {}
        self._rows_seen: Dict[str, int] = {}
        self._hooks = [(tap.module, self._make_hook(tap)) for tap in self.taps]
        self._handles = []
        self._sync_hooks()

    # ------------------------------------------------------------------ hooks

    @property
    def tap_names(self) -> List[str]:
        return [tap.name for tap in self.taps]

    def remove(self) -> None:
        """Detaches the monitor from the model (removes its hooks)."""
        self._removed = True
        self._sync_hooks()

    @property
    def read_all(self) -> bool:
        """When True every batch is read whatever ``read_every`` says."""
        return self._read_all

    @read_all.setter
    def read_all(self, value: bool) -> None:
        self._read_all = bool(value)
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Hooks are attached only while the next batch is to be read: on the
        unread batches of ``read_every`` the model runs without them (a
        module with any hook leaves PyTorch's fast call path, about 20 µs a
        module here). They are prepended, so they always see a module's input
        before other pre-hooks, however often they were re-attached."""
        want = not self._removed and not (self._skip_left and not self._read_all)
        if want and not self._handles:
            self._handles = [module.register_forward_pre_hook(hook, prepend=True) for module, hook in self._hooks]
        elif not want and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    @contextlib.contextmanager
    def paused(self):
        """Model calls inside this block are not seen by the monitor (e.g. the
        extra forward passes of an adaptation step)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def watching(self):
        """With ``explicit = True``, the model calls inside this block are the
        ones the taps count (outside it they are ignored)."""
        self._watching += 1
        try:
            yield self
        finally:
            self._watching -= 1

    @property
    def _reads_between_alarms(self) -> float:
        """The tests' expected run between false alarms, in batches read."""
        return self.config["false_alarm_every"] / self.config["read_every"]

    def _sketch_plan(self, tap: Tap, width: int):
        """The tap's count-sketch plan ``(bucket, sign, dim)`` on the monitor's
        device, or None when the tap is narrow enough to bin as it is."""
        if tap.name not in self._projections:
            if self._mode != "collect":
                raise RuntimeError(f"selfheal: tap {tap.name!r} has no calibrated projection state")
            wide = width > self.config["max_features"]
            self._projections[tap.name] = (
                random_projection(width, self.config["max_features"], self.config["seed"] + len(self._projections))
                if wide else None)
        projection = self._projections[tap.name]
        if projection is None:
            return None
        if width != projection.shape[0]:
            raise ValueError(f"selfheal: tap {tap.name!r} saw {width} features, "
                             f"calibrated with {projection.shape[0]}")
        plan = self._sketch_plans.get(tap.name)
        device = self.device if self._mode != "collect" else projection.device
        if plan is None or plan[0].device != device:
            bucket, sign, dim = sketch_plan(projection)
            plan = (bucket.to(device), sign.to(device), dim)
            self._sketch_plans[tap.name] = plan
        return plan

    def _make_hook(self, tap: Tap):
        def hook(module, args):
            if self._mode == "off" or self._paused or (self._mode == "monitor" and (
                    (self.explicit and not self._watching) or (self._skip_left and not self._read_all))):
                return None
            value = first_tensor(args)
            if value is None:
                raise TypeError(f"selfheal: tapped module {tap.name!r} was called without a tensor argument")
            with torch.no_grad():
                features = pool_features(value.detach(), tap.channels_first, tap.pooling)
                if not features.is_floating_point() or features.dtype == torch.float64:
                    features = features.float()
                plan = self._sketch_plan(tap, features.shape[1])
                if self._mode == "collect":
                    features = features.float().cpu()
                    if plan is not None:
                        features = apply_sketch(features, (plan[0].cpu(), plan[1].cpu(), plan[2]))
                    self._collected.setdefault(tap.name, []).append(features)
                else:
                    self._count(tap.name, features, plan)
            self._rows_seen[tap.name] = self._rows_seen.get(tap.name, 0) + features.shape[0]
            return None
        return hook

    def _count(self, name: str, features: torch.Tensor, plan) -> None:
        """Bins one batch of a tap's features (sketched in the same pass when
        the tap is wide) into the batch tables."""
        if features.device != self.device:
            features = features.to(self.device)
        counts, nonfinite, lo, hi = self._tap_tables[name]
        width = plan[2] if plan is not None else features.shape[1]
        if width != counts.shape[0]:
            raise ValueError(f"selfheal: tap {name!r} saw {features.shape[1]} features, "
                             f"calibrated with {counts.shape[0]}")
        if plan is None:
            ops.histogram_update_(counts, nonfinite, features, lo, hi)
        else:
            ops.sketch_histogram_update_(counts, nonfinite, features, plan[0], plan[1], lo, hi)

    def _logits(self, output) -> torch.Tensor:
        return as_logits(output, self.logits_fn).detach()

    def _confidence(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Entropy and calibrated confidence (max probability) per row, fused."""
        if self.temperature != 1.0:
            logits = logits.float() / self.temperature
        if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            logits = logits.float()
        return ops.softmax_entropy(logits)

    # ------------------------------------------------------------ calibration

    def calibrate(self, batches: Iterable, *, labels_in_batches: Optional[bool] = None,
                  batch_size: Optional[int] = None, progress: bool = True) -> CalibrationReport:
        """Fixes the healthy reference from ``batches`` and sets every threshold.

        ``batches`` is a tensor of healthy inputs ``[N, ...]`` (split into
        batches of ``batch_size`` rows, default 64), one ``(x, y)`` pair of
        whole tensors (split alike), or an iterable of batches (a list, a
        ``DataLoader``) that yields input tensors or ``(x, y)`` pairs. Labels
        ``y`` are used only to fit a temperature for the accuracy estimate
        (never for detection). Needs at least ``4 * window`` samples with
        finite features and logits (128 with the automatic window); rows with
        NaN/Inf are dropped and counted. ``batch_size`` (default: the median
        calibration batch) is the batch size the CUSUM threshold is computed
        for. ``progress`` shows a progress bar (``tqdm``) on a terminal.

        >>> report = monitor.calibrate(torch.randn(300, 8))  # doctest: +SKIP
        >>> report.window  # doctest: +SKIP
        64
        """
        batches = calibration_batches(batches, batch_size)
        previous = self.state_dict() if self.calibrated else None
        try:
            return self._calibrate(batches, labels_in_batches, batch_size, progress)
        except BaseException:
            # A failed calibration leaves the monitor as it was: still
            # watching with its old reference, or not calibrated at all.
            if previous is not None:
                self.load_state_dict(previous)
            else:
                self.calibrated = False
                self._mode = "off"
                if self._window_chosen:
                    self.config["window"] = None
            raise

    def _calibrate(self, batches, labels_in_batches, batch_size, progress=True) -> CalibrationReport:
        config = self.config
        generator = torch.Generator().manual_seed(config["seed"] + 7919)
        self.calibrated = False
        self._skip_left = 0
        self._sync_hooks()  # collecting needs the taps
        self._projections = {}
        self._sketch_plans = {}
        self._collected = {}
        logits_list, labels_list, sizes = [], [], []
        self._mode = "collect"
        self.temperature = 1.0
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc="selfheal: calibrating", unit="batch", leave=False,
                                  disable=None if progress else True):
                    x, y = _split_batch(batch, labels_in_batches)
                    self._rows_seen = {}
                    output = self.model(x)
                    logits = self._logits(output)
                    self._check_rows(logits.shape[0])
                    logits_list.append(logits.float().cpu())
                    sizes.append(logits.shape[0])
                    if y is not None:
                        labels_list.append(torch.as_tensor(y).reshape(-1).cpu())
                    if sum(sizes) >= config["max_calibration_samples"]:
                        break
        finally:
            self._mode = "off"
            self._rows_seen = {}
        if not sizes:
            raise ValueError("selfheal: calibrate got no batches")
        features = {tap.name: torch.cat(self._collected.pop(tap.name)) for tap in self.taps}
        logits = torch.cat(logits_list)
        self.device = next(iter(_devices_of(self.model)), torch.device("cpu"))
        report = self._fit_reference(features, logits, labels_list, sizes, batch_size, generator)
        if self.process_group is not None:
            self._share_rank0_reference()
        return report

    def _check_rows(self, rows: int) -> None:
        for tap in self.taps:
            seen = self._rows_seen.get(tap.name, 0)
            if seen != rows:
                if seen == 0:
                    raise RuntimeError(f"selfheal: tapped layer {tap.name!r} did not run in the model's "
                                       "forward; choose taps that the forward pass uses")
                raise RuntimeError(
                    f"selfheal: tapped layer {tap.name!r} saw {seen} rows but the logits have {rows}; "
                    "call monitor.update(logits) once per model call (wrap other calls in monitor.paused())")

    def _fit_reference(self, features, logits, labels_list, sizes, batch_size, generator) -> CalibrationReport:
        config = self.config
        notes: List[str] = []
        names = self.tap_names
        table = torch.cat([features[name] for name in names], dim=1)
        finite_rows = torch.isfinite(table).all(dim=1) & torch.isfinite(logits).all(dim=1)
        dropped = int((~finite_rows).sum())
        kept = int(finite_rows.sum())
        if self._window_chosen:
            config["window"] = automatic_window(kept)
            notes.append(f"window of {config['window']} samples chosen from {kept} healthy samples")
        window = config["window"]
        needed = 4 * window
        if kept < needed:
            raise ValueError(
                f"selfheal: calibrate needs at least {needed} healthy samples with finite features and "
                f"logits (4 x window={window}); got {kept}" + (f" ({dropped} dropped for NaN/Inf)" if dropped else "")
                + ". Pass more batches, a smaller window, or no window (chosen from the data).")
        table, logits = table[finite_rows], logits[finite_rows]
        self.temperature, reference_accuracy, correct = 1.0, None, None
        if labels_list:
            labels = torch.cat(labels_list)
            if labels.numel() != finite_rows.numel():
                raise ValueError(f"selfheal: calibrate got {labels.numel()} labels for {finite_rows.numel()} samples")
            labels = labels[finite_rows]
            self.temperature = fit_temperature(logits, labels)
            correct = logits.argmax(dim=1) == labels
            reference_accuracy = float(correct.double().mean())
        else:
            if self.config["accuracy_estimator"] in ("atc", "doc"):
                raise ValueError(f"selfheal: accuracy_estimator={self.config['accuracy_estimator']!r} needs the "
                                 "reference accuracy: calibrate on (x, y) pairs")
            notes.append("no labels: confidence is not temperature-calibrated (temperature 1); accuracy "
                         "estimates are the mean confidence only (no ATC/DoC) and drops are measured from "
                         "the reference's mean confidence")
        entropy, confidence = self._confidence(logits)
        entropy, confidence = entropy.double(), confidence.double()
        self._accuracy = AccuracyEstimator.fit(confidence, correct)

        widths = [features[name].shape[1] for name in names]
        offsets = [0]
        for width in widths:
            offsets.append(offsets[-1] + width)
        self._slices = {name: (offsets[i], offsets[i + 1]) for i, name in enumerate(names)}
        total_features = offsets[-1]
        layer_of_feature = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(widths))
        self._layer_sum = torch.nn.functional.one_hot(layer_of_feature, len(names)).double()
        self._layer_mean = self._layer_sum / torch.tensor(widths, dtype=torch.float64)

        low, high = config["quantile_range"]
        lo = _column_quantile(table, low)
        hi = _column_quantile(table, high)
        span = torch.clamp(hi - lo, min=0)
        hi = torch.where(span > 0, hi, lo + torch.clamp(lo.abs() * 1e-3, min=1e-6))
        if self._fixed_edges is not None:
            fixed, fixed_lo, fixed_hi = self._fixed_edges
            if fixed.shape != lo.shape:
                raise ValueError(f"selfheal: fixed edges for {fixed.numel()} features, the taps give {lo.numel()}")
            lo, hi = torch.where(fixed, fixed_lo.double(), lo), torch.where(fixed, fixed_hi.double(), hi)
        self.lo, self.hi = lo.float().contiguous(), hi.float().contiguous()

        # Reference tables from one half, null distributions from the other:
        # bootstrapping from the data that made the reference would hide the
        # reference's own sampling noise and set thresholds too low.
        order = torch.randperm(table.shape[0], generator=generator)
        half = table.shape[0] // 2
        part_a, part_b = order[:half], order[half:]
        bins = config["bins"]
        self.reference_counts = torch.zeros(total_features, bins + 2, dtype=torch.int64)
        scratch = torch.zeros(total_features, dtype=torch.int64)
        ops.histogram_update_(self.reference_counts, scratch, table[part_a].contiguous(), self.lo, self.hi)
        smoothed = self.reference_counts.double() + 0.5
        self._neg_log_p = -(smoothed / smoothed.sum(dim=1, keepdim=True)).log()
        self.entropy_tail_level = float(torch.quantile(entropy[part_a], _ENTROPY_TAIL_QUANTILE))
        self.reference_entropy = float(entropy[part_a].mean())
        self.reference_confidence = float(confidence[part_a].mean())

        all_bins = reference.histogram_bin_index(table, self.lo, self.hi, bins)
        self._fit_window_threshold(all_bins, entropy, part_a, part_b, generator, notes)
        batch = int(batch_size) if batch_size else int(sorted(sizes)[len(sizes) // 2])
        self._fit_cusum(all_bins[part_b], entropy[part_b], batch, generator)
        self.nonfinite_rate = (dropped + 0.5) / (finite_rows.numel() + 1.0)
        self._nonfinite_limit_cache: Dict[int, int] = {}

        self._move_to_device()
        self._make_runtime_state()
        self.calibrated = True
        self.calibration = CalibrationReport(
            samples=kept, dropped_nonfinite=dropped, batch_size=batch,
            features=dict(zip(names, widths)), window_threshold=self.window_threshold,
            cusum_threshold=self.cusum_threshold, batch_threshold=self.batch_threshold,
            bootstrap_windows=self._bootstrap_windows,
            reference_entropy=self.reference_entropy, reference_confidence=self.reference_confidence,
            temperature=self.temperature, reference_accuracy=reference_accuracy,
            tail_extrapolated=self._tail_extrapolated, notes=notes,
            window=window, window_chosen=self._window_chosen)
        _log.info("monitor calibrated on %d healthy samples: window %d (%s), window threshold %.3g, "
                  "CUSUM threshold %.3g for batches of %d", kept, window,
                  "chosen from the data" if self._window_chosen else "set", self.window_threshold,
                  self.cusum_threshold, batch)
        return self.calibration

    def _signal_names(self) -> List[str]:
        return self.tap_names + ["entropy_mean", "entropy_tail"]

    def _raw_signals(self, counts: torch.Tensor, entropy_sum, tail_count, finite_rows, samples: float) -> torch.Tensor:
        """Window signals ``[..., L + 2]`` for tensors of windows (the bootstrap);
        ``_decide`` computes the same numbers for one window from host floats."""
        bins = self.config["bins"] + 2
        features = self.reference_counts.shape[0]
        flat = counts.reshape(-1, bins)
        reference_counts = self.reference_counts.to(flat.dtype)
        reference_counts = reference_counts.expand(flat.shape[0] // features, features, bins).reshape(-1, bins)
        divergence = self._divergence(flat, reference_counts).double().reshape(counts.shape[:-1])
        layer = _scaled_divergence(divergence @ self._layer_mean, samples, self.config["window"])
        entropy_mean, tail = self._entropy_signals(entropy_sum, tail_count, finite_rows, samples)
        return torch.cat([layer, entropy_mean.unsqueeze(-1), tail.unsqueeze(-1)], dim=-1)

    def _divergence(self, p_counts: torch.Tensor, q_counts: torch.Tensor) -> torch.Tensor:
        divergence_fn = ops.js_divergence if self.config["divergence"] == "js" else ops.kl_divergence
        return divergence_fn(p_counts, q_counts, 0.5)

    def _entropy_signals(self, entropy_sum, tail_count, finite_rows, samples: float):
        """Window mean entropy and tail mass, with their spread rescaled to a
        window of ``window`` samples (a null mean's spread shrinks like
        1/sqrt(n)), so windows of any size share one null distribution. Works
        on floats and on tensors alike."""
        root = math.sqrt(samples / self.config["window"])
        rows = finite_rows.clamp(min=1) if isinstance(finite_rows, torch.Tensor) else max(finite_rows, 1.0)
        entropy_mean = self.reference_entropy + (entropy_sum / rows - self.reference_entropy) * root
        tail = self._reference_tail + (tail_count / rows - self._reference_tail) * root
        return entropy_mean, tail

    def _standardise(self, raw: torch.Tensor) -> torch.Tensor:
        z = (raw - self._signal_location) / self._signal_scale
        # Entropy mean is watched both ways; divergences and the tail mass only upwards.
        return torch.cat([z[..., :-2], z[..., -2:-1].abs(), z[..., -1:]], dim=-1)

    def _standardise_values(self, raw: List[float]) -> List[float]:
        """``_standardise`` for one window held in host floats."""
        z = [(value - location) / scale for value, location, scale in zip(raw, self._location_list, self._scale_list)]
        z[-2] = abs(z[-2])
        return z

    def _fit_window_threshold(self, all_bins, entropy, part_a, part_b, generator, notes) -> None:
        """Threshold of the window test from bootstrap windows.

        A clean window at run time differs from the reference by its own
        sampling noise plus the reference's (``A`` is a finite sample). Windows
        drawn from the held-out half ``B`` would add ``B``'s noise on top and
        raise every averaged divergence by a near-constant bias, so windows are
        drawn from a mixture of ``B`` (probability ``lambda``) and ``A`` with
        ``lambda**2 * (1/|A| + 1/|B|) = 1/|A|``: its expected squared distance to
        the reference equals that of the true distribution.
        """
        config = self.config
        window, bins = config["window"], config["bins"] + 2
        alpha = _BUDGET_WINDOW / self._reads_between_alarms
        windows = config["bootstrap"] or int(min(_MAX_BOOTSTRAP, max(2_000, math.ceil(20 / alpha))))
        features = all_bins.shape[1]
        from_b = math.sqrt(part_b.numel() / (part_a.numel() + part_b.numel()))
        tail = (entropy > self.entropy_tail_level).double()
        self._reference_tail = float(tail[part_a].mean())
        offsets = torch.arange(features) * bins
        chunk = max(1, int(2 ** 23 // (window * features)))
        raws = []
        for start in range(0, windows, chunk):
            count = min(chunk, windows - start)
            use_b = torch.rand(count, window, generator=generator) < from_b
            picks = torch.where(
                use_b,
                part_b[torch.randint(part_b.numel(), (count, window), generator=generator)],
                part_a[torch.randint(part_a.numel(), (count, window), generator=generator)])
            cells = all_bins[picks] + offsets + (torch.arange(count) * (features * bins)).view(count, 1, 1)
            counts = torch.bincount(cells.reshape(-1), minlength=count * features * bins)
            counts = counts.view(count, features, bins)
            rows = torch.full((count,), float(window), dtype=torch.float64)
            raws.append(self._raw_signals(counts, entropy[picks].sum(dim=1), tail[picks].sum(dim=1), rows,
                                          float(window)))
        raw = torch.cat(raws)
        location = raw.median(dim=0).values
        spread = (torch.quantile(raw, 0.75, dim=0) - torch.quantile(raw, 0.25, dim=0)) / 1.349
        self._signal_location = location
        self._signal_scale = torch.clamp(spread, min=1e-12 + 1e-6 * location.abs())
        combined = self._standardise(raw).max(dim=-1).values
        self.window_threshold = upper_quantile(combined, alpha)
        self._bootstrap_windows = windows
        self._tail_extrapolated = alpha * windows < 20
        if self._tail_extrapolated:
            notes.append(f"window threshold extrapolated from {windows} bootstrap windows "
                         f"(fitted tail) for a per-batch level of {alpha:.2g}")

    def _fit_cusum(self, pool_bins, pool_entropy, batch, generator) -> None:
        pool, features = pool_bins.shape
        surprise = self._neg_log_p.gather(1, pool_bins.t()).t()          # [pool, F]
        layer_surprise = surprise @ self._layer_sum                       # [pool, L]
        per_sample = torch.cat([layer_surprise, pool_entropy.unsqueeze(1)], dim=1)
        self._score_mean = per_sample.mean(dim=0)
        self._score_std = torch.clamp(per_sample.std(dim=0), min=1e-12)
        combined = ((per_sample - self._score_mean) / self._score_std).sum(dim=1)
        self._score_scale = float(torch.clamp(combined.std(), min=1e-12))
        draws = 20_000
        picks = torch.randint(pool, (draws, batch), generator=generator)
        scores = combined[picks].mean(dim=1) * math.sqrt(batch) / self._score_scale
        # The score's null mean is estimated from |B| samples; a batch-mean error
        # of one standard error would shift every increment by this much, so the
        # threshold is set for that pessimistic offset (a conservative CUSUM).
        allowance = self.config["cusum_allowance"]
        offset = min(math.sqrt(batch / pool), 0.5 * allowance)
        run_length = self._reads_between_alarms / _BUDGET_CUSUM_SIDE
        self.cusum_threshold = max(cusum_threshold(scores + offset - allowance, run_length),
                                   cusum_threshold(-scores + offset - allowance, run_length))
        self.cusum_batch_size = batch
        # The batch test (a Shewhart limit beside the CUSUM): one batch whose
        # score alone is this far out alarms at once. The CUSUM is tuned for
        # small persistent shifts and needs several batches even for a large
        # one; the window test needs a full window after every reset. Two
        # sides, each half the batch test's share, with the same pessimistic
        # offset as the CUSUM.
        side_alpha = 0.5 * _BUDGET_BATCH / self._reads_between_alarms
        self.batch_threshold = max(upper_quantile(scores + offset, side_alpha),
                                   upper_quantile(-scores + offset, side_alpha))

    def _move_to_device(self) -> None:
        device = self.device
        for name in ("lo", "hi", "reference_counts", "_neg_log_p", "_layer_sum", "_layer_mean",
                     "_signal_location", "_signal_scale", "_score_mean", "_score_std"):
            setattr(self, name, getattr(self, name).to(device))
        self._projections = {name: (p.to(device) if p is not None else None) for name, p in self._projections.items()}

    def _make_runtime_state(self) -> None:
        features, bins = self.reference_counts.shape
        self._int_size = features * bins + features
        self._batch_ints = torch.zeros(self._int_size, dtype=torch.int64, device=self.device)
        self._batch_counts = self._batch_ints[: features * bins].view(features, bins)
        self._batch_nonfinite = self._batch_ints[features * bins:]
        # each tap's views of the batch tables and edges, made once
        self._tap_tables = {name: (self._batch_counts[start:stop], self._batch_nonfinite[start:stop],
                                   self.lo[start:stop], self.hi[start:stop])
                            for name, (start, stop) in self._slices.items()}
        window_cls = SlidingWindow if self.config["window_kind"] == "sliding" else ExponentialWindow
        self._window = window_cls(self.config["window"], (self._int_size,), _STATS, self.device)
        # Surprise of each (feature, bin) cell summed per layer: batch counts
        # times this matrix is the batch's reference log-likelihood per layer.
        self._surprise_matrix = (self._neg_log_p.reshape(-1, 1) *
                                 self._layer_sum.repeat_interleave(bins, dim=0)).contiguous()
        self._location_list = self._signal_location.tolist()
        self._scale_list = self._signal_scale.tolist()
        self._score_mean_list = self._score_mean.tolist()
        self._score_std_list = self._score_std.tolist()
        self.cusum = [0.0, 0.0]
        self.batches_seen = 0
        self.batches_served = 0
        self._skip_left = 0
        self._unread_report = None
        self._sync_hooks()
        self.alarms = 0
        # The reference in the window's count dtype (int64 sliding, float64
        # exponential), converted once rather than every batch.
        self._window_reference = self.reference_counts.to(
            torch.int64 if self.config["window_kind"] == "sliding" else torch.float64)
        self._window_divergence: Optional[torch.Tensor] = None
        self._mode = "monitor"
        self._rows_seen = {}

    def _share_rank0_reference(self) -> None:
        import torch.distributed as dist
        state = [self.state_dict() if dist.get_rank(self.process_group) == 0 else None]
        dist.broadcast_object_list(state, src=dist.get_global_rank(self.process_group, 0)
                                   if self.process_group is not dist.group.WORLD else 0,
                                   group=self.process_group)
        self.load_state_dict(state[0])

    # ------------------------------------------------------------- monitoring

    def __call__(self, x: torch.Tensor):
        """Runs the model on ``x``, reads the batch, and returns the model's output."""
        output = self.model(x)
        self.update(output)
        return output

    @property
    def drift_detected(self) -> bool:
        return bool(self.last_report and self.last_report.drift)

    def discard_pending(self) -> None:
        """Forgets what the taps saw since the last ``update``."""
        if self.calibrated:
            self._batch_ints.zero_()
        self._rows_seen = {}

    def update(self, output) -> DriftReport:
        """Reads one batch: the taps have counted its features during the model
        call; ``output`` is that call's output. Returns (and keeps in
        ``last_report``) the decision for this batch."""
        if not self.calibrated:
            raise RuntimeError("selfheal: DriftMonitor.update before calibrate(); calibrate on healthy data first")
        if self._removed:
            raise RuntimeError("selfheal: this DriftMonitor was removed from its model (remove()); it reads nothing")
        if self._skip_left and not self._read_all:
            # a batch read_every passes unread: the taps were not attached
            self._skip_left -= 1
            if not self._skip_left:
                self._sync_hooks()  # the next batch is read
            self.batches_served += 1
            last = self.last_report
            if self._unread_report is None or self._unread_of is not last:
                # one copy per reading, shared by the unread batches after it
                self._unread_report = dataclasses.replace(last or self._empty_report(), read=False)
                self._unread_of = last
            return self._unread_report
        logits = self._logits(output)
        rows = logits.shape[0]
        try:
            self._check_rows(rows)
        except RuntimeError:
            self.discard_pending()
            raise
        if rows == 0 and self.process_group is None:
            self.discard_pending()
            return self._empty_report()
        self._skip_left = self.config["read_every"] - 1
        self.batches_served += 1
        self._sync_hooks()
        # Under a process group an empty batch still joins the all_reduce
        # (the other ranks are in it); the merged batch decides.
        with torch.no_grad():
            report = self._update(logits.to(self.device), rows)
        return report

    def _update(self, logits: torch.Tensor, rows: int) -> DriftReport:
        entropy, confidence = self._confidence(logits)
        finite_rows = torch.isfinite(entropy).sum()
        # Float64 sums: the same total whichever way the rows are split over ranks.
        sums = torch.stack([entropy, confidence]).double().nansum(dim=1)
        stats = torch.cat([sums, torch.stack([(entropy > self.entropy_tail_level).sum(), finite_rows,
                                              rows - finite_rows]).double(), self._accuracy.batch_sums(confidence)])
        samples = rows
        if self.process_group is not None:
            import torch.distributed as dist
            dist.all_reduce(self._batch_ints, group=self.process_group)
            dist.all_reduce(stats, group=self.process_group)
            samples = int(round(float(stats[_STAT_FINITE] + stats[_STAT_NONFINITE])))
            if samples == 0:  # every rank's batch was empty
                self._batch_ints.zero_()
                self._rows_seen = {}
                return self._empty_report()

        self._window.add(self._batch_ints, stats, samples)
        totals, window_stats, window_samples = self._window.totals()
        features, bins = self.reference_counts.shape
        divergence = self._divergence(totals[: features * bins].view(features, bins), self._window_reference)
        self._window_divergence = divergence
        layer_divergence = divergence.double() @ self._layer_mean
        surprise = self._batch_counts.reshape(1, -1).double() @ self._surprise_matrix
        packed = torch.cat([
            layer_divergence, window_stats, stats, surprise.reshape(-1),
            self._batch_nonfinite.max().double().reshape(1),
        ]).tolist()  # the one host read per batch
        self._batch_ints.zero_()
        self._rows_seen = {}
        return self._decide(packed, samples, window_samples)

    def _decide(self, packed: List[float], samples: int, window_samples: float) -> DriftReport:
        layers = len(self.taps)
        names = self._signal_names()
        layer_divergence = packed[:layers]
        window_stats = packed[layers: layers + _STATS]
        batch_stats = packed[layers + _STATS: layers + 2 * _STATS]
        surprise = packed[layers + 2 * _STATS: 2 * layers + 2 * _STATS]
        nonfinite_values = packed[-1]

        raw = _scaled_divergence_values(layer_divergence, window_samples, self.config["window"])
        raw.extend(self._entropy_signals(window_stats[_STAT_ENTROPY], window_stats[_STAT_TAIL],
                                         window_stats[_STAT_FINITE], window_samples))
        z = self._standardise_values(raw)
        score = max(z)
        window_rows = max(window_stats[_STAT_FINITE], 1.0)
        batch_rows = max(batch_stats[_STAT_FINITE], 1.0)

        # CUSUM on the batch's own score (not the window's, so its increments
        # are independent): reference surprise per layer and mean entropy.
        per_signal = [value / samples for value in surprise] + [batch_stats[_STAT_ENTROPY] / batch_rows]
        batch_score = sum((value - mean) / std for value, mean, std
                          in zip(per_signal, self._score_mean_list, self._score_std_list))
        batch_score *= math.sqrt(samples) / self._score_scale
        allowance = self.config["cusum_allowance"]
        self.cusum = [max(0.0, self.cusum[0] + batch_score - allowance),
                      max(0.0, self.cusum[1] - batch_score - allowance)]
        cusum = tuple(self.cusum)

        # Samples with a NaN/Inf: at least the worst feature's count (a bad
        # input usually poisons every feature of its row), and the bad logits.
        nonfinite = int(max(nonfinite_values, batch_stats[_STAT_NONFINITE]))
        # The sliding window decides once full; the exponential one once its
        # effective size (which only approaches `window`) is three quarters of it.
        full = 1.0 if self.config["window_kind"] == "sliding" else 0.75
        warming_up = window_samples < full * self.config["window"]
        reasons = []
        if not warming_up and score > self.window_threshold:
            reasons.append("window")
        if abs(batch_score) > self.batch_threshold:
            reasons.append("batch")
        for side, name in enumerate(("cusum_up", "cusum_down")):
            if self.cusum[side] > self.cusum_threshold:
                reasons.append(name)
                self.cusum[side] = 0.0  # restart, so a persisting shift alarms again
        if nonfinite and nonfinite >= self._nonfinite_limit(samples):
            reasons.append("nonfinite")
        estimates = self._accuracy.estimate(window_stats[_STAT_CONFIDENCE], window_stats[_STAT_ATC],
                                            window_stats[_STAT_FINITE])
        estimated_drop = self._accuracy.drop(estimates, self.config["accuracy_estimator"])
        suppressed = ()
        min_drop = self.config["alarm_min_drop"]
        if min_drop is not None and reasons and not estimated_drop >= min_drop:
            # a benign drift: the data moved, the estimated accuracy did not
            # (a NaN estimate is not evidence of harm); a non-finite surge is
            # harmful by itself
            suppressed = tuple(reason for reason in reasons if reason != "nonfinite")
            reasons = [reason for reason in reasons if reason == "nonfinite"]
        drift = bool(reasons)
        self.batches_seen += 1
        self.alarms += drift
        report = DriftReport(
            batch=self.batches_seen, drift=drift, reasons=tuple(reasons), score=score,
            threshold=self.window_threshold, cusum=cusum, cusum_threshold=self.cusum_threshold,
            signals=dict(zip(names, z)), divergence=dict(zip(self.tap_names, layer_divergence)),
            entropy_mean=window_stats[_STAT_ENTROPY] / window_rows,
            entropy_tail=window_stats[_STAT_TAIL] / window_rows,
            accuracy_estimate=window_stats[_STAT_CONFIDENCE] / window_rows,
            batch_accuracy_estimate=batch_stats[_STAT_CONFIDENCE] / batch_rows,
            samples=samples, nonfinite_samples=nonfinite, window_samples=window_samples, warming_up=warming_up,
            accuracy_estimates=estimates, estimated_drop=estimated_drop, suppressed=suppressed)
        if drift or suppressed:
            report.attribution = self.attribution(report)
        self.last_report = report
        return report

    def _nonfinite_limit(self, samples: int) -> int:
        """Fewest non-finite samples in a batch of ``samples`` that the reference
        rate makes rarer than this test's share of the false-alarm budget."""
        limit = self._nonfinite_limit_cache.get(samples)
        if limit is None:
            alpha = _BUDGET_NONFINITE / self._reads_between_alarms
            low, high = 1, samples + 1
            while low < high:
                middle = (low + high) // 2
                if binomial_upper_tail(middle, samples, self.nonfinite_rate) < alpha:
                    high = middle
                else:
                    low = middle + 1
            limit = low
            self._nonfinite_limit_cache[samples] = limit
        return limit

    def attribution(self, report: Optional[DriftReport] = None, top: int = 5) -> Attribution:
        """Each signal's share of ``report``'s drift score (default: the last
        report) and the most divergent features of every tapped layer in the
        current window (the divergences the last batch's decision used)."""
        report = report or self.last_report
        if report is None:
            raise RuntimeError("selfheal: no batch has been monitored yet")
        positive = {name: max(value, 0.0) for name, value in report.signals.items()}
        total = sum(positive.values())
        shares = {name: (value / total if total > 0 else 0.0) for name, value in positive.items()}
        divergence = self._window_divergence.cpu()
        features = {}
        for name in self.tap_names:
            start, stop = self._slices[name]
            values, index = torch.sort(divergence[start:stop], descending=True)
            features[name] = [(int(i), float(v)) for i, v in zip(index[:top], values[:top])]
        return Attribution(signals=shares, features=features)

    def _empty_report(self) -> DriftReport:
        names = self._signal_names()
        report = DriftReport(
            batch=self.batches_seen, drift=False, reasons=(), score=float("nan"), threshold=self.window_threshold,
            cusum=tuple(self.cusum), cusum_threshold=self.cusum_threshold,
            signals={name: float("nan") for name in names},
            divergence={name: float("nan") for name in self.tap_names}, entropy_mean=float("nan"),
            entropy_tail=float("nan"), accuracy_estimate=float("nan"), batch_accuracy_estimate=float("nan"),
            samples=0, nonfinite_samples=0, window_samples=self._window.totals()[2], warming_up=True)
        return report

    def reset(self) -> None:
        """Empties the window and the CUSUM (e.g. after the model was repaired);
        the reference and thresholds stay."""
        if not self.calibrated:
            return
        self._window.reset()
        self.cusum = [0.0, 0.0]
        self.discard_pending()
        self.last_report = None
        self._skip_left = 0  # the next batch is read
        self._unread_report = None
        self._sync_hooks()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict:
        """Everything needed to take identical decisions: configuration, taps,
        projections, edges, reference counts, null distributions, thresholds,
        window and CUSUM state."""
        if not self.calibrated:
            raise RuntimeError("selfheal: an uncalibrated DriftMonitor has no state to save")
        return {
            "format_version": _FORMAT_VERSION,
            # read_every=1 is left out, so the state loads where the option does not exist
            "config": {k: v for k, v in self.config.items() if self._DEFAULTS_LEFT_OUT.get(k, _UNSET) != v},
            "accuracy_estimator": self._accuracy.state_dict(),
            "taps": self.tap_names,
            "projections": {n: (p.cpu() if p is not None else None) for n, p in self._projections.items()},
            "slices": dict(self._slices), "lo": self.lo.cpu(), "hi": self.hi.cpu(),
            "reference_counts": self.reference_counts.cpu(),
            "temperature": self.temperature, "entropy_tail_level": self.entropy_tail_level,
            "reference_entropy": self.reference_entropy, "reference_confidence": self.reference_confidence,
            "reference_tail": self._reference_tail,
            "signal_location": self._signal_location.cpu(), "signal_scale": self._signal_scale.cpu(),
            "window_threshold": self.window_threshold, "bootstrap_windows": self._bootstrap_windows,
            "tail_extrapolated": self._tail_extrapolated,
            "score_mean": self._score_mean.cpu(), "score_std": self._score_std.cpu(),
            "score_scale": self._score_scale, "cusum_threshold": self.cusum_threshold,
            "batch_threshold": self.batch_threshold,
            "cusum_batch_size": self.cusum_batch_size, "nonfinite_rate": self.nonfinite_rate,
            "window_state": _to_cpu(self._window.state_dict()), "cusum": list(self.cusum),
            "batches_seen": self.batches_seen, "alarms": self.alarms,
            "batches_served": self.batches_served, "skip_left": self._skip_left,
            # the reading that unread batches (read_every) report until the next read
            "last_report": dataclasses.asdict(self.last_report) if self.last_report is not None else None,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restores a saved monitor on the same model and taps. All or
        nothing: the state is checked whole before anything is written, and a
        failure while writing restores the monitor as it was."""
        checked = self.check_state(state)
        saved = dict(self.__dict__)
        try:
            self._load_checked_state(state, checked)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            self._sync_hooks()
            raise

    def check_state(self, state: Dict):
        """Every check of a saved state, before anything is written; returns
        the parsed values ``_load_checked_state`` writes (batch_threshold,
        cusum, skip_left, last_report, accuracy, window_state, window)."""
        if not isinstance(state, dict) or state.get("format_version") != _FORMAT_VERSION:
            raise ValueError("selfheal: not a DriftMonitor state (missing or unknown 'format_version')")
        if list(state["taps"]) != self.tap_names:
            raise ValueError(f"selfheal: state was saved with taps {list(state['taps'])}, "
                             f"this monitor taps {self.tap_names}")
        config = dict(state["config"])
        config["quantile_range"] = tuple(config["quantile_range"])
        config.setdefault("pooling", {})  # states saved before per-tap pooling existed
        for key, value in self._DEFAULTS_LEFT_OUT.items():
            config.setdefault(key, value)
        expected = dict(self.config)
        if self._window_chosen:  # the window a calibration chose, whatever it was
            expected["window"] = config["window"]
        if config != expected:
            differ = sorted(k for k in set(config) | set(expected) if config.get(k) != expected.get(k))
            raise ValueError(f"selfheal: state was saved with a different configuration ({', '.join(differ)})")
        features = int(state["reference_counts"].shape[0])
        bins = self.config["bins"] + 2
        if tuple(state["reference_counts"].shape) != (features, bins) or state["reference_counts"].dtype != torch.int64:
            raise ValueError("selfheal: state has a corrupt 'reference_counts'")
        if (state["reference_counts"] < 0).any():
            raise ValueError("selfheal: state has negative reference counts")
        for key in ("lo", "hi"):
            if tuple(state[key].shape) != (features,) or not torch.isfinite(state[key]).all():
                raise ValueError(f"selfheal: state has a corrupt {key!r}")
        if not (state["hi"] > state["lo"]).all():
            raise ValueError("selfheal: state has bin edges with hi <= lo")
        slices = {n: tuple(int(v) for v in state["slices"][n]) for n in self.tap_names}
        if sum(stop - start for start, stop in slices.values()) != features:
            raise ValueError(f"selfheal: state's tap slices {slices} do not cover its {features} features")
        if self.calibrated:  # the taps' widths are known: a state from another architecture is refused
            for name in self.tap_names:
                ours, theirs = self._slices[name], slices[name]
                if ours[1] - ours[0] != theirs[1] - theirs[0]:
                    raise ValueError(f"selfheal: state's tap {name!r} has {theirs[1] - theirs[0]} features, "
                                     f"this monitor's has {ours[1] - ours[0]}")
                ours, theirs = self._projections.get(name), state["projections"].get(name)
                if (ours is None) != (theirs is None) or (ours is not None and ours.shape != theirs.shape):
                    raise ValueError(f"selfheal: state's tap {name!r} projects "
                                     f"{'no' if theirs is None else tuple(theirs.shape)} features, this "
                                     f"monitor's {'none' if ours is None else tuple(ours.shape)}")
        for key in ("signal_location", "signal_scale", "score_mean", "score_std"):
            if not isinstance(state[key], torch.Tensor) or not torch.isfinite(state[key]).all():
                raise ValueError(f"selfheal: state has a corrupt {key!r} (NaN or Inf)")
        for key in ("temperature", "reference_entropy", "reference_confidence", "window_threshold",
                    "score_scale", "cusum_threshold"):
            if math.isnan(float(state[key])):
                raise ValueError(f"selfheal: state has a corrupt {key!r} (NaN)")
        for name, projection in state["projections"].items():
            if projection is not None and not torch.isfinite(projection).all():
                raise ValueError(f"selfheal: state has a corrupt projection for tap {name!r} (NaN or Inf)")
        # states saved before the accuracy estimators: the mean confidence only
        accuracy = AccuracyEstimator.from_state(state.get("accuracy_estimator", {
            "reference_confidence": state.get("reference_confidence")}))
        window_state = dict(state["window_state"])
        for key in ("ring_stats", "stats"):
            saved = window_state.get(key)
            if isinstance(saved, torch.Tensor) and saved.shape[-1] == _STATS - 1:  # saved before _STAT_ATC
                window_state[key] = torch.cat([saved, torch.zeros_like(saved[..., :1])], dim=-1)
        batch_threshold = state.get("batch_threshold")
        if batch_threshold is not None:
            batch_threshold = float(batch_threshold)
            if not batch_threshold > 0:  # (NaN included)
                raise ValueError(f"selfheal: state has a corrupt 'batch_threshold' ({batch_threshold})")
        cusum = [float(v) for v in state["cusum"]]
        if len(cusum) != 2 or not all(math.isfinite(v) and v >= 0 for v in cusum):
            raise ValueError("selfheal: state has a corrupt 'cusum'")
        skip_left = int(state.get("skip_left", 0))
        if not 0 <= skip_left < self.config["read_every"]:
            raise ValueError(f"selfheal: state has a corrupt 'skip_left' ({skip_left})")
        return {"batch_threshold": batch_threshold, "cusum": cusum, "skip_left": skip_left,
                "last_report": _report_from_state(state.get("last_report")), "accuracy": accuracy,
                "window_state": window_state, "window": config["window"]}

    def _load_checked_state(self, state: Dict, checked: Dict) -> None:
        batch_threshold, cusum = checked["batch_threshold"], checked["cusum"]
        self.config["window"] = checked["window"]
        self.device = next(iter(_devices_of(self.model)), torch.device("cpu"))
        self._projections = {n: (p.clone() if p is not None else None) for n, p in state["projections"].items()}
        self._sketch_plans = {}
        for name, projection in self._projections.items():
            if projection is not None:
                sketch_plan(projection)  # refuses a corrupt projection now, not mid-stream
        self._slices = {n: tuple(v) for n, v in state["slices"].items()}
        widths = [self._slices[n][1] - self._slices[n][0] for n in self.tap_names]
        layer_of_feature = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        self._layer_sum = torch.nn.functional.one_hot(layer_of_feature, len(widths)).double()
        self._layer_mean = self._layer_sum / torch.tensor(widths, dtype=torch.float64)
        self.lo, self.hi = state["lo"].float().clone(), state["hi"].float().clone()
        self.reference_counts = state["reference_counts"].clone()
        smoothed = self.reference_counts.double() + 0.5
        self._neg_log_p = -(smoothed / smoothed.sum(dim=1, keepdim=True)).log()
        self.temperature = float(state["temperature"])
        self.entropy_tail_level = float(state["entropy_tail_level"])
        self.reference_entropy = float(state["reference_entropy"])
        self.reference_confidence = float(state["reference_confidence"])
        self._reference_tail = float(state["reference_tail"])
        self._signal_location = state["signal_location"].clone()
        self._signal_scale = state["signal_scale"].clone()
        self.window_threshold = float(state["window_threshold"])
        self._bootstrap_windows = int(state["bootstrap_windows"])
        self._tail_extrapolated = bool(state["tail_extrapolated"])
        self._score_mean, self._score_std = state["score_mean"].clone(), state["score_std"].clone()
        self._score_scale = float(state["score_scale"])
        self.cusum_threshold = float(state["cusum_threshold"])
        if batch_threshold is None:  # saved before the batch test existed: its limit needs the calibration data
            warnings.warn("selfheal: this DriftMonitor state predates the per-batch test; it stays off "
                          "until calibrate() is run again", RuntimeWarning, stacklevel=2)
        self.batch_threshold = math.inf if batch_threshold is None else batch_threshold
        self.cusum_batch_size = int(state["cusum_batch_size"])
        self.nonfinite_rate = float(state["nonfinite_rate"])
        self._nonfinite_limit_cache = {}
        self._move_to_device()
        self._make_runtime_state()
        self._window.load_state_dict(checked["window_state"])
        self._accuracy = checked["accuracy"]
        self.cusum = cusum
        self.batches_seen, self.alarms = int(state["batches_seen"]), int(state["alarms"])
        self.batches_served = int(state.get("batches_served", self.batches_seen))
        self._skip_left = checked["skip_left"]
        self._sync_hooks()
        self.last_report = checked["last_report"]
        if self.last_report is not None:
            # the window's divergences the last reading used (for attribution())
            totals = self._window.totals()[0]
            features, bins = self.reference_counts.shape
            self._window_divergence = self._divergence(totals[: features * bins].view(features, bins),
                                                       self._window_reference)
        self.calibrated = True


def _report_from_state(saved) -> Optional[DriftReport]:
    if saved is None:
        return None
    try:
        fields = dict(saved)
        attribution = fields.pop("attribution", None)
        report = DriftReport(**fields)
        report.reasons, report.cusum = tuple(report.reasons), tuple(report.cusum)
        if attribution is not None:
            report.attribution = Attribution(
                signals=dict(attribution["signals"]),
                features={name: [tuple(pair) for pair in pairs] for name, pairs in attribution["features"].items()})
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise ValueError(f"selfheal: state has a corrupt 'last_report' ({error})") from None
    return report


def as_logits(output, logits_fn: Optional[Callable] = None) -> torch.Tensor:
    """``[N, C]`` logits from a model's output (through ``logits_fn`` if given;
    the first tensor of a tuple; ``[N]`` and single-logit outputs as a binary
    classifier's two classes). Keeps the autograd graph."""
    logits = logits_fn(output) if logits_fn is not None else output
    if isinstance(logits, (tuple, list)) and logits and isinstance(logits[0], torch.Tensor):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"selfheal: the model output is a {type(logits).__name__}; "
                        "pass logits_fn= to say where the logits are")
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    if logits.dim() != 2:
        raise ValueError(f"selfheal: logits must be [N, C], got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:  # one logit: a binary classifier's positive class
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def _split_batch(batch, labels_in_batches: Optional[bool]):
    if isinstance(batch, torch.Tensor):
        if labels_in_batches:
            raise ValueError("selfheal: labels_in_batches=True but a batch is a bare tensor")
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) > 1 and labels_in_batches is not False else None
        return x, y
    raise TypeError(f"selfheal: calibration batches must be tensors or (x, y) tuples, got {type(batch).__name__}")


def _devices_of(model: nn.Module):
    for parameter in model.parameters():
        yield parameter.device
    for buffer in model.buffers():
        yield buffer.device


def _column_quantile(table: torch.Tensor, q: float) -> torch.Tensor:
    """Per-column quantile (linear interpolation) without ``torch.quantile``'s size limit."""
    ordered, _ = torch.sort(table.double(), dim=0)
    position = q * (ordered.shape[0] - 1)
    below = int(math.floor(position))
    above = min(below + 1, ordered.shape[0] - 1)
    weight = position - below
    return ordered[below] * (1 - weight) + ordered[above] * weight


def _scaled_divergence(divergence, samples: float, window: int):
    """A null divergence shrinks like 1/n: rescaled to a window of ``window``
    samples so windows of any size share one null distribution."""
    return divergence * (samples / window)


def _scaled_divergence_values(divergence: List[float], samples: float, window: int) -> List[float]:
    return [_scaled_divergence(value, samples, window) for value in divergence]


def _to_cpu(state: Dict) -> Dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
