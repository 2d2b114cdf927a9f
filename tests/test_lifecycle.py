"""A deferred healer's lifecycle: close(), the context manager, garbage
collection and interpreter exit (selfheal_ext/deferred.py)."""
import copy
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from selfheal_ext import SelfHealer
from healing_data import Task, trained_model

TESTS = Path(__file__).resolve().parent
MONITOR = dict(window=128, false_alarm_every=100, bootstrap=200)


@pytest.fixture(scope="module")
def source_model():
    return trained_model(Task())


def deferred_workers():
    return [t for t in threading.enumerate() if t.name == "selfheal-deferred" and t.is_alive()]


def adapting_healer(source_model, task):
    healer = SelfHealer(copy.deepcopy(source_model), mode="deferred", lr=1e-2, monitor_options=MONITOR)
    healer.calibrate([task.sample(64)[0] for _ in range(12)])
    for _ in range(30):
        healer(task.sample(64, corrupt=True)[0])
        if healer._worker is not None:
            break
    assert healer.active and healer._worker is not None
    return healer


def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_a_deferred_healer_left_running_never_aborts_the_interpreter():
    # Five processes at once, each exiting with an adapting, unclosed healer
    # and batches still queued (SIGABRT "terminate called without an active
    # exception" in most runs before the exit hook existed).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]), OMP_NUM_THREADS="1")
    children = [subprocess.Popen([sys.executable, str(TESTS / "deferred_exit_child.py"), how], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for how in ("exit", "exit", "exit", "exit", "drop")]
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0 and "done" in out, (child.returncode, err[-2000:])
        assert "terminate called" not in err, err[-2000:]


def test_dropped_healers_are_collected_and_their_workers_end(source_model):
    task = Task()
    before = len(deferred_workers())
    for _ in range(3):
        healer = adapting_healer(source_model, task)
        assert len(deferred_workers()) == before + 1
        del healer
        gc.collect()
        assert wait_for(lambda: len(deferred_workers()) == before), len(deferred_workers())


def test_the_context_manager_closes_and_close_is_idempotent(source_model):
    task = Task()
    before = len(deferred_workers())
    with adapting_healer(source_model, task) as healer:
        assert len(deferred_workers()) == before + 1
    assert healer._worker is None and len(deferred_workers()) == before
    healer.close()
    healer.close()
    x = task.sample(64, corrupt=True)[0]
    assert healer(x).shape == (64, 5)  # still serves after close()
    healer.close()

    with pytest.raises(RuntimeError, match="inside"):
        with adapting_healer(source_model, task) as failing:
            raise RuntimeError("inside")
    assert failing._worker is None and len(deferred_workers()) == before


def test_a_dropped_healer_is_freed_by_reference_counting_alone(source_model):
    # No reference cycle keeps a healer (or its parts) alive: with the cyclic
    # collector off, dropping the last reference frees it at once, so the
    # deferred worker's finalizer fires without waiting for a gc pass.
    import weakref
    task = Task()
    for mode in ("inline", "deferred"):
        healer = SelfHealer(copy.deepcopy(source_model), mode=mode, lr=1e-2, monitor_options=MONITOR)
        healer.calibrate([task.sample(64)[0] for _ in range(12)])
        for _ in range(8):
            healer(task.sample(64, corrupt=True)[0])
        healer.close()
        gc.collect()
        gc.disable()
        try:
            alive = weakref.ref(healer)
            del healer
            assert alive() is None, mode
        finally:
            gc.enable()
