"""Child process of tests/test_lifecycle.py: a deferred healer that is still
adapting when the interpreter exits, never closed. Argument: "exit" (return
from the script) or "drop" (drop the healer, then exit)."""
import sys

import torch

from selfheal_ext import SelfHealer
from healing_data import Task, trained_model


def main(how: str) -> None:
    torch.manual_seed(0)
    task = Task()
    model = trained_model(task)
    healer = SelfHealer(model, mode="deferred", lr=1e-2,
                        monitor_options=dict(window=128, false_alarm_every=100, bootstrap=200))
    healer.calibrate([task.sample(64)[0] for _ in range(12)])
    for _ in range(30):
        healer(task.sample(64, corrupt=True)[0])
    assert healer.active, "the healer never started adapting"
    for _ in range(5):  # batches still queued for the worker at exit
        healer(task.sample(64, corrupt=True)[0])
    if how == "drop":
        del healer
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
