"""Runs a function on several gloo ranks, one spawned process each, for the
distributed tests.

Every rank is joined on its own (no rank is killed because another one died),
a dead peer fails the others within the process-group timeout, and a rank that
dies on a signal leaves its Python stacks (faulthandler) for the failure
message. Twice in CI a gloo rank died with SIGABRT ("terminate called without
an active exception") at the end of its run, by all signs in torch's teardown
(not reproduced here; the old test kept no stacks).
The ranks therefore leave with ``os._exit`` after ``destroy_process_group``,
and a rank that still dies after it finished and passed the final barrier
gives the test a warning with its stacks rather than a failure; a death any
earlier fails it."""

import datetime
import faulthandler
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=120)


def _entry(worker, rank, world, out_dir):
    faults = open(os.path.join(out_dir, f"rank{rank}.faults"), "w")
    faulthandler.enable(file=faults, all_threads=True)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init')}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        torch.set_num_threads(1)
        worker(rank, out_dir)
        # nobody tears the group down while another rank still uses it
        dist.barrier()
        open(os.path.join(out_dir, f"rank{rank}.done"), "w").close()
    finally:
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr, faults):  # os._exit flushes nothing
        stream.flush()
    os._exit(0)


def run_ranks(worker, out_dir, world=2, timeout_s=600):
    """Runs ``worker(rank, out_dir)`` (a module-level function) on ``world``
    gloo ranks and fails unless every rank finished."""
    out_dir = str(out_dir)
    context = mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(worker, rank, world, out_dir)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    report = []
    for rank, p in enumerate(procs):
        path = os.path.join(out_dir, f"rank{rank}.faults")
        stacks = open(path).read().strip() if os.path.exists(path) else ""
        done = os.path.exists(os.path.join(out_dir, f"rank{rank}.done"))
        report.append((done, p.exitcode, f"rank {rank}: exit code {p.exitcode}, finished {done}\n{stacks}"))
    text = "\n".join(line for _, _, line in report)
    assert all(done for done, _, _ in report), "a rank did not finish its work:\n" + text
    if any(code != 0 for _, code, _ in report):
        warnings.warn("a rank died in process-group teardown after finishing its work:\n" + text)
