"""The runs, their Jobs and Pods, and the Models, watched without kopf: each collection is
listed, then watched, on a thread of its own; every event is decoded, summarised into an
index and reported to the reconciler (which queues the reconcile it calls for).

kopf handles every event of every object it watches through its per-object machinery (a
worker task, a cause, keyword arguments, a logger and a state for each handler): about a
millisecond of one core per event, three quarters of the operator's CPU in a burst of runs
(bench/RESULTS.md, "Burst"), and what the next run's Job waits for. Here an event costs its
JSON decoding and a summary. kopf keeps what it is good at: start-up, peering (a standby
replica), the schedules and Kueue's Workloads (a few events per run, not per pod).

The lists complete in the operator's start-up handler, children first: a run's first
reconcile already sees its Jobs, its Pods and its Model. A paused replica (peering) keeps
watching: its indexes stay fresh for the moment it takes over, and its paused wakers
reconcile nothing meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from . import kube, objects
from .vocab import API_VERSION, RUN_LABEL, SCHEDULE_LABEL, Key

log = logging.getLogger("flywheel")

#: Seconds after which the apiserver ends a watch (it is then opened again from where it was).
WATCH_SECONDS = 300


def slim(obj: dict) -> dict:
    """An object without managedFields (most of its bytes). It shares the rest with the watch
    event's own decoded dict, which nothing changes: readers of an index never write to it."""
    raw = dict(obj)  # a kopf Body only views the event's values; a decoded event is a dict
    metadata = {k: v for k, v in raw["metadata"].items() if k != "managedFields"}
    return {"apiVersion": raw["apiVersion"], "kind": raw["kind"], "metadata": metadata,
            "spec": raw.get("spec") or {}, "status": raw.get("status") or {}}


def model_summary(obj: dict) -> dict:
    """What a new attempt reads of its Model (its card's baseline): the promotion alias and
    the aliases, not the list of versions. Registration and serving read the Model afresh."""
    meta = obj["metadata"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                         "uid": meta["uid"]},
            "spec": {"promotion": (obj.get("spec") or {}).get("promotion")},
            "status": {"aliases": (obj.get("status") or {}).get("aliases")}}


class Sink(Protocol):
    """Where a watch's events go: an index, kept up to date by `apply`, that reports what
    changed; `forget` drops what a fresh list no longer has."""

    def apply(self, type: str, obj: dict) -> None: ...

    def forget(self, namespace: str | None, seen: set[str]) -> None: ...


class ByRun:
    """(namespace, run) -> the summaries of the run's Jobs or Pods (by the run's label), read
    as the reconciler reads every index: `get(key, default)`, `in`, `len`, iteration. Each
    change wakes the run (and the run an object left, when its label was changed by hand)."""

    def __init__(self, summarise: Callable[[dict], Any], wake: Callable[[Key], None]) -> None:
        self.summarise, self.wake = summarise, wake
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

    def apply(self, type: str, obj: dict) -> None:
        meta = obj["metadata"]
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        key = (meta["namespace"], run) if run else None
        if type == "DELETED" or key is None:
            was = self.discard(meta["uid"])
        else:
            was = self.put(key, meta["uid"], meta["name"], self.summarise(obj))
        for woken in {key, was} - {None}:
            self.wake(woken)

    def forget(self, namespace: str | None, seen: set[str]) -> None:
        for uid in self.uids(namespace) - seen:
            if (key := self.discard(uid)) is not None:
                self.wake(key)

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


