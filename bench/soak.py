"""Soak: a SelfHealer with an audit log and a snapshot store serves a long
stream on a tiny MLP, with the data drifting on and off, and reports what
grows: resident memory (RSS) at the start and end, events kept in memory,
audit records, snapshot files on disk, adapter versions held.

    OMP_NUM_THREADS=1 python bench/soak.py --batches 100000 --out soak.json
    python bench/soak.py --batches 2000        # smoke run

One thread (torch.set_num_threads(1)); batches of 8 rows of 8 features.
The stream alternates clean and drifted segments (a per-feature affine
corruption) so the healer activates, steps, snapshots, releases and
re-activates throughout.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from selfheal_ext import SelfHealer  # noqa: E402
from selfheal_ext.governance import AuditLog  # noqa: E402

FEATURES, CLASSES, BATCH = 8, 3, 8


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_task(seed: int):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=generator) * 2
    scale = 1 + 0.5 * torch.randn(FEATURES, generator=generator)
    shift = torch.randn(FEATURES, generator=generator)

    def sample(n, corrupt=False):
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        x = centers[y] + torch.randn(n, FEATURES, generator=generator)
        return (x * scale + shift if corrupt else x), y
    return sample


def trained_model(sample):
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        x, y = sample(64)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--segment", type=int, default=2_000, help="batches per clean or drifted segment")
    parser.add_argument("--out", help="JSON file for the figures")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop early after this long (the figures say how many batches ran)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sample = make_task(0)
    model = trained_model(sample)
    with tempfile.TemporaryDirectory() as directory:
        audit = Path(directory) / "audit.db"
        healer = SelfHealer(model, audit=audit, monitor_options=dict(window=256, false_alarm_every=500,
                                                                     bootstrap=500))
        healer.calibrate([sample(64)[0] for _ in range(40)])
        stream = [sample(BATCH)[0] for _ in range(50)], [sample(BATCH, corrupt=True)[0] for _ in range(50)]
        start_rss, start = rss_mib(), time.perf_counter()
        samples = []
        with healer:
            for batch in range(args.batches):
                if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
                    break
                drifted = (batch // args.segment) % 2 == 1
                healer(stream[drifted][batch % 50])
                if batch % (args.batches // 20 or 1) == 0:
                    samples.append({"batch": batch, "rss_mib": round(rss_mib(), 1),
                                    "seconds": round(time.perf_counter() - start, 1)})
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
        wall = time.perf_counter() - start
        served = healer.batches
        snapshot_dir = Path(f"{audit}.snapshots")
        log = AuditLog(audit, readonly=True)
        figures = {
            "batches_requested": args.batches, "batches_served": served, "batch_rows": BATCH,
            "threads": torch.get_num_threads(),
            "wall_s": round(wall, 1), "ms_per_batch": round(1000 * wall / max(served, 1), 3),
            "rss_start_mib": round(start_rss, 1), "rss_end_mib": round(rss_mib(), 1),
            "rss_max_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "events_kept": len(healer.events), "events_recorded": healer.event_count,
            "audit_records": len(log), "audit_verified": log.verify().ok,
            "audit_db_mib": round(audit.stat().st_size / 2**20, 2),
            "snapshot_files": len(list(snapshot_dir.glob("*.safetensors"))),
            "versions_in_memory": len(healer.versions), "steps": healer.steps,
            "activations": sum(1 for r in log.records(kinds=["activate"])),
            "rss_samples": samples,
        }
        log.close()
    print(json.dumps({k: v for k, v in figures.items() if k != "rss_samples"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
