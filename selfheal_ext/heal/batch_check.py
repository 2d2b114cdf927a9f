"""The batch-statistics check: does a batch hold many classes, or is it a
run of one class?

A label-ordered stream (classes arriving in runs) poisons BatchNorm
statistics taken from its batches and drives entropy minimisation towards the
current class. The source model's class mix hints at a run (the label-shift
tracker, ``label_shift.py``); this check decides. It predicts the batch with
every BatchNorm on the batch's own statistics and no other adapter:

* information: ``I = H(mean_i p_i) - mean_i H(p_i)`` over the rows, over
  ``ln C`` (the mutual information between row and predicted class). A run
  re-normalised with its own statistics loses its class signal: ``I`` near 0;
* spread: the log of the rows' variance at the last BatchNorm layer's input,
  over the source variance (rows of one class spread less);
* classes: the entropy of the batch's argmax histogram over ``ln C``.

Calibration measures each on healthy batches and on runs of one predicted
class; a measure is used where its two levels are separated (d', gap), and
the information's threshold moves with the check's recent verdicts. Every
number it uses is a ``HealerConfig`` setting (``check_*``, ``spread_*``,
``classes_*``, ``agnostic_shift``), with its meaning and source there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..adapters import AdapterSet
from .config import HealerConfig
from .tensors import batch_inputs, finite_rows, model_device

def information(sums: torch.Tensor) -> torch.Tensor:
    """What a batch's predictions say about which of its rows is which
    class: the entropy of their mean minus their mean entropy (the mutual
    information between row and predicted class), normalised by ln C.
    Near 0 when every row gets the same prediction (a run of one class
    re-normalised with its own statistics: the class signal is gone)."""
    rows, classes = sums[1], (sums.numel() - 2) // 2
    mean = (sums[2:2 + classes] / rows).clamp_min(1e-12)
    spread = -(mean * mean.log()).sum() / math.log(max(mean.numel(), 2))
    return spread - sums[0] / rows  # (0-d, on the batch's device: no host read)


def class_diversity(sums: torch.Tensor) -> torch.Tensor:
    """How many classes a batch's rows are predicted as: the entropy of
    the histogram of their argmax, normalised by ln C (0-d). Near 0 for a
    run of one class re-normalised with its own statistics (every row
    goes to the same class); a strong corruption that leaves the
    predictions vague (low information) leaves their argmax spread."""
    rows, classes = sums[1], (sums.numel() - 2) // 2
    share = (sums[2 + classes:] / rows).clamp_min(1e-12)
    return -(share * share.log()).sum() / math.log(max(classes, 2))


@dataclass
class CheckReading:
    """What the check measured on the last batch it checked (None: not checked)."""
    information: Optional[float] = None
    spread: Optional[float] = None
    classes: Optional[float] = None
    threshold: Optional[float] = None  # the information threshold used


class BatchCheck:
    """The batch-statistics check of one model and its adapters.

    ``calibrate(batches, classes)`` measures the levels on healthy data;
    ``is_diverse(x)`` is the verdict for one batch (True: many classes,
    False: a run, None: cannot tell), with its measures in ``reading``;
    ``prior`` holds the recent verdicts of the drift episode
    (``new_episode()`` starts one). ``levels`` and ``class_shift`` are the
    calibration; ``state_dict()``/``load_state_dict()`` carry them.

    Args:
        model: the served model (its adapters attached).
        adapters: the model's ``AdapterSet``.
        monitor: the ``DriftMonitor`` whose taps must not see the check's forwards.
        logits: maps a model output to logits.
        merge: sums a tensor over a process group's ranks (identity on one process).
        config: the healer's settings (``batch_diversity`` False switches the
            check off; ``label_shift`` inf too: no run is ever suspected, so no
            check and no class-agnostic marks).
    """

    def __init__(self, model: nn.Module, adapters: AdapterSet, monitor, logits: Callable,
                 merge: Callable[[torch.Tensor], torch.Tensor], config: HealerConfig):
        self._model = model
        self._adapters = adapters
        self._monitor = monitor
        self._logits = logits
        self._merge = merge
        self.config = config
        self.levels: Optional[Dict[str, float]] = None
        self.class_shift: Optional[List[float]] = None
        self.prior = 1.0
        self.reading = CheckReading()

    def calibrate(self, batches, classes: int) -> None:
        """Levels of the three measures and each statistics layer's class
        shift, from healthy ``batches`` (inputs or ``(x, y)`` pairs)."""
        self.levels = self._calibrate_levels(batches)
        self.class_shift = self._calibrate_class_shift(batches, classes)
        self._mark_class_agnostic()

    def new_episode(self) -> None:
        """A drift episode starts: the recent verdicts are reset to "many classes"."""
        self.prior = 1.0

    def clear_reading(self) -> None:
        self.reading = CheckReading()

    def rows_needed(self) -> Optional[int]:
        """Fewest rows a batch needs for the batch-statistics check (the norm
        adapters' own minimum); None when there is nothing to check with."""
        norms = self._adapters.norm_adapters()
        if not norms or not self.config.batch_diversity or math.isinf(self.config.label_shift):
            return None
        return max(8, max(a.min_batch for a in norms))

    def statistics_sums(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
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
        adapters = self._adapters
        norms = adapters.norm_adapters()
        was = (adapters.active, adapters.statistics_only, [(a.robust, a.update_running, a.prior) for a in norms])
        rows = x[finite_rows(x)]
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
            with torch.no_grad(), self._monitor.paused():
                log_probs = torch.log_softmax(self._logits(self._model(rows)).float(), dim=1)
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
        return [self._model.get_submodule(p.target) for p in self._adapters.placements if p.kind == "norm"]

    def _last_norm_module(self) -> nn.Module:
        """The BatchNorm layer of the last statistics adapter."""
        return self._norm_modules()[-1]

    def _calibration_inputs(self, batches) -> List[torch.Tensor]:
        """The finite rows of the first 32 calibration batches, on the
        model's device; empty batches dropped."""
        device = model_device(self._model)
        inputs = [x[finite_rows(x)] for x in (batch_inputs(b).to(device) for b in batches[:32])]
        return [x for x in inputs if x.shape[0] > 0]

    def _calibrate_levels(self, batches) -> Optional[Dict[str, float]]:
        """The information in batch-statistics predictions (``_information``)
        on healthy batches as served (many classes) and on batches of one
        source-predicted class (a run). A drift lowers the first level (a
        corrupted batch of many classes gives vaguer predictions) while the
        second stays where it was (its class signal is gone whatever the
        drift), so the threshold sits ``check_split`` of the way up from
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
        of the spread are at least ``spread_separation`` standard deviations
        apart, a batch whose spread is above the half-way point also counts as
        many classes (on an MLP the runs' spread overlaps the healthy one's:
        off), provided healthy batches spread at least twice as much as
        runs (``spread_min_gap``: a drift rescales the spread by factors).

        And the predicted classes' diversity (``_class_diversity``) on the
        same batches, used where its levels are ``classes_separation``
        standard deviations and ``classes_min_gap`` apart
        (``classes_split``)."""
        minimum = self.rows_needed()
        if minimum is None:
            return None
        device = model_device(self._model)
        inputs = self._calibration_inputs(batches)
        size = max((x.shape[0] for x in inputs), default=0)
        # sum and count of the information of healthy batches, of runs; the
        # batch size; sums and sums of squares of the spread of healthy
        # batches, of runs; and of the predicted classes' diversity (merged
        # over ranks)
        levels = torch.zeros(14, dtype=torch.float64, device=device)

        def measure(x, slot):
            if x.shape[0] >= minimum:
                sums, spread = self.statistics_sums(x)
                if float(sums[1]) >= minimum:  # (rows whose predictions are finite)
                    levels[slot] += information(sums)
                    levels[slot + 1] += 1.0
                    levels[6 + slot] += spread
                    levels[7 + slot] += spread * spread
                    diversity = class_diversity(sums)
                    levels[10 + slot] += diversity
                    levels[11 + slot] += diversity * diversity
        try:
            for x in inputs:
                measure(x, 0)
            if inputs and all(x.shape[1:] == inputs[0].shape[1:] for x in inputs):
                pooled = torch.cat(inputs)
                with torch.no_grad(), self._monitor.paused():
                    self._adapters.active = False
                    predicted = torch.cat([self._logits(self._model(chunk)).argmax(dim=1)
                                           for chunk in pooled.split(max(size, 1))])
                for label in predicted.unique():
                    members = pooled[predicted == label]
                    for chunk in members.split(size)[:4]:
                        measure(chunk, 2)
        finally:
            self._adapters.active = False  # (the check itself restores every other flag)
        levels[4:6] = torch.tensor([float(size), 1.0], dtype=torch.float64, device=device)
        levels = self._merge(levels).tolist()  # every rank gets the same levels
        if levels[1] == 0 or levels[3] == 0:
            return None
        diverse, run = levels[0] / levels[1], levels[2] / levels[3]
        config = self.config
        if diverse - run < 0.05:
            return None
        result = {"measure": "information", "diverse": diverse, "run": run,
                  "threshold": run + config.check_split * (diverse - run), "rows": levels[4] / levels[5],
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
            if separation >= config.spread_separation and spread_diverse - spread_run >= config.spread_min_gap:
                result["spread_threshold"] = spread_run + config.spread_split * (spread_diverse - spread_run)
        if levels[1] >= 2 and levels[3] >= 2:
            classes_diverse, classes_run, separation = separated(10)
            result.update(classes_diverse=classes_diverse, classes_run=classes_run, classes_separation=separation)
            if separation >= config.classes_separation and classes_diverse - classes_run >= config.classes_min_gap:
                result["classes_threshold"] = classes_run + config.classes_split * (classes_diverse - classes_run)
        return result

    def _calibrate_class_shift(self, batches, classes: int) -> Optional[List[float]]:
        """How far one class moves each statistics layer's statistics
        (``agnostic_shift``), one value per statistics adapter: the source
        model forwards the calibration rows (adapters off), each row's
        first and second moments per channel at the layer's input (over
        positions, for a feature map) are pooled by the row's predicted
        class, and each class of at least the statistics adapters' minimum
        batch is compared with all rows. Merged over ranks. None without
        statistics adapters, with the label-shift guard off (no robust
        mode), or without a class of that many rows."""
        norms = self._adapters.norm_adapters()
        if not norms or math.isinf(self.config.label_shift):
            return None
        device = model_device(self._model)
        inputs = self._calibration_inputs(batches)
        modules = self._norm_modules()
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
        was_active = self._adapters.active
        handles = [module.register_forward_pre_hook(capture(i)) for i, module in enumerate(modules)]
        try:
            with torch.no_grad(), self._monitor.paused():
                self._adapters.active = False
                for x in inputs:
                    moments[:] = [None] * len(modules)
                    predicted = self._logits(self._model(x)).argmax(dim=1)
                    for index, rows in enumerate(moments):
                        if rows is None or rows.shape != (predicted.shape[0], widths[index]):
                            continue  # (a layer not reached, or reached by other rows)
                        kept = torch.isfinite(rows).all(dim=1)
                        sums[:, offsets[index]: offsets[index] + widths[index]].index_add_(
                            0, predicted[kept], rows[kept])
        finally:
            for handle in handles:
                handle.remove()
            self._adapters.active = was_active
        sums = self._merge(sums)
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
        ``agnostic_shift``: robust mode leaves them on batch statistics."""
        shifts = self.class_shift or []
        for index, adapter in enumerate(self._adapters.norm_adapters()):
            adapter.class_agnostic = index < len(shifts) and shifts[index] < self.config.agnostic_shift

    def is_diverse(self, x: torch.Tensor, onset: bool = False) -> Optional[bool]:
        """The batch-statistics check: True when ``x``'s predictions with its
        own statistics tell its rows apart (information above the threshold
        of ``threshold()``: the calibrated one, moved by the
        check's recent verdicts; or, where calibration found it telling, the rows' spread
        at the last BatchNorm layer above its threshold; or, where calibration
        found it telling, the predicted classes' diversity above its threshold
        with the information at least at the lowest swayed split:
        ``classes_split``), False when not (a
        run of classes), None when it cannot tell (no check, too few rows).
        Under a process group each rank measures its own rows, as at
        calibration, and the ranks decide together on the means of their
        measures."""
        minimum = self.rows_needed()
        if self.levels is None or minimum is None:
            return None
        local = torch.zeros(5, dtype=torch.float64, device=model_device(self._model))
        if x.dim() and x.shape[0] >= minimum:
            sums, spread = self.statistics_sums(x)
            valid = sums[1] >= minimum  # (rows whose predictions are finite)
            spread_valid = valid & torch.isfinite(spread)
            local = torch.stack([torch.where(valid, information(sums), 0.0), valid.double(),
                                 torch.where(spread_valid, spread, 0.0), spread_valid.double(),
                                 torch.where(valid, class_diversity(sums), 0.0)])
        merged = self._merge(local).tolist()  # (the check's one host read)
        if merged[1] == 0:
            return None
        levels, reading = self.levels, self.reading
        reading.information = merged[0] / merged[1]
        reading.spread = merged[2] / merged[3] if merged[3] else None
        reading.classes = merged[4] / merged[1]
        spread_threshold, classes_threshold = levels.get("spread_threshold"), levels.get("classes_threshold")
        reading.threshold = self.threshold(onset)
        config = self.config
        floor = levels["run"] + (config.check_split - 0.5 * config.check_sway) * (levels["diverse"] - levels["run"])
        spread_says = spread_threshold is not None and reading.spread is not None and \
            reading.spread > spread_threshold
        classes_say = classes_threshold is not None and reading.classes > classes_threshold and \
            reading.information > floor
        diverse = reading.information > reading.threshold or spread_says or classes_say
        self.prior = (1 - config.check_memory) * self.prior + config.check_memory * float(diverse)
        return diverse

    def threshold(self, onset: bool = False) -> float:
        """The information above which the check calls a batch "many
        classes": ``check_split`` of the way up from the runs' calibrated
        level to the healthy batches', moved by the check's recent verdicts
        in this drift episode (``prior``: 1 after a row of "many
        classes", 0 after a row of runs) by up to ``check_sway / 2`` either
        way. Runs of classes persist over batches, and so does an i.i.d.
        drifted stream, while one batch's information scatters around its
        level: the verdicts before it are a prior for this one. The check
        of the batch that activated the adapters (``onset``: no verdicts
        yet, and a run that passes is served worse than the source served
        it) uses the calibrated threshold; its verdict then counts as any
        other's from the episode's start at "many classes"."""
        levels = self.levels
        if onset:
            return levels["threshold"]
        return levels["threshold"] + self.config.check_sway * (0.5 - self.prior) * (levels["diverse"] - levels["run"])

    def state_dict(self) -> Dict[str, object]:
        return {"diversity": None if self.levels is None else dict(self.levels),
                "class_shift": None if self.class_shift is None else list(self.class_shift),
                "check_prior": self.prior}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Loads what ``state_dict()`` gave (keys absent from older states:
        no levels, no marks, prior 1). Everything is checked before anything
        is written: a refused state leaves the check as it was."""
        self.load_checked(self.checked_state(state))

    def load_checked(self, checked) -> None:
        """Applies what ``checked_state`` returned."""
        self.levels, self.class_shift, self.prior = checked
        self._mark_class_agnostic()

    def checked_state(self, state: Dict[str, object]):
        """``(levels, class_shift, prior)`` from ``state``, validated; raises
        ValueError on a malformed entry and writes nothing."""
        class_shift = state.get("class_shift")
        if class_shift is not None:
            layers = len(self._adapters.norm_adapters())
            if not isinstance(class_shift, (list, tuple)) or len(class_shift) != layers or \
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in class_shift):
                raise ValueError(f"selfheal: the state's class_shift must hold one number per statistics "
                                 f"adapter ({layers}), got {class_shift!r}")
            class_shift = [float(v) for v in class_shift]
        # (levels of the older entropy measure cannot be converted: recalibrate)
        levels = state.get("diversity")
        if levels is not None and levels.get("measure") != "information":
            warnings.warn("selfheal: this state's batch-statistics check levels come from an older version "
                          "(entropy, not information); the check is off until calibrate() runs again",
                          RuntimeWarning, stacklevel=4)
            levels = None
        if levels is not None:
            levels = {k: (v if k == "measure" or v is None else float(v)) for k, v in levels.items()}
        return levels, class_shift, float(state.get("check_prior", 1.0))
