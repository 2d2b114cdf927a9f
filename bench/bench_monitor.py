"""DriftMonitor benchmark: detection delay and false alarms on synthetic
covariate shifts of known onset, side by side with established detectors
(bench/baselines/detectors.py) in the same run, and the latency the monitor adds to a
model's forward pass.

    python bench/bench_monitor.py                 # full run (about 10 minutes on 2 cores)
    python bench/bench_monitor.py --quick         # smoke run
"""

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import selfheal_ext as sh  # noqa: E402
from baselines import KSBonferroniDetector, MMDPermutationDetector  # noqa: E402
from timing import interleaved, summary  # noqa: E402

FEATURES, COMPONENTS = 16, 4
OVERHEAD_READ_EVERY = (1, 8, 32)
SPARSE_READ_EVERY = 4


class Source:
    """A mixture of four Gaussian sub-populations in 16 dimensions."""

    def __init__(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.means = torch.randn(COMPONENTS, FEATURES, generator=generator) * 1.5
        self.scales = 0.5 + torch.rand(COMPONENTS, FEATURES, generator=generator)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def sample(self, n, weights=None):
        weights = torch.full((COMPONENTS,), 1.0 / COMPONENTS) if weights is None else weights
        component = torch.multinomial(weights, n, replacement=True, generator=self.generator)
        noise = torch.randn(n, FEATURES, generator=self.generator)
        return self.means[component] + noise * self.scales[component]


def shifted(source, n, kind, strength):
    if kind == "none":
        return source.sample(n)
    if kind == "noise":
        return source.sample(n) + strength * torch.randn(n, FEATURES, generator=source.generator)
    if kind == "scaling":
        return source.sample(n) * (1.0 + strength)
    if kind == "feature swap":
        x = source.sample(n)
        pairs = int(strength)
        order = list(range(FEATURES))
        for i in range(pairs):
            order[2 * i], order[2 * i + 1] = order[2 * i + 1], order[2 * i]
        return x[:, order]
    if kind == "sub-population mix":
        weights = torch.full((COMPONENTS,), (1.0 - strength) / COMPONENTS)
        weights[0] += strength
        return source.sample(n, weights)
    raise ValueError(kind)


SHIFTS = {
    "noise": (0.25, 0.5, 1.0),
    "scaling": (0.1, 0.25, 0.5),
    "feature swap": (1, 2, 4),
    "sub-population mix": (0.2, 0.4, 0.7),
}


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def make_monitor(model, source, args, false_alarm_every, seed=0, window_kind="sliding", batch=None, read_every=1):
    batch = batch or args.batch
    monitor = sh.DriftMonitor(model, window=args.window, false_alarm_every=false_alarm_every, seed=seed,
                              window_kind=window_kind, read_every=read_every)
    started = time.perf_counter()
    report = monitor.calibrate([source.sample(batch) for _ in range(args.calibration // batch)])
    return monitor, report, time.perf_counter() - started


def detection(args):
    rows = []
    source = Source(0)
    model = small_mlp()
    sparse_model = copy.deepcopy(model)  # copied before any monitor hooks it
    monitor, calibration, _ = make_monitor(model, source, args, args.ert)
    # the same detector reading one served batch in 4 (delays in served batches;
    # the onset falls on a read batch)
    sparse, _, _ = make_monitor(sparse_model, Source(0), args, args.ert, read_every=SPARSE_READ_EVERY)
    monitors = {"selfheal DriftMonitor": monitor, f"selfheal DriftMonitor (read_every={SPARSE_READ_EVERY})": sparse}
    reference = torch.cat([source.sample(args.batch) for _ in range(args.window // args.batch + 1)])
    for kind, strengths in SHIFTS.items():
        for strength in strengths[: (1 if args.quick else None)]:
            detectors = {
                "selfheal DriftMonitor": None,
                f"selfheal DriftMonitor (read_every={SPARSE_READ_EVERY})": None,
                KSBonferroniDetector.name: KSBonferroniDetector(reference, args.window),
                MMDPermutationDetector.name: MMDPermutationDetector(reference, args.window),
            }
            for name, detector in detectors.items():
                stream_source = Source(0)
                stream_source.generator.manual_seed(1000 + int(strength * 100))
                if detector is None:
                    monitors[name].reset()
                early, delay, elapsed, calls = 0, None, 0.0, 0
                for batch in range(args.onset + args.horizon):
                    x = shifted(stream_source, args.batch, kind if batch >= args.onset else "none", strength)
                    started = time.perf_counter()
                    if detector is None:
                        with torch.no_grad():
                            monitors[name](x)
                        alarm = monitors[name].drift_detected
                    else:
                        alarm = detector.update(x)
                    elapsed += time.perf_counter() - started
                    calls += 1
                    if alarm and batch < args.onset:
                        early += 1
                    if alarm and batch >= args.onset:
                        delay = batch - args.onset + 1
                        break
                rows.append({"shift": kind, "strength": strength, "detector": name, "delay_batches": delay,
                             "alarms_before_onset": early, "ms_per_batch": 1e3 * elapsed / calls})
    return rows, calibration


def false_alarms(args):
    rows = []
    source = Source(0)
    model = small_mlp()
    # Each configured rate is measured over several calibrations (monitor seed
    # and calibration data differ), since the achieved rate varies with them.
    for ert, batches, seeds, window_kind, batch, read_every in args.false_alarm_runs:
        alarms, reasons, elapsed, calibration_s, per_seed = 0, {}, 0.0, [], []
        for seed in range(seeds):
            source = Source(seed)
            monitor, calibration, seconds = make_monitor(model, source, args, ert, seed=seed,
                                                         window_kind=window_kind, batch=batch, read_every=read_every)
            calibration_s.append(seconds)
            started = time.perf_counter()
            seed_alarms = 0
            with torch.no_grad():
                for _ in range(batches):
                    before = monitor.alarms
                    monitor(source.sample(batch))
                    if monitor.alarms > before:  # an alarm raised on this batch (read_every: on a read one)
                        seed_alarms += 1
                        for reason in monitor.last_report.reasons:
                            reasons[reason] = reasons.get(reason, 0) + 1
            elapsed += time.perf_counter() - started
            monitor.remove()  # the next calibration watches the same model: no stale hooks
            alarms += seed_alarms
            per_seed.append(seed_alarms)
        total = batches * seeds
        sparse = f", read_every={read_every}" if read_every > 1 else ""
        rows.append({"detector": f"selfheal DriftMonitor ({window_kind}, batch {batch}{sparse})",
                     "configured_per_10k": 1e4 / ert, "batches": total,
                     "calibrations": seeds, "alarms": alarms, "alarms_per_calibration": per_seed,
                     "measured_per_10k": 1e4 * alarms / total, "reasons": reasons, "ratio": (alarms / total) * ert,
                     "calibration_s": statistics.median(calibration_s),
                     "tail_extrapolated": calibration.tail_extrapolated, "ms_per_batch": 1e3 * elapsed / total})
    source = Source(0)
    reference = torch.cat([source.sample(args.batch) for _ in range(args.window // args.batch + 1)])
    for detector in (KSBonferroniDetector(reference, args.window), MMDPermutationDetector(reference, args.window)):
        alarms = 0
        batches = args.baseline_clean_batches
        for _ in range(batches):
            alarms += detector.update(source.sample(args.batch))
        rows.append({"detector": detector.name, "configured_per_10k": None, "batches": batches, "alarms": alarms,
                     "measured_per_10k": 1e4 * alarms / batches})
    return rows


def overhead(args):
    """Forward latency with the monitor attached, reading every batch, one in
    8 and one in 32 (``read_every``), against the plain model: copies of the
    model called interleaved round-robin in one run; time per batch is the
    median over blocks of 32 consecutive batches of the block mean."""
    torch.manual_seed(0)
    models = {
        "MLP 784-1024-1024-10": (nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                               nn.Linear(1024, 10)).eval(), (784,)),
        "MLP 64-512-512-10": (nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                            nn.Linear(512, 10)).eval(), (64,)),
        "CNN 3x32x32 (3 conv + head)": (nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 10)).eval(), (3, 32, 32)),
    }
    rows = []
    for name, (model, shape) in models.items():
        generator = torch.Generator().manual_seed(0)
        calibration = [torch.randn(256, *shape, generator=generator) for _ in range(20)]
        # Fresh healthy batches: repeating one batch would fill the window with
        # copies, raise an alarm each batch and time the attribution as well.
        inputs = [torch.randn(256, *shape, generator=generator) for _ in range(8)]
        configurations = {"plain": (_no_grad(model), inputs)}
        monitors = {}
        for read_every in OVERHEAD_READ_EVERY:
            monitor = sh.DriftMonitor(copy.deepcopy(model), window=1024, false_alarm_every=10_000,
                                      bootstrap=2000, read_every=read_every)
            monitor.calibrate(calibration)
            monitors[read_every] = monitor
            configurations[f"read_every={read_every}"] = (_no_grad(monitor), inputs)
        block = max(OVERHEAD_READ_EVERY)
        repeats = block * args.overhead_blocks * (1 if name.startswith("CNN") else 4)
        samples = interleaved(configurations, repeats)
        base = summary(samples["plain"], block)
        for read_every, monitor in monitors.items():
            watched = summary(samples[f"read_every={read_every}"], block)
            rows.append({"model": name, "batch": 256, "taps": monitor.tap_names, "read_every": read_every,
                         "features": sum(monitor.calibration.features.values()), "alarms": monitor.alarms,
                         "reads": monitor.batches_seen, "forward_ms": 1e3 * base["per_batch"],
                         "with_monitor_ms": 1e3 * watched["per_batch"],
                         "overhead_pct": 100 * (watched["per_batch"] / base["per_batch"] - 1),
                         "forward_p95_ms": 1e3 * base["p95"], "with_monitor_p95_ms": 1e3 * watched["p95"]})
    return rows


def _no_grad(function):
    def call(x):
        with torch.no_grad():
            return function(x)
    return call


def _table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append(f"{value:.3g}" if isinstance(value, float) else ("missed" if value is None and
                                                                            column == "delay_batches" else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/monitor_cpu.json")
    parser.add_argument("--sections", default="detection,false_alarms,overhead",
                        help="comma-separated subset of detection,false_alarms,overhead")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"detection", "false_alarms", "overhead"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch, args.window, args.calibration, args.ert = 64, 256, 8192, 10_000
    args.onset, args.horizon = 40, 20 if args.quick else 200
    args.false_alarm_runs = [(100, 300, 1, "sliding", 64, 1), (100, 300, 1, "sliding", 64, 4)] if args.quick else [
        (1_000, 10_000, 4, "sliding", 64, 1), (10_000, 25_000, 4, "sliding", 64, 1),
        (1_000, 10_000, 4, "exponential", 64, 1), (1_000, 10_000, 4, "sliding", 16, 1),
        (1_000, 20_000, 4, "sliding", 64, SPARSE_READ_EVERY)]
    args.baseline_clean_batches = 40 if args.quick else 1_000
    args.overhead_blocks = 1 if args.quick else 3

    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "settings": {"batch": args.batch, "window": args.window, "calibration_samples": args.calibration,
                            "false_alarm_every": args.ert, "onset": args.onset, "horizon": args.horizon}}
    if "detection" in sections:
        detection_rows, calibration = detection(args)
        results["detection"] = detection_rows
        results["calibration"] = {"window_threshold": calibration.window_threshold,
                                  "cusum_threshold": calibration.cusum_threshold,
                                  "bootstrap_windows": calibration.bootstrap_windows}
        print("## Detection delay (batches of 64 after onset; ERT 10,000 for the monitor)\n")
        print(_table(detection_rows, ["shift", "strength", "detector", "delay_batches", "alarms_before_onset",
                                      "ms_per_batch"]))
    if "false_alarms" in sections:
        results["false_alarms"] = false_alarms(args)
        print("\n## False alarms on clean streams\n")
        print(_table(results["false_alarms"], ["detector", "configured_per_10k", "calibrations", "batches",
                                               "alarms", "alarms_per_calibration", "measured_per_10k", "ratio",
                                               "calibration_s", "ms_per_batch"]))
    if "overhead" in sections:
        results["overhead"] = overhead(args)
        print("\n## Monitor overhead on the forward pass (CPU, batch 256; per batch: median over blocks of 32 "
              "batches of the block mean; p95: single batches)\n")
        print(_table(results["overhead"], ["model", "features", "read_every", "forward_ms", "with_monitor_ms",
                                           "overhead_pct", "forward_p95_ms", "with_monitor_p95_ms"]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    if any(not math.isfinite(row["overhead_pct"]) for row in results.get("overhead", [])):
        sys.exit("non-finite overhead measurement")


if __name__ == "__main__":
    main()
