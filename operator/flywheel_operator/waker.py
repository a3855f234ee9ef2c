"""Reconciles on due times, off kopf's own timers: `Waker` keeps a heap of (when, key) and
reconciles each due key on a small worker pool, one at a time per key, retrying a failure
with backoff. `lock` gives each key its own lock (a run's reconcile and a registration of
the same model never interleave)."""

from __future__ import annotations

import heapq
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

from .vocab import Key

log = logging.getLogger("flywheel")
#: Backoff of a failed reconcile: 1 s, doubling, at most this many seconds.
MAX_BACKOFF = 300.0

#: A key's lock lives while a thread holds or waits for it: a fleet's deleted runs leave none.
_locks: weakref.WeakValueDictionary[Hashable, threading.Lock] = weakref.WeakValueDictionary()
_locks_guard = threading.Lock()


def pop_due(heap: list[tuple[float, Key]], cv: threading.Condition) -> tuple[float, Key]:
    """Wait (holding `cv`) until the earliest (when, key) of `heap` is due; pop it."""
    while not heap or heap[0][0] > time.monotonic():
        cv.wait(timeout=(heap[0][0] - time.monotonic()) if heap else None)
    return heapq.heappop(heap)


def lock(key: Hashable) -> threading.Lock:
    """The one lock of `key` (created once, even when two threads ask at the same time; it
    goes when no thread holds it or waits for it)."""
    with _locks_guard:
        if (found := _locks.get(key)) is None:
            found = _locks[key] = threading.Lock()
        return found


def lock_count() -> int:
    return len(_locks)


class Waker(threading.Thread):
    """Reconciles keys when they are due: a heap of (when, key), no finalizers.

    kopf's timers would put a finalizer on every object; this keeps the objects untouched.
    `attempt` runs a reconcile now (in the caller's thread); one that raises comes back after
    1 s, 2 s, 4 s ... `MAX_BACKOFF` until it succeeds. Due keys are reconciled by `workers`
    threads (one slow API call holds up no other run; 1000 runs training send ~33 progress
    wake-ups a second), one at a time per key; the wake-ups that arrive meanwhile collapse
    into one more reconcile.
    """

    def __init__(self, what: str, workers: int = 8) -> None:
        super().__init__(daemon=True, name=f"flywheel-{what}")
        self.what = what
        self.heap: list[tuple[float, Key]] = []
        self.cv = threading.Condition()
        self.reconcile: Callable[[Key], None] | None = None
        self.failures: dict[Key, int] = {}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"flywheel-{what}")
        self.busy: dict[Key, str] = {}  # key -> "waiting", "running" or "again"
        self.due: dict[Key, float] = {}  # key -> when its earliest pending wake-up is due
        self.paused = False

    def start_with(self, reconcile: Callable[[Key], None]) -> None:
        """Reconcile what is due, and what was woken before, with `reconcile`."""
        self.reconcile = reconcile
        self.start()

    def wake(self, key: Key, after: float = 0.0) -> None:
        """Reconcile `key` in `after` seconds: a wake-up already due by then covers this one
        (that reconcile reads the indexes as they are then)."""
        when = time.monotonic() + after
        with self.cv:
            if self.due.get(key, when + 1) <= when:
                return
            self.due[key] = when
            heapq.heappush(self.heap, (when, key))
            if self.heap[0] == (when, key):  # else the thread wakes for an earlier one first
                self.cv.notify()

    def pause(self) -> None:
        """Reconcile nothing until `resume` (pending wake-ups are dropped: the resume wakes
        every key anew, from fresh indexes)."""
        self.paused = True
        with self.cv:
            self.heap.clear()
            self.due.clear()
            self.failures.clear()

    def resume(self) -> None:
        self.paused = False

    def attempt(self, key: Key) -> None:
        assert self.reconcile is not None
        if self.paused:
            return
        try:
            self.reconcile(key)
        except Exception:
            failures = self.failures[key] = self.failures.get(key, 0) + 1
            delay = min(2.0 ** (failures - 1), MAX_BACKOFF)
            log.exception("%s %s/%s: reconcile failed (%d in a row); retrying in %gs",
                          self.what, *key, failures, delay)
            self.wake(key, delay)
        else:
            self.failures.pop(key, None)

    def run(self) -> None:
        while True:
            with self.cv:
                when, key = pop_due(self.heap, self.cv)
                if self.due.get(key) == when:
                    del self.due[key]
                state = self.busy.get(key)
                if state == "running":  # once it is done, again: this wake-up may be news
                    self.busy[key] = "again"
                if state is not None:  # a waiting reconcile will see it anyway
                    continue
                self.busy[key] = "waiting"
            self.pool.submit(self.work, key)

    def work(self, key: Key) -> None:
        """Reconcile `key` until no wake-up arrived meanwhile (one worker per key at a time)."""
        while True:
            with self.cv:
                self.busy[key] = "running"
            self.attempt(key)
            with self.cv:
                if self.busy[key] == "running":
                    del self.busy[key]
                    return
