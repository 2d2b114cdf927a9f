"""Label-free accuracy estimates and the harmful-only alarm mode on the
healing benchmark's shifts (bench_heal.py's tasks, models and streams).

For each task and seed, the source model is trained as in bench_heal.py and a
``DriftMonitor`` is calibrated on the labelled calibration split with
``alarm_min_drop`` set. Each shift (and clean data) is served as a stream of
batches of 64 with the monitor reset before it. Reported per shift:

* the source model's true accuracy on the stream, and its drop from the
  clean stream's accuracy;
* each estimator's window estimate (average confidence, ATC, DoC; see
  selfheal_ext/accuracy_estimate.py), averaged over the batches read once the
  window is full, and its absolute error against the true accuracy;
* the alarm rate (share of batches) of the plain monitor (every test's alarm)
  and of the harmful-only mode (alarms whose estimated drop reaches
  ``alarm_min_drop``), beside whether the shift's true drop is above it.

    python bench/bench_estimates.py              # seeds 0 and 1, both tasks, every shift at both strengths
    python bench/bench_estimates.py --quick      # smoke run
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import selfheal_ext as sh  # noqa: E402
from bench_heal import (DIGIT_SHIFTS, TABULAR_SHIFTS, digits_model, digits_task, make_stream,  # noqa: E402
                        tabular_model, tabular_task, train)

ESTIMATORS = ("confidence", "atc", "doc")


def source_model(task_name, seed, epochs):
    if task_name == "digits":
        task = digits_task(seed)
        model = train(digits_model(task["classes"]), task, epochs=epochs, augment=True, seed=seed)
        return task, model, DIGIT_SHIFTS, 128
    task = tabular_task(seed)
    model = train(tabular_model(task["classes"]), task, epochs=max(1, epochs // 3), augment=False, seed=seed)
    return task, model, TABULAR_SHIFTS, 512


def serve(monitor, stream):
    """True accuracy, mean window estimates once the window is full, and the
    share of batches with an alarm (raised, or withheld as benign)."""
    monitor.reset()
    correct = total = raised = withheld = 0
    estimates = {name: [] for name in ESTIMATORS}
    with torch.no_grad():
        for x, y in stream:
            logits = monitor(x)
            report = monitor.last_report
            correct += int((logits.argmax(dim=1) == y).sum())
            total += len(y)
            raised += report.drift
            withheld += bool(report.suppressed)
            if not report.warming_up:
                for name in ESTIMATORS:
                    estimates[name].append(report.accuracy_estimates[name])
    return {"accuracy": correct / total, "alarm_rate": (raised + withheld) / len(stream),
            "harmful_alarm_rate": raised / len(stream),
            **{name: statistics.fmean(values) for name, values in estimates.items()}}


def evaluate(task_name, seed, args):
    task, model, shifts, window = source_model(task_name, seed, args.epochs)
    x, y = task["calib"]
    calibration = list(zip(x.split(64), y.split(64)))
    monitor = sh.DriftMonitor(model, window=window, false_alarm_every=args.false_alarm_every,
                              bootstrap=args.bootstrap, alarm_min_drop=args.min_drop)
    report = monitor.calibrate(calibration)
    names = list(shifts)[:2] if args.quick else list(shifts)
    plan = [(None, 0)] + [(name, level) for name in names for level in range(2)]
    rows = []
    for index, (name, level) in enumerate(plan):
        stream = make_stream(task, shifts, name, level, args.batches, 64, seed + 100 + index)
        row = {"task": task_name, "seed": seed, "shift": f"{name}-{level + 1}" if name else "clean",
               **serve(monitor, stream)}
        rows.append(row)
    clean = rows[0]["accuracy"]
    for row in rows:
        row["true_drop"] = clean - row["accuracy"]
        for name in ESTIMATORS:
            row[f"{name}_error"] = abs(row[name] - row["accuracy"])
    return {"rows": rows, "reference_accuracy": report.reference_accuracy}


def tables(results, min_drop):
    rows = [row for result in results for row in result["rows"]]
    lines = ["| task | shift | true acc. | true drop | confidence | ATC | DoC | alarm rate (plain) "
             f"| alarm rate (drop >= {100 * min_drop:.0f} pts) |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(row["task"], row["shift"]) for row in rows}, key=lambda k: (k[0], k[1] != "clean", k[1]))
    summary = []
    for task, shift in keys:
        group = [row for row in rows if (row["task"], row["shift"]) == (task, shift)]
        mean = {key: statistics.fmean(row[key] for row in group) for key in
                ("accuracy", "true_drop", "alarm_rate", "harmful_alarm_rate") + ESTIMATORS}
        summary.append({"task": task, "shift": shift, **mean})
        lines.append(f"| {task} | {shift} | {100 * mean['accuracy']:.1f} | {100 * mean['true_drop']:+.1f} | "
                     + " | ".join(f"{100 * mean[name]:.1f}" for name in ESTIMATORS)
                     + f" | {100 * mean['alarm_rate']:.0f}% | {100 * mean['harmful_alarm_rate']:.0f}% |")
    lines += ["", "| task | estimator | mean absolute error (points) | largest error (points) |", "|---|---|---|---|"]
    for task in sorted({row["task"] for row in rows}):
        group = [row for row in rows if row["task"] == task]
        for name in ESTIMATORS:
            errors = [row[f"{name}_error"] for row in group]
            lines.append(f"| {task} | {name} | {100 * statistics.fmean(errors):.1f} | {100 * max(errors):.1f} |")
    lines += ["", f"| true drop | shifts (task x shift x strength, mean over seeds) | alarm rate (plain) "
              f"| alarm rate (drop >= {100 * min_drop:.0f} pts) |", "|---|---|---|---|"]
    for label, test in ((f"under {100 * min_drop:.0f} pts", lambda d: d < min_drop),
                        (f"{100 * min_drop:.0f} pts or more", lambda d: d >= min_drop)):
        chosen = [row for row in summary if row["shift"] != "clean" and test(row["true_drop"])]
        if chosen:
            lines.append(f"| {label} | {len(chosen)} | {100 * statistics.fmean(r['alarm_rate'] for r in chosen):.0f}% "
                         f"| {100 * statistics.fmean(r['harmful_alarm_rate'] for r in chosen):.0f}% |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", default="digits,tabular")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--min-drop", type=float, default=0.05)
    parser.add_argument("--false-alarm-every", type=float, default=1000)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap windows for the thresholds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.tasks.split(",")) - {"digits", "tabular"})
    if unknown:
        parser.error(f"unknown task(s) {unknown}: choose from digits, tabular")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        seeds = seeds[:1]
    args.epochs = 4 if args.quick else 15
    args.batches = 8 if args.quick else 24
    started = time.perf_counter()
    results = []
    for task in args.tasks.split(","):
        for seed in seeds:
            results.append(evaluate(task, seed, args))
            print(f"{task} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(tables(results, args.min_drop))
    print(f"\n({len(seeds)} seed(s), {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"results": results, "threads": torch.get_num_threads(), "torch": torch.__version__},
                      handle, indent=1)


if __name__ == "__main__":
    main()
