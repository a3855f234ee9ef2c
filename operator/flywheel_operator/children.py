"""The runs' Jobs and Pods, watched without kopf: each watch event is decoded, summarised
(objects.job_summary, pod_summary) into an index by run, and wakes its run.

kopf handles every event of every object it watches through its per-object machinery (a
worker task, a cause, keyword arguments, a logger and a state for each handler): about a
millisecond of one core per event. A run's Job and pods send two to three times as many
events as the run itself, and in a burst of runs that CPU is what new runs wait for
(bench/RESULTS.md, "Burst"). Here an event costs its JSON decoding and a summary. kopf keeps
what it is good at: the runs, Models and schedules, peering, and start-up order; these
watches start, their first lists complete, in the operator's start-up handler, so the
children are known before kopf hands the operator its first run.

A paused replica (peering) keeps watching: the indexes stay fresh for the moment it takes
over, and its paused waker reconciles nothing meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import kube, objects
from .vocab import RUN_LABEL, Key

log = logging.getLogger("flywheel")

#: Seconds after which the apiserver ends a watch (it is then opened again from where it was).
WATCH_SECONDS = 300


class Index:
    """(namespace, run) -> the summaries of the run's Jobs or Pods (by the run's label), read
    as the reconciler reads kopf's indexes: `get(key, default)`, `in`, `len`, iteration.
    Written by one watch thread per namespace, read by the reconcile workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Key, dict[str, Any]] = {}  # run -> {uid: summary}
        self._where: dict[str, tuple[Key, str]] = {}  # uid -> (run, object's name)
        self._names: dict[tuple[str, str], Key] = {}  # (namespace, object's name) -> run

    def get(self, key: Key, default: Any = ()) -> Any:
        with self._lock:
            found = self._runs.get(key)
            return list(found.values()) if found else default

    def run_of(self, namespace: str, name: str) -> Key | None:
        """The run whose label the object `name` carries (Kueue's Workloads name their Job)."""
        return self._names.get((namespace, name))

    def __contains__(self, key: object) -> bool:
        return key in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[Key]:
        with self._lock:
            return iter(list(self._runs))

    def put(self, key: Key, uid: str, name: str, summary: Any) -> Key | None:
        """Keep `summary` of object `uid`; returns the run it was under before, if another
        (a label changed by hand)."""
        with self._lock:
            was = self._drop(uid) if self._where.get(uid, (key,))[0] != key else None
            self._runs.setdefault(key, {})[uid] = summary
            self._where[uid] = (key, name)
            self._names[(key[0], name)] = key
            return was

    def discard(self, uid: str) -> Key | None:
        """Forget object `uid`; returns its run (None if it was not known)."""
        with self._lock:
            return self._drop(uid)

    def _drop(self, uid: str) -> Key | None:
        found = self._where.pop(uid, None)
        if found is None:
            return None
        key, name = found
        run = self._runs.get(key, {})
        run.pop(uid, None)
        if not run:
            self._runs.pop(key, None)
        if self._names.get((key[0], name)) == key:
            del self._names[(key[0], name)]
        return key

    def uids(self, namespace: str | None) -> set[str]:
        """The objects known in `namespace` (None: in all)."""
        with self._lock:
            return {uid for uid, (key, _) in self._where.items()
                    if namespace is None or key[0] == namespace}


class Watch(threading.Thread):
    """One collection (Jobs or Pods with the runs' label) in one namespace, or in all: listed
    once, then watched from the list's resourceVersion for good, again from where it was
    after the apiserver ends a watch or a connection drops, and listed afresh when that
    version is too old (410 Gone); after a list, objects gone meanwhile are forgotten."""

    def __init__(self, index: Index, api_version: str, kind: str, namespace: str | None,
                 summarise: Callable[[dict], Any], wake: Callable[[Key], None]) -> None:
        super().__init__(daemon=True, name=f"flywheel-watch-{kind.lower()}s")
        self.index, self.kind, self.summarise, self.wake = index, kind, summarise, wake
        self.namespace = namespace
        self.path = kube.collection_path(api_version, kube.PLURALS[kind], namespace)
        self.version: str | None = None
        self.stopped = threading.Event()  # ends the thread after the watch it is in

    def list(self) -> None:
        items, self.version = kube.list_all(self.path, RUN_LABEL)
        seen = set()
        for obj in items:
            seen.add(obj["metadata"]["uid"])
            self.apply("ADDED", obj)
        for uid in self.index.uids(self.namespace) - seen:
            if (key := self.index.discard(uid)) is not None:
                self.wake(key)

    def apply(self, kind: str, obj: dict) -> None:
        meta = obj["metadata"]
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        key = (meta["namespace"], run) if run else None
        if kind == "DELETED" or key is None:
            was = self.index.discard(meta["uid"])
        else:
            was = self.index.put(key, meta["uid"], meta["name"], self.summarise(obj))
        for woken in {key, was} - {None}:
            self.wake(woken)

    def run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            try:
                if self.version is None:
                    self.list()
                for event in kube.watch(self.path, RUN_LABEL, self.version, WATCH_SECONDS):
                    obj = event["object"]
                    self.version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self.apply(event["type"], obj)
                    failures = 0
            except kube.Gone:
                self.version = None
            except Exception as err:  # the apiserver away, a dropped connection: again
                failures += 1
                delay = min(0.5 * 2 ** min(failures, 6), 30.0)
                log.warning("watching %s: %s: %s; again in %.1fs", self.path,
                            type(err).__name__, err, delay)
                time.sleep(delay)


class Children:
    """The runs' Jobs and Pods: their indexes, and the watches that keep them."""

    def __init__(self) -> None:
        self.jobs, self.pods = Index(), Index()

    def start(self, namespaces: list[str] | None, wake: Callable[[Key], None]) -> None:
        """List the Jobs and Pods of the runs in `namespaces` (None: every namespace), then
        watch them on a thread each. Returns once the lists are in the indexes."""
        watches = [Watch(index, api, kind, ns, summarise, wake)
                   for index, api, kind, summarise in (
                       (self.jobs, "batch/v1", "Job", objects.job_summary),
                       (self.pods, "v1", "Pod", objects.pod_summary))
                   for ns in namespaces or [None]]
        for w in watches:
            w.list()
        for w in watches:
            w.start()