class ByName:
    """(namespace, name) -> an object's summary (the runs, the Models), read as kopf's indexes
    were: `get(key, default)` gives a list of one. Each change is reported to `changed` with
    the event's type and the summary (a deleted object's last). With `group_label`, the
    objects are also grouped by that label's value (`group`): a schedule's runs."""

    def __init__(self, summarise: Callable[[dict], Any],
                 changed: Callable[[str, Key, Any], None], group_label: str = "") -> None:
        self.summarise, self.changed, self.group_label = summarise, changed, group_label
        self._lock = threading.Lock()
        self._items: dict[Key, Any] = {}
        self._uids: dict[str, Key] = {}  # uid -> key (a summary's metadata has its uid)
        self._groups: dict[Key, dict[str, Any]] = {}  # (namespace, label value) -> {name: obj}
        self._group_of: dict[Key, Key] = {}
        self.group = _Group(self)

    def get(self, key: Key, default: Any = ()) -> Any:
        found = self._items.get(key)
        return [found] if found is not None else default

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Key]:
        with self._lock:
            return iter(list(self._items))

    def apply(self, type: str, obj: dict) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if type == "DELETED":
            was = self._pop(meta["uid"])
            self.changed("DELETED", key, was if was is not None else self.summarise(obj))
            return
        summary = self.summarise(obj)
        with self._lock:
            if (old := self._items.get(key)) and old["metadata"]["uid"] != meta["uid"]:
                self._drop(old["metadata"]["uid"])  # a namesake's delete went by unseen
            self._items[key], self._uids[meta["uid"]] = summary, key
            self._regroup(key, summary)
        self.changed(type, key, summary)

    def forget(self, namespace: str | None, seen: set[str]) -> None:
        with self._lock:
            gone = [uid for uid, key in self._uids.items()
                    if uid not in seen and (namespace is None or key[0] == namespace)]
        for uid in gone:
            key = self._uids.get(uid)
            if key is not None and (was := self._pop(uid)) is not None:
                self.changed("DELETED", key, was)

    def _pop(self, uid: str) -> Any:
        with self._lock:
            return self._drop(uid)

    def _drop(self, uid: str) -> Any:
        key = self._uids.pop(uid, None)
        if key is None:
            return None
        self._regroup(key, None)
        return self._items.pop(key)

    def _regroup(self, key: Key, summary: Any) -> None:
        if not self.group_label:
            return
        if (was := self._group_of.pop(key, None)) is not None:
            members = self._groups[was]
            members.pop(key[1], None)
            if not members:
                del self._groups[was]
        value = ((summary or {}).get("metadata", {}).get("labels") or {}).get(self.group_label)
        if value:
            group = self._group_of[key] = (key[0], value)
            self._groups.setdefault(group, {})[key[1]] = summary


class _Group:
    """(namespace, label value) -> the objects of a `ByName` that carry it."""

    def __init__(self, index: ByName) -> None:
        self.index = index

    def get(self, key: Key, default: Any = ()) -> Any:
        with self.index._lock:
            found = self.index._groups.get(key)
            return list(found.values()) if found else default

    def __len__(self) -> int:
        return len(self.index._groups)


class Watch(threading.Thread):
    """One collection (with `selector`) in one namespace, or in all: listed once, then
    watched from the list's resourceVersion for good, again from where it was after the
    apiserver ends a watch or a connection drops, and listed afresh when that version is too
    old (410 Gone); after a list, objects gone meanwhile are forgotten."""

    def __init__(self, index: Sink, api_version: str, kind: str, namespace: str | None,
                 selector: str = "") -> None:
        super().__init__(daemon=True, name=f"flywheel-watch-{kind.lower()}s")
        self.index, self.kind, self.namespace, self.selector = index, kind, namespace, selector
        self.path = kube.collection_path(api_version, kube.PLURALS[kind], namespace)
        self.version: str | None = None
        self.stopped = threading.Event()  # ends the thread after the watch it is in

    def list(self) -> None:
        items, self.version = kube.list_all(self.path, self.selector)
        for obj in items:
            self.index.apply("ADDED", obj)
        self.index.forget(self.namespace, {obj["metadata"]["uid"] for obj in items})

    def apply(self, type: str, obj: dict) -> None:
        self.index.apply(type, obj)

    def run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            try:
                if self.version is None:
                    self.list()
                for event in kube.watch(self.path, self.selector, self.version, WATCH_SECONDS):
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


class Watches:
    """The indexes the reconciler reads and the watches that keep them: the runs' Jobs and
    Pods (by the runs' label), the Models and the runs, in `namespaces` (None: every one)."""

    def __init__(self, wake_run: Callable[[Key], None],
                 run_changed: Callable[[str, Key, dict], None],
                 model_changed: Callable[[str, Key, dict], None]) -> None:
        self.jobs = ByRun(objects.job_summary, wake_run)
        self.pods = ByRun(objects.pod_summary, wake_run)
        self.models = ByName(model_summary, model_changed)
        self.runs = ByName(slim, run_changed, group_label=SCHEDULE_LABEL)

    def start(self, namespaces: list[str] | None) -> list[Watch]:
        """List every collection (children first: a run's first reconcile sees them), then
        watch each on a thread of its own. Returns once the lists are in the indexes."""
        watches = [Watch(index, api, kind, ns, selector)
                   for index, api, kind, selector in (
                       (self.jobs, "batch/v1", "Job", RUN_LABEL),
                       (self.pods, "v1", "Pod", RUN_LABEL),
                       (self.models, API_VERSION, "Model", ""),
                       (self.runs, API_VERSION, "FineTuneRun", ""))
                   for ns in namespaces or [None]]
        for w in watches:
            w.list()
        for w in watches:
            w.start()
        return watches
