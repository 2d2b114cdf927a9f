"""``selfheal report AUDIT_DB``: one self-contained HTML page from an audit
log — accuracy per segment (measured where labels were given, else estimated
and marked so) or per hour, each alarm's reason in words, the drift score on a
log axis against its threshold over wall-clock time, a heatmap of the most
drifting layers by name, entropy and estimated accuracy (with a caveat when no
labels were given), adaptation steps, rollbacks, guard trips, rule violations
and decisions — with static PNG plots (matplotlib) embedded as data URIs.

The page needs no network and no script: it opens from a file anywhere.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from .governance import AuditLog, AuditRecord

_MARKERS = {  # kind: (label, colour, marker)
    "rollback": ("rollback", "#d62728", "v"),
    "guard": ("guard trip", "#ff7f0e", "x"),
    "rule_violation": ("rule violation", "#9467bd", "D"),
    "bias": ("bias stop", "#8c564b", "s"),
    "policy": ("policy limit", "#7f7f7f", "P"),
    "approve": ("approved", "#2ca02c", "^"),
    "reject": ("rejected", "#e377c2", "X"),
    "proposal": ("proposal", "#17becf", "o"),
    "activate": ("activated", "#1f77b4", ">"),
    "release": ("released", "#1f77b4", "<"),
}
_QUIET = ("monitor", "step", "snapshot", "skip", "segment")


_REASONS = {
    "window": "the recent window's distribution moved away from the reference (window test)",
    "batch": "a single batch far from the reference (batch test)",
    "cusum_up": "a small persistent shift added up (CUSUM, upward)",
    "cusum_down": "a small persistent shift added up (CUSUM, downward)",
    "nonfinite": "a surge of NaN/Inf values",
}
_SCORE_FLOOR = 0.1  # the log-scale score axis draws lower scores (and negative ones) at this floor
_HEATMAP_ROWS = 12


def _when(record: AuditRecord) -> str:
    return record.iso_time[:19].replace("T", " ")


def _signal_words(name: str) -> str:
    if name == "entropy_mean":
        return "the mean prediction entropy"
    if name == "entropy_tail":
        return "the share of uncertain (high-entropy) predictions"
    return f"layer '{name}'"


def alarm_words(payload: Dict) -> str:
    """An alarm's reason as a sentence: which tests fired, which signal moved
    most, and the estimated accuracy drop when the record has one."""
    reasons = [_REASONS.get(str(reason), str(reason)) for reason in payload.get("reasons") or []]
    signals = payload.get("signals") or {}
    top = payload.get("top_signal")
    finite = {name: _number(value) for name, value in signals.items() if _number(value) is not None}
    if finite:
        top = max(finite, key=finite.get)
    text = "; ".join(reasons) if reasons else "drift"
    if top:
        text += f"; largest change in {_signal_words(str(top))}"
    drop = _number(payload.get("estimated_drop"))
    if drop is not None:
        text += f"; estimated accuracy drop {100 * drop:+.1f} points"
    return text[0].upper() + text[1:] + "."


def _figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _time(record: AuditRecord) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(record.time, _dt.timezone.utc).replace(tzinfo=None)


def labelled(monitor: List[AuditRecord]) -> bool:
    """Whether the monitor's accuracy estimates rest on labelled calibration data."""
    return any(isinstance(r.payload.get("accuracy_estimates"), dict) and r.payload["accuracy_estimates"].get(
        "labelled") is True for r in monitor)


