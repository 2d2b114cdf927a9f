"""Two processes on gloo: counts merged with all_reduce, one decision everywhere,
and the same decisions as one process seeing both ranks' batches."""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import selfheal_ext as sh
from gloo_ranks import run_ranks

WORLD = 2
BATCHES = 14


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _rank_batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randn(16, 8, generator=generator) for _ in range(BATCHES)]
    for x in batches[BATCHES // 2:]:
        x.add_(0.8)  # drift from the middle of the stream on
    return batches


def _monitor(group=None):
    return sh.DriftMonitor(_model(), window=64, false_alarm_every=100_000, bootstrap=1000, process_group=group)


def _worker(rank, out_dir):
    monitor = _monitor(dist.group.WORLD)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank calibrates on its own data...
    monitor.calibrate([torch.randn(32, 8, generator=generator) for _ in range(20)])
    if rank == 0:
        torch.save(monitor.state_dict(), os.path.join(out_dir, "calibrated.pt"))
    records = []
    for x in _rank_batches(rank):
        report = monitor(x)
        report = monitor.last_report
        records.append((report.drift, report.reasons, report.score, report.cusum, report.samples))
    counts = monitor._window.totals()[0].clone()
    torch.save({"records": records, "counts": counts, "lo": monitor.lo},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_gloo_ranks_take_the_decisions_of_one_process(tmp_path):
    run_ranks(_worker, tmp_path, WORLD)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # ...but rank 0's reference is shared, so every rank holds the same one.
    assert torch.equal(rank0["lo"], rank1["lo"])
    assert rank0["records"] == rank1["records"]
    assert torch.equal(rank0["counts"], rank1["counts"])

    single = _monitor()
    single.load_state_dict(torch.load(tmp_path / "calibrated.pt", weights_only=False))
    records = []
    for x0, x1 in zip(_rank_batches(0), _rank_batches(1)):
        single(torch.cat([x0, x1]))
        report = single.last_report
        records.append((report.drift, report.reasons, report.score, report.cusum, report.samples))
    assert torch.equal(single._window.totals()[0], rank0["counts"])
    for merged, alone in zip(rank0["records"], records):
        assert merged[0] == alone[0] and merged[1] == alone[1] and merged[4] == alone[4] == 32
        assert merged[2] == pytest.approx(alone[2], rel=1e-9, abs=1e-12)
        assert merged[3] == pytest.approx(alone[3], rel=1e-9, abs=1e-12)
    assert any(record[0] for record in records[BATCHES // 2:])
