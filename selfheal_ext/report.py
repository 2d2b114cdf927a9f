"""``selfheal report AUDIT_DB``: one self-contained HTML page from an audit
log — drift score over time against its threshold, entropy, estimated
accuracy, adaptation steps, rollbacks, guard trips, rule violations and
decisions — with static PNG plots (matplotlib) embedded as data URIs.

The page needs no network and no script: it opens from a file anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
_QUIET = ("monitor", "step", "snapshot", "skip")


def _when(record: AuditRecord) -> str:
    return record.iso_time[:19].replace("T", " ")


def _figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(monitor: List[AuditRecord], events: List[AuditRecord]) -> List[Tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def numbers(key: str):
        """(batches, values) of one series; values the log holds as "nan" or
        "inf" strings (JSON has no such numbers) are skipped, so each series
        keeps its own batch numbers."""
        points = [(r.batch, _number(r.payload.get(key))) for r in monitor]
        points = [(b, v) for b, v in points if b is not None and v is not None]
        return [b for b, _ in points], [v for _, v in points]

    def shade_active(axis):
        start = None
        for record in monitor:
            if record.payload.get("active") and start is None:
                start = record.batch
            elif not record.payload.get("active") and start is not None:
                axis.axvspan(start, record.batch, color="#1f77b4", alpha=0.08, lw=0)
                start = None
        if start is not None and monitor:
            axis.axvspan(start, monitor[-1].batch, color="#1f77b4", alpha=0.08, lw=0)

    def mark_events(axis):
        seen = set()
        low, high = axis.get_ylim()
        for record in events:
            style = _MARKERS.get(record.kind)
            if style is None or record.batch is None:
                continue
            label, colour, marker = style
            axis.scatter([record.batch], [high - 0.04 * (high - low)], color=colour, marker=marker, s=40, zorder=5,
                         label=None if label in seen else label)
            seen.add(label)

    images = []
    batches, score = numbers("score")
    threshold_batches, threshold = numbers("threshold")
    figure, axis = plt.subplots(figsize=(10, 3.2))
    if batches:
        axis.plot(batches, score, lw=1.2, color="#1f77b4", label="window drift score")
        axis.plot(threshold_batches, threshold, lw=1, ls="--", color="#d62728", label="threshold")
        shade_active(axis)
        mark_events(axis)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=7, frameon=False)
    else:
        axis.text(0.5, 0.5, "no monitor records (audit_every=None)", ha="center", transform=axis.transAxes)
    axis.set_xlabel("batch")
    axis.set_ylabel("standardised score")
    axis.set_title("Drift score and threshold (shaded: adapters active)")
    images.append(("Drift score over time", _figure_png(figure)))
    plt.close(figure)

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True)
    if batches:
        b, entropy = numbers("entropy_mean")
        top.plot(b, entropy, lw=1.2, color="#9467bd")
        b, accuracy = numbers("accuracy_estimate")
        bottom.plot(b, [100 * v for v in accuracy], lw=1.2, color="#2ca02c", label="window")
        b, batch_accuracy = numbers("batch_accuracy_estimate")
        bottom.plot(b, [100 * v for v in batch_accuracy], lw=0.6, color="#2ca02c", alpha=0.4, label="batch")
        bottom.legend(loc="lower left", fontsize=8)
        shade_active(top)
        shade_active(bottom)
    top.set_ylabel("mean entropy (nats)")
    top.set_title("Prediction entropy and label-free accuracy estimate")
    bottom.set_ylabel("estimated accuracy (%)")
    bottom.set_xlabel("batch")
    images.append(("Entropy and estimated accuracy", _figure_png(figure)))
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(10, 2.8))
    steps = [r for r in events if r.kind == "step" and r.batch is not None]
    if steps:
        axis.scatter([r.batch for r in steps], [_number(r.payload.get("shift")) or 0.0 for r in steps], s=8,
                     color="#1f77b4", label="step (adapter distance from source)")
    other = [r for r in events if r.kind in _MARKERS and r.batch is not None]
    if steps or other:
        mark_events(axis)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=8, ncol=7, frameon=False)
    else:
        axis.text(0.5, 0.5, "no adaptation", ha="center", transform=axis.transAxes)
    axis.set_xlabel("batch")
    axis.set_ylabel("L2 distance")
    axis.set_title("Adaptation: steps, rollbacks, guard trips, rule violations, decisions")
    images.append(("Adaptation events", _figure_png(figure)))
    plt.close(figure)
    return images


def _number(value) -> Optional[float]:
    """A finite float from a payload value, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


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
        ".ok{color:#2a7d2a}.bad{color:#b00020;font-weight:bold}img{max-width:100%;margin:8px 0}</style>",
        "</head><body>", f"<h1>{escape(title)}</h1>",
        f"<p>Audit log <code>{escape(str(audit))}</code>: {len(records)} records"
        + (f", {_when(records[0])} to {_when(records[-1])} UTC" if records else "") + ". "
        + (f"<span class=\"ok\">Hash chain intact</span> (head <code>{escape(verify.head[:16])}…</code>)."
           if verify.ok else f"<span class=\"bad\">Hash chain BROKEN: {escape(verify.reason)}</span>") + "</p>",
        "<table><tr><th>record kind</th><th>count</th></tr>"
        + "".join(f"<tr><td>{escape(str(k))}</td><td>{v}</td></tr>" for k, v in sorted(counts.items())) + "</table>",
    ]
    for caption, png in images:
        parts.append(f"<h2>{escape(caption)}</h2><img alt=\"{escape(caption)}\" src=\"data:image/png;base64,{png}\">")
    parts.append(f"<h2>Events ({len(notable)}{', first ' + str(max_rows) if len(notable) > max_rows else ''})</h2>")
    parts.append("<table><tr><th>seq</th><th>time (UTC)</th><th>batch</th><th>kind</th><th>version</th>"
                 "<th>state</th><th>detail</th></tr>")
    for record in notable[:max_rows]:
        parts.append(f"<tr><td>{escape(str(record.seq))}</td><td>{_when(record)}</td>"
                     f"<td>{escape(str(record.batch))}</td>"
                     f"<td>{escape(record.kind)}</td><td>{escape(str(record.version))}</td>"
                     f"<td><code>{escape((record.state_hash or '')[:12])}</code></td>"
                     f"<td>{escape(record.summary(width=160, separator='; '))}</td></tr>")
    parts.append("</table></body></html>")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".tmp")
    temporary.write_text("\n".join(parts), encoding="utf-8")
    os.replace(temporary, destination)
    return destination