def _plots(monitor: List[AuditRecord], events: List[AuditRecord]) -> List[Tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def numbers(key: str, floor: Optional[float] = None):
        """(times, values) of one series; values the log holds as "nan" or
        "inf" strings (JSON has no such numbers) are skipped, so each series
        keeps its own times."""
        points = [(_time(r), _number(r.payload.get(key))) for r in monitor]
        points = [(t, v if floor is None else max(v, floor)) for t, v in points if v is not None]
        return [t for t, _ in points], [v for _, v in points]

    def time_axis(axis):
        locator = mdates.AutoDateLocator()
        axis.xaxis.set_major_locator(locator)
        axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        axis.set_xlabel("time (UTC)")

    def shade_active(axis):
        start = None
        for record in monitor:
            if record.payload.get("active") and start is None:
                start = _time(record)
            elif not record.payload.get("active") and start is not None:
                axis.axvspan(start, _time(record), color="#1f77b4", alpha=0.08, lw=0)
                start = None
        if start is not None and monitor:
            axis.axvspan(start, _time(monitor[-1]), color="#1f77b4", alpha=0.08, lw=0)

    def mark_events(axis, log_scale=False):
        seen = set()
        low, high = axis.get_ylim()
        level = high / 1.25 if log_scale else high - 0.04 * (high - low)
        for record in events:
            style = _MARKERS.get(record.kind)
            if style is None:
                continue
            label, colour, marker = style
            axis.scatter([_time(record)], [level], color=colour, marker=marker, s=40, zorder=5,
                         label=None if label in seen else label)
            seen.add(label)

    images = []
    times, score = numbers("score", floor=_SCORE_FLOOR)
    threshold_times, threshold = numbers("threshold")
    figure, axis = plt.subplots(figsize=(10, 3.2))
    if times:
        axis.set_yscale("log")
        axis.plot(times, score, lw=1.2, color="#1f77b4", label="window drift score")
        axis.plot(threshold_times, threshold, lw=1.2, ls="--", color="#d62728", label="alarm threshold")
        alarm_times = [_time(r) for r in monitor if r.payload.get("drift") is True]
        if alarm_times:
            axis.scatter(alarm_times, [_SCORE_FLOOR] * len(alarm_times), marker="|", s=60, color="#d62728",
                         label="alarm")
        shade_active(axis)
        mark_events(axis, log_scale=True)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=8, ncol=7, frameon=False)
        time_axis(axis)
    else:
        axis.text(0.5, 0.5, "no monitor records (audit_every=None)", ha="center", transform=axis.transAxes)
    axis.set_ylabel(f"standardised score (log; <= {_SCORE_FLOOR} drawn at {_SCORE_FLOOR})", fontsize=8)
    axis.set_title("Drift score and alarm threshold (shaded: adapters active)")
    images.append(("Drift score over time", _figure_png(figure)))
    plt.close(figure)

    images.append(("Top drifting layers over time", _heatmap(plt, monitor, time_axis)))

    images.append(("Entropy and estimated accuracy", _entropy_plot(plt, monitor, numbers, shade_active, time_axis)))
    images.append(("Adaptation events", _adaptation_plot(plt, events, mark_events, time_axis)))
    return images


