"""The progress poller: one thread for every training run. It fetches each run's rank 0
`/progress` (status.podIP and the container port named `progress`, as on any cluster; no
Kubernetes API call) at most once per `progressIntervalSeconds`, keeps the last answer, and
wakes the run's reconcile, which turns it into status (observe.py). A few worker threads do
the HTTP GETs, each bounded by a short timeout, so one unreachable pod never holds up others.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flywheel_trainer.contract import Progress

from .metrics import POLLS
from .observe import Polled
from .vocab import Key, format_time
from .waker import pop_due


def fetch(url: str, timeout: float) -> dict:
    """Rank 0's progress document (checked against the contract)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (pod URL)
        doc = json.loads(response.read(1 << 20))
    return Progress.model_validate(doc).model_dump(exclude_unset=True)


class Poller(threading.Thread):
    def __init__(self, interval: float, on_update: Callable[[Key], None], workers: int = 16,
                 timeout: float = 2.0, get: Callable[[str, float], dict] = fetch) -> None:
        super().__init__(daemon=True, name="flywheel-progress")
        self.interval, self.on_update, self.timeout, self.get = interval, on_update, timeout, get
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flywheel-poll")
        self.targets: dict[Key, tuple[int, str]] = {}  # key -> (attempt, url)
        self.state: dict[Key, Polled] = {}
        self.heap: list[tuple[float, Key]] = []
        self.cv = threading.Condition()
        self.started = False
        self.paused = False

    # --- what reconciles tell it
    def want(self, key: Key, attempt: int, url: str) -> None:
        """Poll `url` for this attempt (a new attempt or address is polled at once)."""
        with self.cv:
            if self.paused or self.targets.get(key) == (attempt, url):
                return
            self.targets[key] = (attempt, url)
            heapq.heappush(self.heap, (time.monotonic(), key))
            self.cv.notify()
            if not self.started:
                self.started = True
                self.start()

    def drop(self, key: Key) -> None:
        with self.cv:
            self.targets.pop(key, None)
            self.state.pop(key, None)

    def pause(self) -> None:
        """Poll nothing (a standby replica): every target is forgotten; reconciles after the
        resume ask again for the runs still training."""
        with self.cv:
            self.paused = True
            self.targets.clear()
            self.state.clear()
            self.heap.clear()

    def resume(self) -> None:
        with self.cv:
            self.paused = False

    def polled(self, key: Key) -> Polled | None:
        """The last poll of the run's rank 0 (its `attempt` says which attempt's)."""
        with self.cv:
            return self.state.get(key)

    # --- the loop
    def run(self) -> None:
        while True:
            with self.cv:
                _, key = pop_due(self.heap, self.cv)
                target = self.targets.get(key)
            if target is not None:
                self.pool.submit(self.poll, key, *target)

    def poll(self, key: Key, attempt: int, url: str) -> None:
        now = format_time()
        POLLS.inc()
        try:
            doc, error = self.get(url, self.timeout), None
        except Exception as err:  # unreachable, refused, not JSON: all mean "no answer"
            doc, error = None, f"{type(err).__name__}: {err}"[:200]
        with self.cv:
            if self.targets.get(key) != (attempt, url):
                return  # dropped or moved on meanwhile
            old = self.state.get(key)
            if old is not None and old.attempt != attempt:
                old = None
            self.state[key] = Polled(
                attempt=attempt, doc=doc if doc is not None else (old.doc if old else None),
                fetched_at=now if doc is not None else (old.fetched_at if old else None),
                polled_at=now, error=error,
                first_polled_at=old.first_polled_at if old and old.first_polled_at else now)
            heapq.heappush(self.heap, (time.monotonic() + self.interval, key))
            self.cv.notify()
        self.on_update(key)
