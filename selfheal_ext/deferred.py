"""The background thread of a deferred healer, and its lifecycle.

The thread owns its stop flag and holds its healer only by a weak reference
(a strong one only while it runs a step), so:

- a healer that is dropped without ``close()`` is garbage-collected, and a
  ``weakref.finalize`` on it sets the stop flag: its thread ends within one
  queue poll (50 ms);
- at interpreter exit an ``atexit`` hook stops every live worker and joins
  it. The threads are daemons, so Python's own shutdown would not wait for
  them; a daemon thread still inside torch when the interpreter finalises
  is torn down by a forced unwind through torch's C++ frames, which aborts
  the process ("terminate called without an active exception"). The hook
  is registered when this module is first imported, after torch, so it runs
  before torch's own exit handlers.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from typing import Callable

# How long interpreter exit waits for the workers' current steps, in total.
_EXIT_JOIN_SECONDS = 30.0
# How often an idle worker looks at its stop flag.
_POLL_SECONDS = 0.05

_live_workers: "set[DeferredWorker]" = set()
_live_lock = threading.Lock()


class DeferredWorker:
    """Runs ``step(owner, item)`` for each item of ``work_queue`` on a daemon
    thread until stopped, until ``step`` returns False, or until ``owner`` is
    garbage-collected. Nothing here refers to ``owner`` strongly."""

    def __init__(self, owner, work_queue: "queue.Queue", step: Callable[[object, object], bool],
                 name: str = "selfheal-deferred"):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_run, args=(weakref.ref(owner), work_queue, self.stop, step),
                                       name=name, daemon=True)
        # (stop is an Event, not a method of self: the finalizer keeps its
        # callable alive, and must not keep anything that refers to owner)
        self._finalizer = weakref.finalize(owner, self.stop.set)
        self._finalizer.atexit = False  # _stop_all_at_exit joins as well

    def start(self) -> None:
        with _live_lock:
            _live_workers.add(self)
        self.thread.start()

    def halt(self, timeout: float | None = None) -> None:
        """Sets the stop flag and waits for the thread (unless called from it)."""
        self.stop.set()
        self._finalizer.detach()
        if self.thread is not threading.current_thread() and self.thread.is_alive():
            self.thread.join(timeout)
        with _live_lock:
            _live_workers.discard(self)


def _run(owner_ref, work_queue: "queue.Queue", stop: threading.Event, step) -> None:
    while not stop.is_set():
        try:
            item = work_queue.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue
        owner = owner_ref()
        try:
            if owner is None or not step(owner, item):
                return
        finally:
            owner = None  # between items the thread must not keep its healer alive
            work_queue.task_done()


def _stop_all_at_exit() -> None:
    with _live_lock:
        workers = list(_live_workers)
    for worker in workers:
        worker.stop.set()
    deadline = time.monotonic() + _EXIT_JOIN_SECONDS
    for worker in workers:
        worker.halt(timeout=max(0.0, deadline - time.monotonic()))


atexit.register(_stop_all_at_exit)
