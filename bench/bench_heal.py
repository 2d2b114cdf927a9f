"""Healing benchmark: accuracy under drift of the source model, BN
re-estimation, TENT, EATA (bench/baselines/tta.py), RoTTA's robust BatchNorm
alone and RoTTA in full (rotta.py), SAR (sar.py), ROID (roid.py), ActMAD
(actmad.py) and SelfHealer, measured in the same run, in four protocols, on
three tasks:

* digits: scikit-learn's 8x8 digits upscaled to 16x16, a small CNN with
  BatchNorm; corruptions noise, blur, contrast, brightness, salt-and-pepper,
  pixelate at two strengths;
* tabular: a 20-feature, 5-class problem (scikit-learn's make_classification),
  an MLP with BatchNorm; shifts per-feature gain, offset, noise, sensor
  dropout at two strengths;
* signals: synthetic 1-D waveforms of length 64 in 7 classes (sine, square,
  triangle, sawtooth, chirp, damped sine, pulse train; random phase, cycles,
  amplitude and offset, noise), a Conv1d network with BatchNorm1d (widths
  24/48/48); shifts additive noise, gain, time stretch, low-pass, baseline
  wander, dropped samples at two strengths. This task was added after the
  healer's development and was never used to tune it or any baseline.

Protocols: ``reset`` (each shift alone, every method reset before it),
``continual`` (all shifts in one stream, no reset), ``label-ordered`` (each
shift alone, samples sorted by class: classes arrive in runs), ``batch-1``
(each shift alone, one sample per batch). Reported: accuracy, the share of the
lost accuracy restored ``(acc - source) / (clean - source)``, accuracy on
clean data served after the continual stream (forgetting), and time per batch.

The drift streams, corruptions and their strengths were not used while the
healer was developed (its tests use a separate synthetic task).

    python bench/bench_heal.py              # full run, every task (each prints its time)
    python bench/bench_heal.py --tasks signals --seed 100
    python bench/bench_heal.py --quick      # smoke run for CI
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import selfheal_ext as sh  # noqa: E402
from baselines.actmad import ActMAD  # noqa: E402
from baselines.roid import ROID  # noqa: E402
from baselines.rotta import RoTTA, RoTTARBN  # noqa: E402
from baselines.sar import SAR  # noqa: E402
from baselines.tta import BNAdapt, Eata, Source, Tent  # noqa: E402

# ----------------------------------------------------------------- tasks


def digits_task(seed):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return {"train": (x[:800], y[:800]), "calib": (x[800:1400], y[800:1400]), "test": (x[1400:], y[1400:]),
            "classes": 10}


def tabular_task(seed):
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=24_000, n_features=20, n_informative=12, n_redundant=4, n_classes=5,
                               n_clusters_per_class=2, class_sep=1.5, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y)
    mean, std = x[:12_000].mean(0), x[:12_000].std(0)
    x = (x - mean) / std
    return {"train": (x[:12_000], y[:12_000]), "calib": (x[12_000:16_000], y[12_000:16_000]),
            "test": (x[16_000:], y[16_000:]), "classes": 5}


def digits_model(classes):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


def tabular_model(classes):
    return nn.Sequential(nn.Linear(20, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128),
                         nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, classes))


def _waveforms(label, phase, cycles, time):
    """Each sample's waveform (rows of ``label``, ``phase``, ``cycles``) at
    ``time`` in [0, 1): one of seven shapes."""
    angle = 2 * math.pi * (cycles * time + phase)
    fraction = torch.remainder(cycles * time + phase, 1.0)
    shapes = [
        torch.sin(angle),  # sine
        torch.sign(torch.sin(angle)),  # square
        4 * (fraction - 0.5).abs() - 1,  # triangle
        2 * fraction - 1,  # sawtooth
        torch.sin(2 * math.pi * (cycles * time * (0.5 + 0.75 * time) + phase)),  # chirp: 0.5 to 2 x the cycles
        torch.exp(-3 * time) * torch.sin(angle) * 1.8,  # damped sine
        2 * torch.exp(-(torch.minimum(fraction, 1 - fraction) / 0.06) ** 2) - 0.5,  # pulse train
    ]
    return torch.stack(shapes)[label, torch.arange(len(label))]


def signals_task(seed, samples=8_000):
    """Synthetic 1-D signals, 7 classes, length 64: shape, phase, cycles per
    window (2-5), amplitude (0.7-1.3) and an offset jitter per sample, plus
    Gaussian noise (0.15)."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(7, (samples,), generator=generator)
    phase = torch.rand(samples, 1, generator=generator)
    cycles = 2 + 3 * torch.rand(samples, 1, generator=generator)
    amplitude = 0.7 + 0.6 * torch.rand(samples, 1, generator=generator)
    offset = 0.2 * torch.randn(samples, 1, generator=generator)
    time = torch.arange(64, dtype=torch.float32).unsqueeze(0) / 64
    x = amplitude * _waveforms(label, phase, cycles, time) + offset
    x = (x + 0.15 * torch.randn(x.shape, generator=generator)).unsqueeze(1)
    return {"train": (x[:4000], label[:4000]), "calib": (x[4000:6048], label[4000:6048]),
            "test": (x[6048:], label[6048:]), "classes": 7}


