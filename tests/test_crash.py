"""Crash safety: a real child process adapting with an audit log and a
snapshot store is killed with SIGKILL at several moments; the log must open,
verify, and hold every record the child saw committed; every snapshot file
must load and match its name."""
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from selfheal_ext.governance import AuditLog, SnapshotStore

CHILD = textwrap.dedent("""
    import copy, sys, torch
    sys.path.insert(0, {tests!r})
    from healing_data import Task, trained_model
    from selfheal_ext import SelfHealer
    torch.set_num_threads(1)
    task = Task()
    healer = SelfHealer(trained_model(task), audit={db!r}, keep_versions=4,
                        monitor_options=dict(window=256, false_alarm_every=200, bootstrap=400))
    healer.calibrate([task.sample(64)[0] for _ in range(24)])
    batch = 0
    while True:
        x, _ = task.sample(64, corrupt=True)
        healer(x)
        if batch % 3 == 0:
            healer.snapshot()
        batch += 1
        last = healer.audit.records(newest_first=True, limit=1)
        print(last[0].seq if last else 0, flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("delay", [0.0, 0.37, 1.1])
def test_sigkill_during_adaptation_leaves_a_valid_log_and_snapshots(tmp_path, delay):
    db = tmp_path / "audit.db"
    tests = os.path.dirname(os.path.abspath(__file__))
    errors = open(tmp_path / "child.stderr", "w+")
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=tests, db=str(db))],
                             stdout=subprocess.PIPE, stderr=errors, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    try:
        seen = []
        deadline = time.monotonic() + 240
        while len(seen) < 8:  # adapting for a few batches
            if time.monotonic() > deadline or not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                pytest.fail("child made no progress in 240 s")
            line = child.stdout.readline()
            if not line:
                errors.seek(0)
                pytest.fail(f"child ended early: {errors.read()[-2000:]}")
            seen.append(int(line))
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        rest = child.stdout.read()
        seen.extend(int(v) for v in rest.split())
    finally:
        if child.poll() is None:
            child.kill()
        selector.close()
        child.stdout.close()
        errors.close()
    assert child.returncode == -signal.SIGKILL

    for readonly in (True, False):  # an inspector, then a process taking over the log
        log = AuditLog(db, readonly=readonly)
        result = log.verify()
        assert result.ok, result.reason
        # every record the child had seen committed survived the kill
        assert result.records >= max(seen) > 0
        kinds = {r.kind for r in log.records()}
        assert {"drift", "activate", "step", "snapshot"} <= kinds
        log.close()
    log = AuditLog(db)
    log.append("recovered", after=result.records)  # the chain goes on from the last record
    assert log.verify().ok
    store = SnapshotStore(str(db) + ".snapshots")
    assert store.digests()
    for digest in store.digests():
        tensors, _ = store.load(digest)  # loads, and its content matches its name
        assert tensors
    audited = {r.state_hash for r in log.records(kinds=["snapshot"])}
    # retention deletes old versions; the newest audited snapshot is always there
    newest = log.records(kinds=["snapshot"], newest_first=True, limit=1)[0].state_hash
    assert newest in store.digests() and newest in audited
    # (the figures docs/reliability.md quotes; shown with pytest -s)
    print(f"SIGKILL after {delay} s: {result.records} records verified, {max(seen)} seen committed, "
          f"{len(store.digests())} snapshot files loaded and checked")