def _entropy_plot(plt, monitor: List[AuditRecord], numbers, shade_active, time_axis) -> str:
    """Mean entropy and the label-free accuracy estimate over time."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True)
    if monitor:
        t, entropy = numbers("entropy_mean")
        top.plot(t, entropy, lw=1.2, color="#9467bd")
        t, accuracy = numbers("accuracy_estimate")
        bottom.plot(t, [100 * v for v in accuracy], lw=1.2, color="#2ca02c", label="window")
        t, batch_accuracy = numbers("batch_accuracy_estimate")
        bottom.plot(t, [100 * v for v in batch_accuracy], lw=0.6, color="#2ca02c", alpha=0.4, label="batch")
        bottom.legend(loc="lower left", fontsize=8)
        shade_active(top)
        shade_active(bottom)
        time_axis(bottom)
    top.set_ylabel("mean entropy (nats)")
    top.set_title("Prediction entropy and label-free accuracy estimate"
                  + ("" if labelled(monitor) else "\n(no labels given: the estimate is the mean confidence, "
                                                   "not a measured accuracy)"))
    bottom.set_ylabel("estimated accuracy (%)")
    png = _figure_png(figure)
    plt.close(figure)
    return png


def _adaptation_plot(plt, events: List[AuditRecord], mark_events, time_axis) -> str:
    """Adaptation steps (distance from the source) and the governance events."""
    figure, axis = plt.subplots(figsize=(10, 2.8))
    steps = [r for r in events if r.kind == "step"]
    if steps:
        axis.scatter([_time(r) for r in steps], [_number(r.payload.get("shift")) or 0.0 for r in steps], s=8,
                     color="#1f77b4", label="step (adapter distance from source)")
    other = [r for r in events if r.kind in _MARKERS]
    if steps or other:
        mark_events(axis)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8, ncol=7, frameon=False)
        time_axis(axis)
    else:
        axis.text(0.5, 0.5, "no adaptation", ha="center", transform=axis.transAxes)
    axis.set_ylabel("L2 distance")
    axis.set_title("Adaptation: steps, rollbacks, guard trips, rule violations, decisions")
    png = _figure_png(figure)
    plt.close(figure)
    return png


def _heatmap(plt, monitor: List[AuditRecord], time_axis) -> str:
    """The standardised signal of each watched layer (and entropy signal) per
    monitor record: the ``_HEATMAP_ROWS`` that rose highest, by name, over time."""
    import matplotlib.dates as mdates
    import numpy as np

    rows = [r for r in monitor if isinstance(r.payload.get("signals"), dict)]
    names: Dict[str, float] = {}
    for record in rows:
        for name, value in record.payload["signals"].items():
            value = _number(value)
            if value is not None:
                names[name] = max(names.get(name, -np.inf), value)
    chosen = sorted(names, key=names.get, reverse=True)[:_HEATMAP_ROWS]
    figure, axis = plt.subplots(figsize=(10, 0.9 + 0.32 * max(len(chosen), 3)))
    if chosen:
        matrix = np.array([[max(_number(r.payload["signals"].get(name)) or 0.0, 0.0) for r in rows]
                           for name in chosen])
        start, stop = mdates.date2num(_time(rows[0])), mdates.date2num(_time(rows[-1]))
        stop = stop if stop > start else start + 1e-5
        image = axis.imshow(matrix, aspect="auto", cmap="magma_r", interpolation="nearest",
                            extent=(start, stop, len(chosen) - 0.5, -0.5),
                            vmax=max(float(np.percentile(matrix, 99)), 1.0))
        axis.set_yticks(range(len(chosen)))
        axis.set_yticklabels([_signal_words(name).replace("the ", "") for name in chosen], fontsize=8)
        axis.xaxis_date()
        time_axis(axis)
        figure.colorbar(image, ax=axis, pad=0.01).set_label("standardised signal", fontsize=8)
    else:
        axis.text(0.5, 0.5, "no per-layer signals in this log", ha="center", transform=axis.transAxes)
        axis.set_yticks([])
    axis.set_title(f"Top drifting layers over time (the {len(chosen)} highest standardised signals)")
    png = _figure_png(figure)
    plt.close(figure)
    return png


def _number(value) -> Optional[float]:
    """A finite float from a payload value, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _percent(value) -> str:
    value = _number(value)
    return "–" if value is None else f"{100 * value:.1f}%"


def _detail(record: AuditRecord) -> str:
    if record.kind in ("drift", "activate"):
        return alarm_words(record.payload)
    return record.summary(width=160, separator="; ")


def _accuracy_table(records: List[AuditRecord], monitor: List[AuditRecord]) -> str:
    """Served accuracy per segment where the log has segment records (measured
    when labels were given, else the estimate, marked as such); otherwise the
    estimated accuracy per hour of monitor records."""
    escape = html.escape
    segments = [r for r in records if r.kind == "segment"]
    if segments:
        lines = ["<table class=\"accuracy\"><tr><th>segment</th><th>until (UTC)</th><th>batches</th>"
                 "<th>served accuracy</th><th>source model</th><th>estimated (label-free)</th></tr>"]
        for record in segments:
            payload = record.payload
            served = (_percent(payload.get("healed_accuracy")) if payload.get("labelled")
                      else f"{_percent(payload.get('estimated_accuracy'))} <i>(estimated)</i>")
            lines.append(f"<tr><td>{escape(str(payload.get('name')))}"
                         f"{' (drift)' if payload.get('drifted') else ''}</td><td>{_when(record)}</td>"
                         f"<td>{escape(str(payload.get('batches')))}</td><td>{served}</td>"
                         f"<td>{_percent(payload.get('source_accuracy'))}</td>"
                         f"<td>{_percent(payload.get('estimated_accuracy'))}</td></tr>")
        return "\n".join(lines) + "</table>"
    hours: Dict[str, List[AuditRecord]] = {}
    for record in monitor:
        hours.setdefault(_when(record)[:13] + ":00", []).append(record)
    lines = ["<table class=\"accuracy\"><tr><th>hour (UTC)</th><th>batches read</th><th>alarms</th>"
             "<th>estimated accuracy <i>(estimated, no labels)</i></th></tr>"]
    for hour, group in hours.items():
        values = [v for v in (_number(r.payload.get("batch_accuracy_estimate")) for r in group) if v is not None]
        mean = sum(values) / len(values) if values else None
        lines.append(f"<tr><td>{escape(hour)}</td><td>{len(group)}</td>"
                     f"<td>{sum(r.payload.get('drift') is True for r in group)}</td>"
                     f"<td>{_percent(mean)} <i>(estimated)</i></td></tr>")
    return "\n".join(lines) + "</table>"