def signals_model(classes):
    return nn.Sequential(
        nn.Conv1d(1, 24, 5, padding=2), nn.BatchNorm1d(24), nn.ReLU(),
        nn.Conv1d(24, 48, 5, stride=2, padding=2), nn.BatchNorm1d(48), nn.ReLU(),
        nn.Conv1d(48, 48, 3, stride=2, padding=1), nn.BatchNorm1d(48), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(48, classes))


def shift_pixels(x, generator):
    """Training augmentation: random translations of up to one pixel."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(model, task, epochs, augment, seed):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = task["train"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            index = order[start: start + 64]
            batch = x[index]
            if augment:
                batch = shift_pixels(batch, generator)
            loss = F.cross_entropy(model(batch), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


# ------------------------------------------------------------ corruptions


def _blur(x, sigma):
    radius = 2
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-grid ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def _pixelate(x, size):
    return F.interpolate(F.interpolate(x, size=(size, size), mode="area"), size=x.shape[-2:], mode="nearest")


def _salt_pepper(x, p, generator):
    u = torch.rand(x.shape, generator=generator)
    return torch.where(u < p / 2, torch.zeros_like(x), torch.where(u > 1 - p / 2, torch.ones_like(x), x))


DIGIT_SHIFTS = {
    "noise": (lambda x, s, g: x + s * torch.randn(x.shape, generator=g), (0.2, 0.4)),
    "blur": (lambda x, s, g: _blur(x, s), (0.9, 1.5)),
    "contrast": (lambda x, s, g: (x - x.mean(dim=(1, 2, 3), keepdim=True)) * s + x.mean(dim=(1, 2, 3), keepdim=True),
                 (0.5, 0.3)),
    "brightness": (lambda x, s, g: x + s, (0.25, 0.5)),
    "salt-pepper": (lambda x, s, g: _salt_pepper(x, s, g), (0.05, 0.12)),
    "pixelate": (lambda x, s, g: _pixelate(x, s), (8, 5)),
}


def _feature_draw(seed, features):
    return torch.randn(features, generator=torch.Generator().manual_seed(seed))


TABULAR_SHIFTS = {
    "gain": (lambda x, s, g: x * (1 + s * _feature_draw(11, x.shape[1])), (0.3, 0.6)),
    "offset": (lambda x, s, g: x + s * _feature_draw(12, x.shape[1]), (0.5, 1.0)),
    "noise": (lambda x, s, g: x + s * torch.randn(x.shape, generator=g), (0.5, 1.0)),
    "sensor-dropout": (lambda x, s, g: x * (_feature_draw(13, x.shape[1]).argsort().argsort()
                                            >= int(s * x.shape[1])).float(), (0.2, 0.4)),
}


def _smooth_time(x, sigma):
    radius = 4
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-grid ** 2 / (2 * sigma ** 2))
    return F.conv1d(F.pad(x, (radius, radius), mode="replicate"), (kernel / kernel.sum()).view(1, 1, -1))


def _stretch_time(x, factor):
    """The signal slowed down by ``factor``: its first 64 / factor steps resampled to 64."""
    length = x.shape[-1]
    return F.interpolate(x[..., : round(length / factor)], size=length, mode="linear", align_corners=True)


def _wander(x, amplitude, generator):
    phase = torch.rand(len(x), 1, 1, generator=generator)
    time = torch.arange(x.shape[-1], dtype=torch.float32) / x.shape[-1]
    return x + amplitude * torch.sin(2 * math.pi * (0.5 * time + phase))


SIGNAL_SHIFTS = {
    "noise": (lambda x, s, g: x + s * torch.randn(x.shape, generator=g), (0.3, 0.6)),
    "gain": (lambda x, s, g: x * s, (1.8, 3.0)),
    "time-stretch": (lambda x, s, g: _stretch_time(x, s), (1.3, 1.7)),
    "low-pass": (lambda x, s, g: _smooth_time(x, s), (1.2, 2.0)),
    "baseline-wander": (lambda x, s, g: _wander(x, s, g), (0.7, 1.4)),
    "dropout": (lambda x, s, g: x * (torch.rand(x.shape, generator=g) >= s).float(), (0.2, 0.4)),
}


def make_stream(task, shifts, name, level, batches, batch, seed, label_ordered=False):
    """``batches`` batches of test samples drawn with replacement, shifted."""
    function, strengths = shifts[name] if name else (None, (None, None))
    generator = torch.Generator().manual_seed(seed)
    x, y = task["test"]
    index = torch.randint(len(y), (batches * batch,), generator=generator)
    if label_ordered:
        index = index[torch.argsort(y[index], stable=True)]
    xs = function(x[index], strengths[level], generator) if name else x[index]
    return [(xs[i: i + batch], y[index][i: i + batch]) for i in range(0, batches * batch, batch)]


# ---------------------------------------------------------------- methods


class Healer:
    name = "SelfHealer"

    def __init__(self, model, calibration, window, batch_size, **options):
        self.healer = sh.SelfHealer(copy.deepcopy(model), monitor_options={"window": window}, **options)
        self.healer.calibrate(calibration, batch_size=batch_size)

    def __call__(self, x):
        return self.healer(x)

    def reset(self):
        self.healer.reset()


def build_methods(model, calibration, window, batch_size):
    """Every method on one model; SelfHealer last. The baselines draw their
    random numbers from their own generators, so adding one leaves the global
    random stream, and with it SelfHealer's numbers, as they were."""
    return [Source(model), BNAdapt(model), Tent(model), Eata(model, calibration[:16]),
            RoTTARBN(model), RoTTA(model), SAR(model), ROID(model), ActMAD(model, calibration),
            Healer(model, calibration, window, batch_size)]


