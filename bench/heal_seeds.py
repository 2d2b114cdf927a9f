"""The healing benchmark over several seeds: each seed is a fresh model
(trained from that seed), fresh calibration data and fresh drift streams, so
a lead that holds over seeds is not one model's or one stream's luck.

Runs ``bench/bench_heal.py --seed S --out DIR/seed_S.json`` for every seed
whose result is not in DIR yet (so an interrupted run resumes), then prints,
per task and protocol: every method's accuracy averaged over the seeds,
SelfHealer's margin over the best baseline (mean, range over seeds, seeds
where it leads), and its worst margin over the source model.

    python bench/heal_seeds.py --seeds 5-9 --dir bench/results/heal_seeds
    python bench/heal_seeds.py --seeds 0,1 --dir DIR --tasks tabular
    python bench/heal_seeds.py --dir DIR --no-run      # summarise what DIR holds
    python bench/heal_seeds.py --quick --seeds 0-1 --dir DIR   # smoke run (CI)

A DIR holds one kind of run: a --quick result is not marked as such, so do
not mix quick and full runs in one DIR.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_heal import METHODS, TASKS  # noqa: E402

BASELINES = [m for m in METHODS if m not in ("source", "SelfHealer")]


def parse_seeds(text):
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            if int(high) < int(low):
                raise argparse.ArgumentTypeError(f"empty seed range {part!r}")
            seeds.extend(range(int(low), int(high) + 1))
        else:
            seeds.append(int(part))
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and at least one: {text!r}")
    return seeds


def run_seed(seed, path, tasks, quick=False):
    command = [sys.executable, os.path.join(HERE, "bench_heal.py"), "--seed", str(seed), "--tasks", tasks,
               "--out", path + ".partial"] + (["--quick"] if quick else [])
    print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
    log_path = path[:-len(".json")] + ".log"
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log_path) as log:
            tail = log.readlines()[-40:]
        sys.exit(f"seed {seed} failed (exit {code}); the end of {log_path}:\n" + "".join(tail))
    os.replace(path + ".partial", path)  # a result file is always a whole run


def load(directory, seeds=None):
    """{seed: bench_heal result list} for the seeds asked (all in DIR if None)."""
    found = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("seed_") and name.endswith(".json"):
            seed = int(name[len("seed_"):-len(".json")])
            if seeds is None or seed in seeds:
                with open(os.path.join(directory, name)) as handle:
                    found[seed] = json.load(handle)
    return found


def table(found, task):
    """Markdown rows for one task over the seeds that ran it; None if none did."""
    per_seed = {}  # protocol -> list of (seed, means)
    clean = []
    for seed, data in sorted(found.items()):
        for results, summary in zip(data["results"], data["summary"]):
            if results["task"] != task:
                continue
            clean.append(results["clean_accuracy"])
            for entry in summary:
                per_seed.setdefault(entry["protocol"], []).append((seed, entry["means"]))
            # forgetting: clean data served after the continual stream
            per_seed.setdefault("clean after continual", []).append((seed, results["clean_after_continual"]))
    if not per_seed:
        return None
    seeds = sorted({seed for rows in per_seed.values() for seed, _ in rows})
    protocols = list(per_seed)
    lines = [f"### {task}: seeds {', '.join(map(str, seeds))} (clean accuracy {100 * statistics.mean(clean):.1f} %)",
             "", "| method | " + " | ".join(protocols) + " |", "|---|" + "---|" * len(protocols)]
    for method in METHODS:
        cells = []
        for protocol in protocols:
            if any(method not in means for _, means in per_seed[protocol]):
                cells.append("not run")  # a result from before the method joined the benchmark
                continue
            values = [means[method] for _, means in per_seed[protocol]]
            cells.append("fails" if any(v is None for v in values) else f"{100 * statistics.mean(values):.1f} %")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| protocol | SelfHealer − best baseline: mean (range) | best baseline | leads on "
              "| SelfHealer − source: worst seed |", "|---|---|---|---|---|"]
    for protocol, rows in per_seed.items():
        lines.append(f"| {protocol} | " + " | ".join(_margins(rows)) + " |")
    return "\n".join(lines)


def _margins(rows):
    """SelfHealer against the best baseline of each seed, and against the source."""
    margins, floors, best = [], [], []
    for _, means in rows:
        ran = {b: means[b] for b in BASELINES if means.get(b) is not None}
        if means["SelfHealer"] is None:
            continue
        if ran:
            leader = max(ran, key=ran.get)
            margins.append(means["SelfHealer"] - ran[leader])
            best.append(leader)
        floors.append(means["SelfHealer"] - means["source"])
    lead = (f"{100 * statistics.mean(margins):+.1f} ({100 * min(margins):+.1f} to {100 * max(margins):+.1f})"
            if margins else "no baseline runs")
    leaders = ", ".join(sorted(set(best), key=best.index)) if best else "—"
    leads = f"{sum(m > 0 for m in margins)} of {len(margins)}" if margins else "—"
    floor = f"{100 * min(floors):+.1f}" if floors else "—"
    return [lead, leaders, leads, floor]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=parse_seeds, default=None, help="e.g. 5-9 or 0,2,4 (default: all in DIR)")
    parser.add_argument("--dir", required=True, help="where each seed's JSON (and log) goes")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--no-run", action="store_true", help="only summarise the results already in DIR")
    parser.add_argument("--quick", action="store_true", help="bench_heal.py --quick for each seed (a smoke run)")
    args = parser.parse_args()
    unknown = sorted(set(args.tasks.split(",")) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    os.makedirs(args.dir, exist_ok=True)
    if args.seeds is not None and not args.no_run:
        for seed in args.seeds:
            path = os.path.join(args.dir, f"seed_{seed}.json")
            if not os.path.exists(path):
                run_seed(seed, path, args.tasks, args.quick)
    found = load(args.dir, None if args.seeds is None else set(args.seeds))
    missing = sorted(set(args.seeds or []) - set(found))
    if missing:
        sys.exit(f"no results for seeds {missing} in {args.dir} (run without --no-run)")
    if not found:
        sys.exit(f"no seed_*.json results in {args.dir}")
    printed = False
    for task in args.tasks.split(","):
        rows = table(found, task)
        if rows:
            print(rows + "\n")
            printed = True
    if not printed:
        sys.exit(f"no results for tasks {args.tasks} in {args.dir}")
    print("Accuracy averaged over the shifts of each protocol, then over the seeds. "
          "Margins in points, per seed; a seed's margin compares protocol averages of the same run.")


if __name__ == "__main__":
    main()
