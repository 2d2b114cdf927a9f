"""FeatureMonitor: drift detection on arrays of features or embeddings, no model needed.

A table of input features, the embeddings of a model served elsewhere, a
feature store's columns: ``FeatureMonitor`` watches them with the machinery of
``DriftMonitor`` — the same reference histograms, bootstrap-calibrated window
threshold, CUSUM, batch test, non-finite test and attribution — by running a
``DriftMonitor`` over an internal module whose taps are the columns:

* ``per_column=True`` (default up to 64 columns): each column is its own
  signal, so one drifting column among many stands out (the window test takes
  the largest standardised signal; its threshold is the bootstrap distribution
  of that maximum, which pays for the multiplicity);
* ``per_column=False`` (default above 64 columns, e.g. embeddings): one signal,
  the mean divergence over the columns; attribution still ranks each column.

Columns are named (``feature_names=`` or a DataFrame's columns) and
attribution reports names. Categorical columns (``categorical=[names or
indices]``, and pandas ``category``/``object``/``string``/``bool`` columns) are
counted per category: the ``bins`` most frequent reference categories get a
bin each, rarer reference categories share the underflow bin ("other"), and a
category never seen in the reference falls in the overflow bin ("unseen").
Missing values (None, NaN) are counted apart like any non-finite value.

There is no model, so there are no logits: the entropy signals of
``DriftMonitor`` are constant (and standardise to 0), and the accuracy fields
of the reports are NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .monitor import Attribution, CalibrationReport, DriftMonitor, DriftReport

_FORMAT_VERSION = 1
_PER_COLUMN_UP_TO = 64
_NUMERIC_KINDS = "biuf"  # numpy dtype kinds read as numbers


@dataclass
class FeatureAttribution(Attribution):
    """``Attribution`` by name: ``signals`` keyed by column (or ``"all
    columns"``), ``features`` maps each signal to its most divergent
    ``(column name, divergence)`` pairs, and ``columns`` ranks the most
    divergent columns of the whole table."""

    columns: List[Tuple[str, float]] = dataclasses.field(default_factory=list)


class _Columns(nn.Module):
    """What the internal ``DriftMonitor`` watches: one ``nn.Identity`` tap per
    signal group, each called with its columns; the output is a constant logit
    (no model, so nothing to read there)."""

    def __init__(self, groups: Sequence[Tuple[int, int]]):
        super().__init__()
        self.groups = nn.ModuleList(nn.Identity() for _ in groups)
        self.spans = [tuple(span) for span in groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module, (start, stop) in zip(self.groups, self.spans):
            module(x[:, start:stop].contiguous())
        return x.new_zeros(x.shape[0], 1)


class FeatureMonitor:
    """Watches a stream of feature tables (torch tensors, numpy arrays, pandas
    DataFrames) for drift, batch by batch.

    Args:
        feature_names: a name per column (default: a DataFrame's columns, else
            ``f0, f1, ...``).
        categorical: columns (names or indices) holding categories rather
            than numbers; pandas category/object/string/bool columns are
            categorical without being listed.
        per_column: one signal per column (``True``) or one for the whole
            table (``False``); default ``True`` up to 64 columns.
        bins, window, window_kind, false_alarm_every, divergence,
        quantile_range, cusum_allowance, bootstrap, seed,
        max_calibration_samples: as for ``DriftMonitor``.

    Example::

        monitor = FeatureMonitor(categorical=["country"], window=256, false_alarm_every=1000)
        monitor.calibrate(reference_frame)            # a DataFrame, array or tensor, or batches of them
        for batch in stream:
            monitor.update(batch)
            if monitor.drift_detected:
                print(monitor.last_report.attribution.columns[:3])
    """

    def __init__(self, feature_names: Optional[Sequence[str]] = None,
                 categorical: Optional[Sequence[Union[str, int]]] = None, *, per_column: Optional[bool] = None,
                 bins: int = 16, window: int = 512, window_kind: str = "sliding",
                 false_alarm_every: float = 10_000, divergence: str = "js",
                 quantile_range: Tuple[float, float] = (0.005, 0.995), cusum_allowance: float = 0.5,
                 bootstrap: Optional[int] = None, seed: int = 0, max_calibration_samples: int = 65_536):
        if feature_names is not None:
            feature_names = [str(name) for name in feature_names]
            _check_unique(feature_names, "feature_names")
        self._given_names = feature_names
        self._given_categorical = list(categorical or [])
        for column in self._given_categorical:
            if isinstance(column, bool) or not isinstance(column, (str, int)):
                raise TypeError(f"selfheal: categorical holds column names or indices, got {column!r}")
        if per_column is not None and not isinstance(per_column, bool):
            raise TypeError(f"selfheal: per_column must be True, False or None, got {per_column!r}")
        self.options = {
            "bins": int(bins), "window": int(window), "window_kind": window_kind,
            "false_alarm_every": float(false_alarm_every), "divergence": divergence,
            "quantile_range": (float(quantile_range[0]), float(quantile_range[1])),
            "cusum_allowance": float(cusum_allowance), "bootstrap": bootstrap, "seed": int(seed),
            "max_calibration_samples": int(max_calibration_samples)}
        self._per_column_option = per_column
        # DriftMonitor checks the options now, not at calibrate
        DriftMonitor(_Columns([(0, 1)]), taps=["groups.0"], **self.options)
        self.feature_names: Optional[List[str]] = None
        self.categories: Dict[int, List] = {}  # column index -> reference categories, most frequent first
        self.per_column: Optional[bool] = None
        self.monitor: Optional[DriftMonitor] = None
        self.last_report: Optional[DriftReport] = None

    # ----------------------------------------------------------- calibration

    @property
    def calibrated(self) -> bool:
        return self.monitor is not None and self.monitor.calibrated

    @property
    def calibration(self) -> Optional[CalibrationReport]:
        return self.monitor.calibration if self.monitor is not None else None

    def calibrate(self, data, *, batch_size: int = 64) -> CalibrationReport:
        """Fixes the healthy reference from ``data`` — one table (split into
        batches of ``batch_size`` rows) or an iterable of tables — and sets
        every threshold. Needs at least ``4 * window`` rows."""
        tables = _batches_of(data, batch_size)
        if not tables:
            raise ValueError("selfheal: FeatureMonitor.calibrate got no data")
        names, categorical = self._columns_of(tables[0])
        limit = self.options["max_calibration_samples"]
        kept, rows = [], 0
        for table in tables:
            kept.append(table)
            rows += _rows(table)
            if rows >= limit:
                break
        for table in kept[1:]:
            _check_columns(table, names, len(names))
        categories = {index: _reference_categories(
            [_column_values(table, index, names) for table in kept]) for index in sorted(categorical)}
        per_column = self._per_column_option if self._per_column_option is not None \
            else len(names) <= _PER_COLUMN_UP_TO
        monitor = self._make_monitor(len(names), per_column, categories)
        encoded = [_encode(table, names, categories, self.options["bins"]) for table in kept]
        report = monitor.calibrate(encoded, batch_size=int(sorted(len(t) for t in encoded)[len(encoded) // 2]))
        self.feature_names, self.categories, self.per_column, self.monitor = names, categories, per_column, monitor
        self.last_report = None
        groups = [(i, i + 1) for i in range(len(names))] if per_column else [(0, len(names))]
        notes = [note for note in report.notes if not note.startswith("no labels")]
        notes.append("no model: the entropy signals are constant and the accuracy fields NaN")
        monitor.calibration = dataclasses.replace(
            report, notes=notes,
            features={self._signal_name(i): stop - start for i, (start, stop) in enumerate(groups)})
        return monitor.calibration

    def _columns_of(self, table) -> Tuple[List[str], set]:
        """Column names and the indices of categorical columns, from the
        options and the first calibration table."""
        width = _width(table)
        frame_names = _frame_columns(table)
        if self._given_names is not None:
            names = list(self._given_names)
            if len(names) != width:
                raise ValueError(f"selfheal: feature_names has {len(names)} names, the data has {width} columns")
            if frame_names is not None and frame_names != names:
                raise ValueError(f"selfheal: feature_names {names} differ from the DataFrame's columns {frame_names}")
        else:
            names = frame_names if frame_names is not None else [f"f{i}" for i in range(width)]
        _check_unique(names, "column names")
        categorical = set(_frame_categorical(table))
        for column in self._given_categorical:
            if isinstance(column, str):
                if column not in names:
                    raise ValueError(f"selfheal: categorical column {column!r} is not a column ({names[:10]}...)")
                categorical.add(names.index(column))
            else:
                if not -width <= column < width:
                    raise ValueError(f"selfheal: categorical column index {column} is out of range for "
                                     f"{width} columns")
                categorical.add(column % width)
        return names, categorical

    def _make_monitor(self, width: int, per_column: bool, categories: Dict[int, List]) -> DriftMonitor:
        groups = [(i, i + 1) for i in range(width)] if per_column else [(0, width)]
        model = _Columns(groups)
        monitor = DriftMonitor(model, taps=[f"groups.{i}" for i in range(len(groups))],
                               max_features=max(stop - start for start, stop in groups), **self.options)
        fixed = torch.zeros(width, dtype=torch.bool)
        fixed[list(categories)] = True
        bins = self.options["bins"]
        # category code k (0 <= k < bins) lands in regular bin k
        monitor._fixed_edges = (fixed, torch.full((width,), -0.5, dtype=torch.float64),
                                torch.full((width,), bins - 0.5, dtype=torch.float64))
        return monitor

    # ------------------------------------------------------------- monitoring

    def update(self, batch) -> DriftReport:
        """Reads one batch (a table with the calibrated columns) and returns
        (and keeps in ``last_report``) the decision for it."""
        if not self.calibrated:
            raise RuntimeError("selfheal: FeatureMonitor.update before calibrate(); calibrate on healthy data first")
        _check_columns(batch, self.feature_names, len(self.feature_names))
        x = _encode(batch, self.feature_names, self.categories, self.options["bins"])
        report = self.monitor.update(self.monitor.model(x))
        self.last_report = self._named(report)
        return self.last_report

    __call__ = update

    @property
    def drift_detected(self) -> bool:
        """Whether the last batch given to ``update`` raised an alarm."""
        return bool(self.last_report and self.last_report.drift)

    def reset(self) -> None:
        """Empties the window and the CUSUM; the reference and thresholds stay."""
        if self.monitor is not None:
            self.monitor.reset()
        self.last_report = None

    def _signal_name(self, group: int) -> str:
        return self.feature_names[group] if self.per_column else "all columns"

    def _named(self, report: DriftReport) -> DriftReport:
        groups = len(self.monitor.taps)
        values = list(report.signals.values())
        nan = float("nan")
        attribution = self.attribution() if report.attribution is not None else None
        return dataclasses.replace(
            report, signals={self._signal_name(i): values[i] for i in range(groups)},
            divergence={self._signal_name(i): value for i, value in enumerate(report.divergence.values())},
            entropy_mean=nan, entropy_tail=nan, accuracy_estimate=nan, batch_accuracy_estimate=nan,
            accuracy_estimates=None, estimated_drop=nan, attribution=attribution)

    def attribution(self, top: int = 5) -> FeatureAttribution:
        """The columns that diverge most from the reference in the current
        window, by name, and each signal's share of the last score."""
        if self.monitor is None or self.monitor.last_report is None or self.monitor._window_divergence is None:
            raise RuntimeError("selfheal: no batch has been monitored yet")
        divergence = self.monitor._window_divergence.double().cpu()
        values, index = torch.sort(divergence, descending=True)
        ranked = [(self.feature_names[int(i)], float(v)) for i, v in zip(index, values)]
        signals = list(self.monitor.last_report.signals.items())[: len(self.monitor.taps)]
        positive = [max(value, 0.0) for _, value in signals]
        total = sum(positive)
        shares = {self._signal_name(i): (value / total if total > 0 else 0.0) for i, value in enumerate(positive)}
        if self.per_column:
            features = {name: [(name, value)] for name, value in ranked[:top]}
        else:
            features = {"all columns": ranked[:top]}
        return FeatureAttribution(signals=shares, features=features, columns=ranked[:top])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict:
        """Options, column names, categories and the internal monitor's state."""
        if not self.calibrated:
            raise RuntimeError("selfheal: an uncalibrated FeatureMonitor has no state to save")
        return {"format_version": _FORMAT_VERSION, "kind": "FeatureMonitor", "options": dict(self.options),
                "feature_names": list(self.feature_names), "per_column": self.per_column,
                "categories": {int(k): list(v) for k, v in self.categories.items()},
                "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        """Restores a saved monitor; everything is checked before anything is
        replaced, so a refused state leaves this monitor as it was."""
        if not isinstance(state, dict) or state.get("kind") != "FeatureMonitor" \
                or state.get("format_version") != _FORMAT_VERSION:
            raise ValueError("selfheal: not a FeatureMonitor state (missing or unknown 'kind'/'format_version')")
        options = dict(state.get("options") or {})
        if "quantile_range" in options:
            options["quantile_range"] = tuple(options["quantile_range"])
        if options != self.options:
            differ = sorted(k for k in set(options) | set(self.options) if options.get(k) != self.options.get(k))
            raise ValueError(f"selfheal: state was saved with different options ({', '.join(differ)})")
        names = state.get("feature_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError("selfheal: state has a corrupt 'feature_names' (a non-empty list of strings expected)")
        _check_unique(names, "the state's feature_names")
        if self._given_names is not None and names != self._given_names:
            raise ValueError(f"selfheal: state has columns {names}, this monitor was given {self._given_names}")
        per_column = state.get("per_column")
        if not isinstance(per_column, bool):
            raise ValueError(f"selfheal: state has a corrupt 'per_column' ({per_column!r})")
        categories = state.get("categories")
        if not isinstance(categories, dict):
            raise ValueError("selfheal: state has a corrupt 'categories' (a dict expected)")
        checked = {}
        for index, values in categories.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(names) \
                    or not isinstance(values, list) or not values:
                raise ValueError(f"selfheal: state has a corrupt 'categories' entry for column {index!r}")
            try:
                if len(set(values)) != len(values):
                    raise ValueError("repeated categories")
            except (TypeError, ValueError) as error:
                raise ValueError(f"selfheal: state has corrupt categories for column {names[index]!r} "
                                 f"({error})") from None
            checked[index] = list(values)
        monitor = self._make_monitor(len(names), per_column, checked)
        monitor.load_state_dict(state.get("monitor"))
        if monitor.lo.numel() != len(names):
            raise ValueError(f"selfheal: state's monitor watches {monitor.lo.numel()} columns, its feature_names "
                             f"name {len(names)}")
        self.feature_names, self.categories, self.per_column, self.monitor = names, checked, per_column, monitor
        self.last_report = self._named(monitor.last_report) if monitor.last_report is not None else None


# ------------------------------------------------------------------ tables


def _is_frame(table) -> bool:
    return type(table).__name__ == "DataFrame" and hasattr(table, "columns") and hasattr(table, "dtypes")


def _is_numpy(table) -> bool:
    return type(table).__module__ == "numpy" and hasattr(table, "dtype")


def _batches_of(data, batch_size: int) -> List:
    if isinstance(data, torch.Tensor) or _is_numpy(data) or _is_frame(data):
        if batch_size < 1:
            raise ValueError(f"selfheal: batch_size must be >= 1, got {batch_size}")
        rows = _rows(data)
        return [_slice_rows(data, start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]
    if isinstance(data, Iterable):
        return list(data)
    raise TypeError(f"selfheal: FeatureMonitor reads tensors, numpy arrays or DataFrames, got {type(data).__name__}")


def _slice_rows(table, start: int, stop: int):
    return table.iloc[start:stop] if _is_frame(table) else table[start:stop]


def _rows(table) -> int:
    return len(table)


def _width(table) -> int:
    if _is_frame(table):
        return len(table.columns)
    if isinstance(table, torch.Tensor) or _is_numpy(table):
        if table.ndim != 2:
            raise ValueError(f"selfheal: a feature table must be 2-D [rows, columns], got shape {tuple(table.shape)}")
        return int(table.shape[1])
    raise TypeError(f"selfheal: FeatureMonitor reads tensors, numpy arrays or DataFrames, got {type(table).__name__}")


def _frame_columns(table) -> Optional[List[str]]:
    return [str(column) for column in table.columns] if _is_frame(table) else None


def _frame_categorical(table) -> List[int]:
    if not _is_frame(table):
        return []
    return [i for i, dtype in enumerate(table.dtypes) if getattr(dtype, "kind", "O") not in _NUMERIC_KINDS
            or str(dtype) in ("bool", "boolean")]


def _check_columns(table, names: List[str], width: int) -> None:
    actual = _width(table)
    if actual != width:
        raise ValueError(f"selfheal: the batch has {actual} columns, the monitor was calibrated with {width}")
    frame_names = _frame_columns(table)
    if frame_names is not None and frame_names != names:
        raise ValueError(f"selfheal: the DataFrame's columns {frame_names} differ from the calibrated {names}")


def _check_unique(names: List[str], what: str) -> None:
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"selfheal: {what} repeat {repeated}")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ in (
        "NAType", "NaTType")


def _column_values(table, index: int, names: List[str]) -> list:
    if _is_frame(table):
        return table.iloc[:, index].tolist()
    return table[:, index].tolist()


def _reference_categories(columns: List[list]) -> List:
    """The categories of a reference column, most frequent first (ties by
    their text, so the order does not depend on the data's order)."""
    counts = Counter(value for values in columns for value in values if not _is_missing(value))
    if not counts:
        raise ValueError("selfheal: a categorical column has no value in the reference (all missing)")
    return [value for value, _ in sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))]


def _category_codes(values: list, categories: List, bins: int) -> torch.Tensor:
    """Code of each value: ``k`` for the ``k``-th reference category (``k <
    bins``), -1 for rarer reference categories (the underflow bin), ``bins``
    for a category not in the reference (the overflow bin), NaN if missing."""
    lookup = {value: (k if k < bins else -1) for k, value in enumerate(categories)}
    return torch.tensor([math.nan if _is_missing(v) else lookup.get(v, bins) for v in values], dtype=torch.float32)


def _numeric(table, index: Optional[int] = None) -> torch.Tensor:
    """The table (or one column) as float32, with a clear error for text."""
    if isinstance(table, torch.Tensor):
        values = table if index is None else table[:, index]
        return values.detach().float().cpu()
    try:
        if _is_frame(table):
            array = (table if index is None else table.iloc[:, index]).to_numpy(dtype="float64", na_value=math.nan)
        else:
            array = (table if index is None else table[:, index]).astype("float64")
    except (TypeError, ValueError) as error:
        raise ValueError(f"selfheal: a column that is not categorical holds non-numbers ({error}); "
                         "list it in categorical=") from None
    return torch.tensor(array, dtype=torch.float32)


def _encode(table, names: List[str], categories: Dict[int, List], bins: int) -> torch.Tensor:
    """``[rows, columns]`` float32: numbers as they are, categories as codes."""
    width = len(names)
    if not categories and (isinstance(table, torch.Tensor) or (_is_numpy(table) and table.dtype.kind in "biuf")
                           or (_is_frame(table) and not _frame_categorical(table))):
        return _numeric(table).reshape(-1, width)
    columns = []
    for index in range(width):
        if index in categories:
            columns.append(_category_codes(_column_values(table, index, names), categories[index], bins))
        else:
            try:
                columns.append(_numeric(table, index))
            except ValueError as error:
                raise ValueError(f"selfheal: column {names[index]!r}: {error}") from None
    return torch.stack(columns, dim=1)