def run_stream(method, stream):
    correct = total = 0
    for x, y in stream:
        logits = method(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        total += len(y)
    return correct / total


# ------------------------------------------------------------- protocols


def evaluate(task_name, args):
    seed = args.seed
    if task_name == "digits":
        task = digits_task(seed)
        model = train(digits_model(task["classes"]), task, epochs=args.epochs, augment=True, seed=seed)
        # 600 held-out images: a window of 128 (calibration needs 4 windows).
        # Augmented copies would look like more data than they are and make
        # the bootstrap thresholds too tight.
        shifts, window = DIGIT_SHIFTS, 128
        calibration_x = task["calib"][0]
    elif task_name == "signals":
        task = signals_task(seed)
        model = train(signals_model(task["classes"]), task, epochs=max(2, 2 * args.epochs // 3), augment=False,
                      seed=seed)
        # 2,048 held-out signals: the monitor's default window of 512
        shifts, window = SIGNAL_SHIFTS, 512
        calibration_x = task["calib"][0]
    else:
        task = tabular_task(seed)
        model = train(tabular_model(task["classes"]), task, epochs=max(1, args.epochs // 3), augment=False,
                      seed=seed)
        shifts, window = TABULAR_SHIFTS, 512
        calibration_x = task["calib"][0]
    names = list(shifts)[: args.shifts] if args.shifts else list(shifts)
    levels = range(2) if not args.quick else range(1)
    batch = 64
    calibration = list(calibration_x.split(batch))
    started = time.perf_counter()
    methods = build_methods(model, calibration, window, batch)
    single = Healer(model, calibration, window, 1)  # CUSUM threshold for batches of one
    calibration_seconds = time.perf_counter() - started

    with torch.no_grad():
        clean_stream = make_stream(task, shifts, None, 0, args.batches, batch, seed + 999)
        clean = run_stream(Source(model), clean_stream)
    results = {"task": task_name, "clean_accuracy": clean, "calibration_seconds": calibration_seconds,
               "adapter_summary": methods[-1].healer.adapters.summary(), "protocols": {}}
    plan = [(name, level) for name in names for level in levels]

    def per_shift(protocol, batches, size, label_ordered, method_list):
        rows = []
        for index, (name, level) in enumerate(plan):
            stream = make_stream(task, shifts, name, level, batches, size, seed + 100 + index, label_ordered)
            row = {"shift": f"{name}-{level + 1}"}
            for method in method_list:
                method.reset()
                try:
                    row[method.name] = run_stream(method, stream)
                except ValueError as error:  # BatchNorm1d in training mode refuses one sample
                    row[method.name] = None
                    results.setdefault("failures", {})[f"{protocol}/{method.name}"] = str(error)
            rows.append(row)
        results["protocols"][protocol] = rows

    per_shift("reset", args.batches, batch, False, methods)
    per_shift("label-ordered", args.batches, batch, True, methods)
    batch_one = [m for m in methods if m.name != "SelfHealer"] + [single]
    per_shift("batch-1", args.batch_one_samples, 1, False, batch_one)

    # continual: every shift in sequence, no reset; then clean data (forgetting)
    rows, forgetting = [], {}
    streams = [make_stream(task, shifts, name, level, args.batches, batch, seed + 100 + i)
               for i, (name, level) in enumerate(plan)]
    for method in methods:
        method.reset()
    for (name, level), stream in zip(plan, streams):
        row = {"shift": f"{name}-{level + 1}"}
        for method in methods:
            row[method.name] = run_stream(method, stream)
        rows.append(row)
    after = make_stream(task, shifts, None, 0, args.batches, batch, seed + 1999)
    for method in methods:
        forgetting[method.name] = run_stream(method, after)
    results["protocols"]["continual"] = rows
    results["clean_after_continual"] = forgetting

    # latency per batch of 64: plain inference, healer dormant, healer healing, each adapting baseline
    x = make_stream(task, shifts, names[0], 1, 8, batch, seed + 5)
    healer = methods[-1]
    timings = {}
    with torch.no_grad():
        timings["plain inference"] = _time(lambda b: model(b), x, args.repeats)
    healer.reset()
    timings["SelfHealer dormant (monitor on)"] = _time(lambda b: healer(b), make_stream(task, shifts, None, 0, 8, batch,
                                                                                       seed + 6), args.repeats)
    healer.reset()
    for b, _ in x:
        healer(b)
    timings["SelfHealer healing"] = _time(lambda b: healer(b), x, args.repeats) if healer.healer.active else None
    for method in methods[2:-1]:  # the adapting baselines, each after the whole protocol run
        timings[method.name] = _time(method, x, args.repeats)
    # governance on: every step an audit record (SQLite WAL, state hash of the
    # adapters) plus a rule gate on the 256-row recent buffer after every batch
    with tempfile.TemporaryDirectory() as directory:
        governed = Healer(model, calibration, window, batch, audit=os.path.join(directory, "audit.db"),
                          rules=[sh.rules.ClassRate(0, 0.0, 1.0)])
        for b, _ in x:
            governed(b)
        timings["SelfHealer healing + audit + rule gate"] = \
            _time(lambda b: governed(b), x, args.repeats) if governed.healer.active else None
        governed.healer.audit.close()
    results["latency_ms"] = timings
    results["healer_active_in_latency_run"] = healer.healer.active
    return results


def _time(function, stream, repeats):
    samples = []
    for i in range(repeats):
        x = stream[i % len(stream)][0]
        started = time.perf_counter()
        function(x)
        samples.append(time.perf_counter() - started)
    return 1e3 * statistics.median(samples)


# ----------------------------------------------------------------- report


TASKS = ("digits", "tabular", "signals")
METHODS = ["source", "BN re-estimation", "TENT", "EATA", "RoTTA-RBN", "RoTTA", "SAR", "ROID", "ActMAD", "SelfHealer"]


def summarise(results):
    clean = results["clean_accuracy"]
    summary = []
    for protocol, rows in results["protocols"].items():
        ran = [m for m in METHODS if all(r[m] is not None for r in rows)]
        means = {m: statistics.mean(r[m] for r in rows) if m in ran else None for m in METHODS}
        restored = {m: (means[m] - means["source"]) / max(clean - means["source"], 1e-9) if m in ran else None
                    for m in METHODS}
        summary.append({"protocol": protocol, "means": means, "restored": restored,
                        "worst_vs_source": {m: min(r[m] - r["source"] for r in rows) if m in ran else None
                                            for m in METHODS}})
    return summary


def markdown(results):
    summary = summarise(results)
    lines = [f"### {results['task']} (clean accuracy {100 * results['clean_accuracy']:.1f}%)", "",
             "| method | " + " | ".join(e["protocol"] for e in summary) + " | clean after continual |",
             "|---|" + "---|" * (len(summary) + 1)]
    for m in METHODS:
        cells = [f"{100 * e['means'][m]:.1f}% ({100 * e['restored'][m]:+.0f}%)" if e["means"][m] is not None
                 else "fails" for e in summary]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * results['clean_after_continual'][m]:.1f}% |")
    lines += ["", "Accuracy averaged over shifts (share of the lost accuracy restored).", "",
              "| latency per batch of 64 | ms |", "|---|---|"]
    for name, value in results["latency_ms"].items():
        lines.append(f"| {name} | {'n/a' if value is None else f'{value:.2f}'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", default="digits,tabular,signals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.tasks.split(",")) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    args.epochs = 4 if args.quick else 15
    args.batches = 6 if args.quick else 20
    args.batch_one_samples = 40 if args.quick else 600
    args.shifts = 2 if args.quick else None
    args.repeats = 5 if args.quick else 40
    torch.manual_seed(args.seed)
    all_results = []
    for task_name in args.tasks.split(","):
        started = time.perf_counter()
        results = evaluate(task_name, args)
        results["seconds"] = time.perf_counter() - started
        all_results.append(results)
        print(markdown(results), flush=True)
        print(f"\n({task_name}: {results['seconds']:.0f} s, calibration {results['calibration_seconds']:.0f} s)\n")
        for where, error in results.get("failures", {}).items():
            print(f"- {where} fails: {error}")
        for protocol, rows in results["protocols"].items():
            print(f"#### {task_name} / {protocol}\n")
            print("| shift | " + " | ".join(METHODS) + " |\n|---|" + "---|" * len(METHODS))
            for row in rows:
                print(f"| {row['shift']} | " + " | ".join(
                    f"{100 * row[m]:.1f}" if row[m] is not None else "fails" for m in METHODS) + " |")
            print()
        for protocol_rows in results["protocols"].values():
            for row in protocol_rows:
                if any(row[m] is not None and not math.isfinite(row[m]) for m in METHODS):
                    sys.exit("non-finite accuracy")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"results": all_results, "summary": [summarise(r) for r in all_results],
                       "threads": torch.get_num_threads(), "torch": torch.__version__}, handle, indent=1)


if __name__ == "__main__":
    main()