def write_report(audit: Union[str, os.PathLike], destination: Union[str, os.PathLike],
                 title: Optional[str] = None, max_rows: int = 500) -> Path:
    """Renders the audit log at ``audit`` into ``destination`` (HTML)."""
    log = AuditLog(audit, readonly=True)
    try:
        verify = log.verify()
        records = log.records()
    finally:
        log.close()
    monitor = [r for r in records if r.kind == "monitor"]
    events = [r for r in records if r.kind != "monitor"]
    images = _plots(monitor, events)
    counts: Dict[str, int] = {}
    for record in records:
        counts[record.kind] = counts.get(record.kind, 0) + 1
    notable = [r for r in events if r.kind not in _QUIET]
    title = title or f"selfheal report: {Path(audit).name}"
    escape = html.escape
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        ".ok{color:#2a7d2a}.bad{color:#b00020;font-weight:bold}img{max-width:100%;margin:8px 0}"
        ".caveat{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px}</style>",
        "</head><body>", f"<h1>{escape(title)}</h1>",
        f"<p>Audit log <code>{escape(str(audit))}</code>: {len(records)} records"
        + (f", {_when(records[0])} to {_when(records[-1])} UTC" if records else "") + ". "
        + (f"<span class=\"ok\">Hash chain intact</span> (head <code>{escape(verify.head[:16])}…</code>)."
           if verify.ok else f"<span class=\"bad\">Hash chain BROKEN: {escape(verify.reason)}</span>") + "</p>",
        "<table><tr><th>record kind</th><th>count</th></tr>"
        + "".join(f"<tr><td>{escape(str(k))}</td><td>{v}</td></tr>" for k, v in sorted(counts.items())) + "</table>",
    ]
    has_labels = labelled(monitor) or any(r.kind == "segment" and r.payload.get("labelled") for r in records)
    caveat = ("" if labelled(monitor) else
              "<p class=\"caveat\"><b>Caveat:</b> no labels were given at calibration, so the estimated accuracy "
              "is the model's mean confidence, not a measurement: it can stay high while the real accuracy "
              "falls.</p>")
    parts.append("<h2>Accuracy " + ("per segment" if any(r.kind == "segment" for r in records) else "per hour")
                 + "</h2>" + ("" if has_labels else caveat) + _accuracy_table(records, monitor))
    alarms = [r for r in events if r.kind in ("drift", "activate")]
    if alarms:
        parts.append("<h2>Why it alarmed</h2><ul class=\"alarms\">" + "".join(
            f"<li>{_when(r)} UTC (batch {escape(str(r.batch))}, {escape(r.kind)}): "
            f"{escape(alarm_words(r.payload))}</li>" for r in alarms[:20]) + "</ul>")
    span = f" (x axis: time, {_when(monitor[0])} to {_when(monitor[-1])} UTC)" if monitor else ""
    for caption, png in images:
        parts.append(f"<h2>{escape(caption)}</h2><img alt=\"{escape(caption + span)}\" "
                     f"src=\"data:image/png;base64,{png}\">")
        if caption.startswith("Entropy"):
            parts.append(caveat)
    parts.append(f"<h2>Events ({len(notable)}{', first ' + str(max_rows) if len(notable) > max_rows else ''})</h2>")
    parts.append("<table><tr><th>seq</th><th>time (UTC)</th><th>batch</th><th>kind</th><th>version</th>"
                 "<th>state</th><th>detail</th></tr>")
    for record in notable[:max_rows]:
        parts.append(f"<tr><td>{escape(str(record.seq))}</td><td>{_when(record)}</td>"
                     f"<td>{escape(str(record.batch))}</td>"
                     f"<td>{escape(record.kind)}</td><td>{escape(str(record.version))}</td>"
                     f"<td><code>{escape((record.state_hash or '')[:12])}</code></td>"
                     f"<td>{escape(_detail(record))}</td></tr>")
    parts.append("</table></body></html>")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".tmp")
    temporary.write_text("\n".join(parts), encoding="utf-8")
    os.replace(temporary, destination)
    return destination
