"""``selfheal demo``: a small CNN serving handwritten digits while the data
drifts (noise, blur, contrast, brightness, pixelation, salt-and-pepper), with
and without self-healing, side by side on the same batches.

Everything comes from this run: the model (shipped weights, or trained on the
spot with ``--train``), the monitor's calibration, the stream, the accuracies,
the delays and the audit log. With ``--data`` the same loop runs on the
user's own tensors and model.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parent / "data"
DIGITS_FILE = DATA_DIR / "digits16.npz"
MODEL_FILE = DATA_DIR / "digits_cnn.safetensors"
SPLITS = {"train": (0, 800), "calibration": (800, 1400), "test": (1400, 1797)}


# --------------------------------------------------------------- data, model


def load_digits(device: torch.device = torch.device("cpu")) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The bundled digits (16x16 in [0, 1]) in their train / calibration / test splits."""
    import numpy as np
    with np.load(DIGITS_FILE) as data:
        images = torch.from_numpy(data["images"]).float().div_(255.0).unsqueeze(1)
        labels = torch.from_numpy(data["labels"]).long()
    return {name: (images[a:b].to(device), labels[a:b].to(device)) for name, (a, b) in SPLITS.items()}


def digits_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train_digits_model(epochs: int = 15, seed: int = 0) -> nn.Module:
    """Trains the demo CNN on the bundled training split (random one-pixel
    shifts as augmentation); about 10 s on 2 CPU cores."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = load_digits()["train"]
    model = digits_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            index = order[start: start + 64]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
            batch = torch.roll(x[index], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(batch), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def load_digits_model(train: bool = False) -> Tuple[nn.Module, str]:
    """The shipped demo model (``data/digits_cnn.safetensors``), or a freshly
    trained one when asked or when the file is missing."""
    if not train and MODEL_FILE.is_file():
        from safetensors.torch import load_file
        model = digits_model()
        model.load_state_dict(load_file(str(MODEL_FILE)))
        return model.eval(), f"shipped weights ({MODEL_FILE.name})"
    started = time.perf_counter()
    model = train_digits_model()
    return model, f"trained now ({time.perf_counter() - started:.1f} s)"


# -------------------------------------------------------------- corruptions


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = 2
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-grid ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def _contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _salt_pepper(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=generator).to(x.device)
    return torch.where(u < p / 2, torch.zeros_like(x), torch.where(u > 1 - p / 2, torch.ones_like(x), x))


def _pixelate(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(F.interpolate(x, size=(size, size), mode="area"), size=x.shape[-2:], mode="nearest")


CORRUPTIONS: Dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "noise": lambda x, g: x + 0.3 * torch.randn(x.shape, generator=g).to(x.device),
    "blur": lambda x, g: _blur(x, 1.5),
    "contrast": lambda x, g: _contrast(x, 0.3),
    "brightness": lambda x, g: x + 0.5,
    "pixelate": lambda x, g: _pixelate(x, 5),
    "salt-pepper": lambda x, g: _salt_pepper(x, 0.12, g),
}


@dataclass
class Segment:
    name: str
    inputs: List[torch.Tensor]
    labels: Optional[List[torch.Tensor]] = None
    drifted: bool = True


def digits_stream(test: Tuple[torch.Tensor, torch.Tensor], corruptions: Sequence[str], batches: int,
                  clean_batches: int, batch_size: int, seed: int) -> List[Segment]:
    """Clean, then each corruption for ``batches`` batches followed by
    ``clean_batches`` clean ones (so each drift's onset is a fresh detection)."""
    generator = torch.Generator().manual_seed(seed)
    x, y = test

    def draw(count: int, corruption: Optional[str]) -> Segment:
        index = torch.randint(len(y), (count * batch_size,), generator=generator).to(x.device)
        inputs = x[index]
        if corruption is not None:
            inputs = CORRUPTIONS[corruption](inputs, generator)
        return Segment(corruption or "clean", list(inputs.split(batch_size)), list(y[index].split(batch_size)),
                       drifted=corruption is not None)

    segments = [draw(clean_batches * 2, None)]
    for name in corruptions:
        segments.append(draw(batches, name))
        segments.append(draw(clean_batches, None))
    return segments


# ---------------------------------------------------------------- user data


def load_user_setup(data: str, model_spec: Optional[str], weights: Optional[str], batch_size: int,
                    device: torch.device) -> Tuple[nn.Module, List, List[Segment], str]:
    """``--data FILE`` (.pt loaded with ``weights_only=True``, or .npz) with
    ``reference`` (healthy inputs) and ``stream`` (inputs to serve), optional
    ``reference_labels`` (they fit the accuracy estimate's temperature),
    ``stream_labels`` and ``segments`` (stream indices where segments start);
    or ``x`` [+ ``y``] split in half. ``--model pkg.module:factory`` builds the
    model; ``--weights`` (.safetensors, or a .pt state dict) fills it."""
    path = Path(data)
    if not path.is_file():
        raise DemoError(f"no data file at {data!r}")
    try:
        wanted = ("reference", "stream", "reference_labels", "stream_labels", "segments", "x", "y")
        if path.suffix == ".npz":
            import numpy as np
            with np.load(path, allow_pickle=False) as archive:
                tables = {key: torch.as_tensor(archive[key]) for key in archive.files if key in wanted}
        else:
            tables = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(tables, dict):
                tables = {key: torch.as_tensor(value) for key, value in tables.items() if key in wanted}
    except Exception as error:  # noqa: BLE001 - any unreadable file ends here
        raise DemoError(f"cannot read {data!r}: {type(error).__name__}: {error}") from None
    if not isinstance(tables, dict):
        raise DemoError(f"{data!r} must hold a dict of tensors (reference, stream[, stream_labels]) or (x[, y])")
    if "reference" in tables and "stream" in tables:
        reference, stream, labels = tables["reference"], tables["stream"], tables.get("stream_labels")
        reference_labels = tables.get("reference_labels")
    elif "x" in tables:
        half = len(tables["x"]) // 2
        reference, stream = tables["x"][:half], tables["x"][half:]
        labels = tables["y"][half:] if "y" in tables else None
        reference_labels = tables["y"][:half] if "y" in tables else None
    else:
        raise DemoError(f"{data!r} has keys {sorted(tables)}; expected 'reference' and 'stream' (or 'x')")
    for name, tensor in (("reference", reference), ("stream", stream)):
        if tensor.dim() < 2 or len(tensor) == 0:
            raise DemoError(f"{name!r} in {data!r} must be a non-empty batch of inputs [N, features...] "
                            f"(at least 2-D), got shape {tuple(tensor.shape)}")
    if reference.shape[1:] != stream.shape[1:]:
        raise DemoError(f"reference rows {tuple(reference.shape[1:])} and stream rows {tuple(stream.shape[1:])} differ")
    reference, stream = reference.float(), stream.float()
    if labels is not None and (labels.dim() != 1 or len(labels) != len(stream)):
        raise DemoError(f"stream_labels must be class indices [N] for a stream of {len(stream)}, "
                        f"got shape {tuple(labels.shape)}")
    if reference_labels is not None and (reference_labels.dim() != 1 or len(reference_labels) != len(reference)):
        raise DemoError(f"reference_labels must be class indices [N] for a reference of {len(reference)}, "
                        f"got shape {tuple(reference_labels.shape)}")
    if model_spec is None:
        raise DemoError("--data needs --model pkg.module:factory (a callable returning the nn.Module)")
    model = _import_model(model_spec)
    if weights is not None:
        _load_weights(model, weights)
    model = model.to(device).eval()
    try:  # a first forward: inputs the model cannot take end here, with the model's own message
        with torch.no_grad():
            probe = model(reference[:2].to(device))
    except Exception as error:  # noqa: BLE001
        raise DemoError(f"the model cannot run on the reference inputs {tuple(reference.shape[1:])}: "
                        f"{type(error).__name__}: {str(error)[:300]}") from None
    if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
        raise DemoError(f"the model must return logits [N, classes], got "
                        f"{tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__}")
    starts = [int(s) for s in tables.get("segments", torch.tensor([0])).reshape(-1).tolist()]
    starts = sorted(set([0] + [s for s in starts if 0 < s < len(stream)]))
    segments = []
    for index, start in enumerate(starts):
        stop = starts[index + 1] if index + 1 < len(starts) else len(stream)
        x = stream[start:stop].to(device)
        y = labels[start:stop].long().to(device) if labels is not None else None
        segments.append(Segment(f"segment {index + 1}", list(x.split(batch_size)),
                                list(y.split(batch_size)) if y is not None else None, drifted=index > 0))
    calibration = list(reference.to(device).split(batch_size))
    if reference_labels is not None:
        calibration = list(zip(calibration, reference_labels.long().to(device).split(batch_size)))
    return model, calibration, segments, f"{model_spec}"


def _import_model(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise DemoError(f"--model must look like pkg.module:factory, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise DemoError(f"cannot import {spec!r}: {error}") from None
    finally:
        sys.path.pop(0)
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as error:  # noqa: BLE001 - the user's factory
        raise DemoError(f"{spec!r} raised {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise DemoError(f"{spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(model: nn.Module, weights: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise DemoError(f"no weights file at {weights!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001
        raise DemoError(f"cannot load weights {weights!r} into the model: {type(error).__name__}: "
                        f"{str(error)[:300]}") from None


class DemoError(Exception):
    """A problem with the demo's inputs (reported by the CLI, exit status 2)."""


# -------------------------------------------------------------------- run


@dataclass
class SegmentResult:
    name: str
    drifted: bool
    batches: int
    samples: int
    source_accuracy: Optional[float]
    healed_accuracy: Optional[float]
    estimated_accuracy: float
    detection_delay: Optional[int]
    steps: int
    rollbacks: int
    events: Dict[str, int] = field(default_factory=dict)
    carried: bool = False  # the alarm of the segment before was still on when it began


def run_stream(healer, source: nn.Module, segments: List[Segment], progress: Callable[[int], None]) -> List[SegmentResult]:
    """Serves every batch through ``healer`` and through the unadapted
    ``source`` copy; returns per-segment results measured on the way."""
    results = []
    for segment in segments:
        correct_source = correct_healed = samples = 0
        estimated, delay, steps_before = 0.0, None, healer.steps
        first_seq = healer.event_count
        carried = healer.drift_detected  # still alarming from the segment before
        for index, x in enumerate(segment.inputs):
            seq = healer.event_count
            with torch.no_grad():
                source_logits = source(x)
            logits = healer(x)
            report = healer.drift
            # a detection is an alarm's onset (or an activation) in this segment
            new = healer.event_count - seq  # the newest `new` events are this batch's
            fresh = [e for e in healer.events[-new:] if e.kind in ("drift", "activate")] if new > 0 else []
            if delay is None and fresh:
                delay = index + 1
            estimated += report.batch_accuracy_estimate * len(x)
            if segment.labels is not None:
                y = segment.labels[index]
                correct_source += int((source_logits.argmax(1) == y).sum())
                correct_healed += int((logits.argmax(1) == y).sum())
            samples += len(x)
            progress(1)
        kinds: Dict[str, int] = {}
        for event in healer.events:
            if event.seq > first_seq:
                kinds[event.kind] = kinds.get(event.kind, 0) + 1
        labelled = segment.labels is not None and samples > 0
        if healer.audit is not None:  # the report's per-segment table
            healer.audit.append(
                "segment", batch=healer.batches, name=segment.name, drifted=segment.drifted,
                batches=len(segment.inputs), samples=samples, labelled=labelled,
                source_accuracy=correct_source / samples if labelled else None,
                healed_accuracy=correct_healed / samples if labelled else None,
                estimated_accuracy=estimated / max(samples, 1))
        results.append(SegmentResult(
            segment.name, segment.drifted, len(segment.inputs), samples,
            correct_source / samples if labelled else None, correct_healed / samples if labelled else None,
            estimated / max(samples, 1), delay, healer.steps - steps_before, kinds.get("rollback", 0), kinds,
            carried=carried and delay is None))
    return results


def format_table(results: List[SegmentResult]) -> str:
    header = ["segment", "batches", "source acc", "healed acc", "est. acc", "delay", "steps", "rollbacks"]
    rows = [header]
    for r in results:
        rows.append([r.name, str(r.batches),
                     "-" if r.source_accuracy is None else f"{100 * r.source_accuracy:.1f}%",
                     "-" if r.healed_accuracy is None else f"{100 * r.healed_accuracy:.1f}%",
                     f"{100 * r.estimated_accuracy:.1f}%",
                     "-" if not r.drifted else (str(r.detection_delay) if r.detection_delay is not None
                                                else ("cont." if r.carried else "missed")),
                     str(r.steps), str(r.rollbacks)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarise(results: List[SegmentResult]) -> Dict[str, Optional[float]]:
    def mean(pairs):
        """Sample-weighted mean of (value, samples) pairs with a value."""
        pairs = [(v, n) for v, n in pairs if v is not None and n]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None
    drifted = [r for r in results if r.drifted]
    clean = [r for r in results if not r.drifted]
    source = mean((r.source_accuracy, r.samples) for r in drifted)
    healed = mean((r.healed_accuracy, r.samples) for r in drifted)
    clean_acc = mean((r.source_accuracy, r.samples) for r in clean)
    restored = None
    if None not in (source, healed, clean_acc) and clean_acc - source > 1e-9:
        restored = (healed - source) / (clean_acc - source)
    delays = [r.detection_delay for r in drifted if r.detection_delay is not None]
    return {"drift_source_accuracy": source, "drift_healed_accuracy": healed,
            "clean_source_accuracy": clean_acc,
            "clean_healed_accuracy": mean((r.healed_accuracy, r.samples) for r in clean),
            "clean_estimated_accuracy": mean((r.estimated_accuracy, r.samples) for r in clean),
            "restored_share": restored, "mean_detection_delay": sum(delays) / len(delays) if delays else None,
            "missed": sum(r.detection_delay is None and not r.carried for r in drifted),
            "carried": sum(r.carried for r in drifted)}


def run_demo(*, quick: bool = False, device: str = "cpu", out: str = "selfheal_demo", train: bool = False,
             data: Optional[str] = None, model_spec: Optional[str] = None, weights: Optional[str] = None,
             batch_size: int = 64, seed: int = 0, report: bool = True, progress: bool = True,
             print_fn: Callable[[str], None] = print) -> Dict:
    """The demo; returns what it printed as numbers (per segment and summary)."""
    import selfheal_ext as sh
    started = time.perf_counter()
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise DemoError(f"--device {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device is available here")
    torch.manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    audit_path = out_dir / "audit.db"
    for stale in (audit_path, Path(str(audit_path) + "-wal"), Path(str(audit_path) + "-shm")):
        stale.unlink(missing_ok=True)  # each demo run writes its own log and snapshots
    import shutil
    shutil.rmtree(str(audit_path) + ".snapshots", ignore_errors=True)

    if data is None:
        digits = load_digits(device)
        model, origin = load_digits_model(train)
        model = model.to(device)
        # labelled: the labels fit the temperature of the label-free accuracy estimate
        calibration = list(zip(*(part.split(batch_size) for part in digits["calibration"])))
        corruptions = list(CORRUPTIONS)[:3] if quick else list(CORRUPTIONS)
        segments = digits_stream(digits["test"], corruptions, batches=8 if quick else 16,
                                 clean_batches=4, batch_size=batch_size, seed=seed + 1)
        monitor_options = {"window": 128, "false_alarm_every": 1000}
        title = f"digits CNN, {origin}"
    else:
        model, calibration, segments, title = load_user_setup(data, model_spec, weights, batch_size, device)
        monitor_options = {}  # the window is chosen from the amount of reference data
    parameters = sum(p.numel() for p in model.parameters())
    print_fn(f"selfheal demo: {title}; {parameters:,} parameters; device {device}; audit log {audit_path}")

    source = copy.deepcopy(model).eval()
    healer = sh.SelfHealer(model, audit=str(audit_path), audit_every=1, monitor_options=monitor_options, seed=seed)
    print_fn(healer.adapters.summary().splitlines()[0])
    calibration_started = time.perf_counter()
    try:
        report_ = healer.calibrate(calibration, progress=progress)
    except ValueError as error:  # too little or unusable reference data: the user's to fix
        raise DemoError(str(error).removeprefix("selfheal: ")) from None
    print_fn(f"calibrated on {report_.samples} healthy samples in {time.perf_counter() - calibration_started:.1f} s "
             f"(window {report_.window} samples, threshold {report_.window_threshold:.2f}, one false alarm per "
             f"{int(healer.monitor.config['false_alarm_every']):,} batches)")
    total = sum(len(s.inputs) for s in segments)
    with tqdm(total=total, desc="selfheal demo", unit="batch", disable=None if progress else True) as bar:
        results = run_stream(healer, source, segments, bar.update)
    summary = summarise(results)
    verify = healer.audit.verify()
    healer.close()
    print_fn("")
    print_fn(format_table(results))
    print_fn("")
    if summary["drift_source_accuracy"] is not None:
        restored = summary["restored_share"]
        print_fn(f"under drift: source {100 * summary['drift_source_accuracy']:.1f}% -> healed "
                 f"{100 * summary['drift_healed_accuracy']:.1f}%"
                 + (f" ({100 * restored:.0f}% of the lost accuracy restored)" if restored is not None else ""))
        if summary["clean_source_accuracy"] is not None:
            print_fn(f"clean data: source {100 * summary['clean_source_accuracy']:.1f}%, healed "
                     f"{100 * summary['clean_healed_accuracy']:.1f}%")
    if summary["clean_estimated_accuracy"] is not None and summary["clean_healed_accuracy"] is not None:
        print_fn(f"accuracy estimate on clean segments: {100 * summary['clean_estimated_accuracy']:.1f}% "
                 f"(label-free), true {100 * summary['clean_healed_accuracy']:.1f}%")
    if summary["mean_detection_delay"] is not None:
        print_fn(f"detection: mean delay {summary['mean_detection_delay']:.1f} batches (1: alarm on the drift's "
                 f"first batch)" + (f", {summary['missed']} drift(s) missed" if summary["missed"] else ", no drift missed")
                 + (f", {summary['carried']} met by an alarm still on from the segment before" if summary["carried"]
                    else ""))
    counts: Dict[str, int] = {}
    for event in healer.events:
        counts[event.kind] = counts.get(event.kind, 0) + 1
    print_fn("events: " + ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())))
    print_fn(f"audit log: {audit_path} ({verify.records} records, chain "
             f"{'intact' if verify.ok else 'BROKEN: ' + verify.reason}); "
             f"snapshots in {healer.snapshots.directory}")
    report_path = None
    if report:
        try:
            from .report import write_report
            report_path = write_report(audit_path, out_dir / "report.html", title=f"selfheal demo: {title}")
            print_fn(f"report: {report_path}")
        except ImportError as error:
            print_fn(f"report skipped: {error} (pip install matplotlib)")
    seconds = time.perf_counter() - started
    print_fn(f"done in {seconds:.1f} s")
    return {"segments": [r.__dict__ for r in results], "summary": summary, "events": counts,
            "audit": str(audit_path), "audit_ok": verify.ok, "records": verify.records,
            "report": None if report_path is None else str(report_path), "seconds": seconds}
