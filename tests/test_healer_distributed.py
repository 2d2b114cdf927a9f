"""SelfHealer on two gloo ranks: one drift decision, identical adapter weights
on every rank after healing steps (gradients averaged with all_reduce)."""

import os

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_ranks
from healing_data import Task, trained_model
from selfheal_ext import SelfHealer

WORLD = 2


def _worker(rank, out_dir):
    model = trained_model(Task())
    healer = SelfHealer(model, process_group=dist.group.WORLD,
                        monitor_options=dict(window=128, false_alarm_every=200, bootstrap=400))
    task = Task(seed=1)
    task.generator.manual_seed(500 + rank)  # each rank serves its own traffic
    healer.calibrate([task.sample(32)[0] for _ in range(20)])
    for i in range(14):
        size = 32 if i != 5 else (32 if rank == 0 else 1)  # uneven batches once
        x, _ = task.sample(size, corrupt=True)
        if rank == 1 and i == 7:
            x[:] = float("nan")  # a rank with nothing usable still joins the step
        if rank == 0 and i == 9:
            x = x[:0]  # an empty batch still joins the collectives
        healer(x)
    # classes in runs: the label-shift guard and the batch-statistics
    # check (collectives) decide for both ranks, also when one rank's
    # batch is too small to check on its own
    for label in range(3):
        for i in range(4):
            size = 4 if (rank == 1 and label == 1 and i == 2) else 32
            healer(task.sample(size, corrupt=True, labels=torch.full((size,), label))[0])
    torch.save({"adapters": healer.adapters.state_dict(), "steps": healer.steps, "active": healer.active,
                "drift": [e.batch for e in healer.events if e.kind == "activate"],
                "diversity": healer.batch_check.levels,
                "decisions": [(e.batch, e.kind) for e in healer.events if e.kind in ("step", "skip")]},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_heal_in_lockstep(tmp_path):
    run_ranks(_worker, tmp_path, WORLD)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["active"] and rank1["active"] and rank0["drift"] == rank1["drift"]
    assert rank0["steps"] == rank1["steps"] > 0
    assert rank0["diversity"] == rank1["diversity"] is not None  # calibrated on merged sums
    assert rank0["decisions"] == rank1["decisions"]
    assert any(kind == "skip" for _, kind in rank0["decisions"])
    for name, value in rank0["adapters"].items():  # running statistics merged over the ranks too
        assert torch.equal(value, rank1["adapters"][name]), name
    adapters = rank0["adapters"]
    assert any("running" in name and not torch.equal(value, adapters[name.replace("running", "source")])
               for name, value in adapters.items())  # (the statistics did move)
    assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in rank0["adapters"].items() if n.endswith("gamma"))
