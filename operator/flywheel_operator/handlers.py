"""kopf registrations, and nothing else: indexes of slim summaries, and events that wake the
reconciler (reconciler.py), which start-up builds into kopf's memo (`memo.reconciler`), with
the watches of the runs' Jobs and Pods (children.py, off kopf: their events are most of a
burst's).
Handlers that only update an index or queue a wake-up are `async`: kopf runs them on its
event loop, without a hop to its thread pool per event (a burst's CPU); one that calls the
API (model_event) is not.

Level-triggered: any event on a run, its Jobs or its Pods reconciles the run. kopf writes
nothing to the runs (no annotations, no finalizers). The operator config arrives in the memo
(`memo.config`, see __main__).
"""

from __future__ import annotations

import copy
import logging

import kopf

from . import kube, metrics, objects
from .children import Children
from .config import OperatorConfig
from .reconciler import Reconciler
from .vocab import (
    GROUP,
    KUEUE_API_VERSION,
    PLURALS,
    SCHEDULE_LABEL,
    VERSION,
)

log = logging.getLogger("flywheel")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Post only our own Events (kopf.event) and warnings: kopf would otherwise post an Event
    # for every "Handler succeeded" line, an API write per watch event.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # Handlers only update indexes and queue reconciles (the reconciler has its own workers).
    settings.execution.max_workers = 8
    # Events are posted by at most this many concurrent workers (a connection each).
    settings.posting.worker_limit = 8
    # No on.create/update handlers: the essence kopf would otherwise deep-copy and diff on
    # every watch event of every run (much of its CPU in a burst) is not needed.
    settings.persistence.diffbase_storage = NoDiffBase()
    memo.setdefault("config", OperatorConfig())
    kube.configure(memo.config.apiConnectTimeoutSeconds, memo.config.apiReadTimeoutSeconds)
    memo.reconciler = Reconciler(memo.config)
    # A dead active replica is replaced within this many seconds (kopf's default is 60).
    settings.peering.lifetime = memo.config.peeringLifetimeSeconds
    follow_peering(memo.reconciler)
    metrics.serve(memo.get("metrics_port", 0))
    log.warning("flywheel operator: started (pools: %s)", ", ".join(sorted(memo.config.pools)))


@kopf.on.startup()
def watch_children(memo: kopf.Memo, **_) -> None:
    """The runs' Jobs and Pods (only those: the apiserver filters by the runs' label), listed
    before kopf hands over the first run, then watched (children.py)."""
    memo.children = Children()
    memo.reconciler.index.update(run_jobs=memo.children.jobs, run_pods=memo.children.pods)
    wake = memo.reconciler.runs.wake
    memo.children.start(memo.get("namespaces") or None,
                        lambda key: wake(key, CHILD_EVENT_BATCH_SECONDS))


class _PeeringState(logging.Filter):
    """kopf pauses only its own watches when a replica of higher priority is active; this
    follows kopf's own decision (its peering log records, emitted exactly when it pauses or
    resumes) to pause and resume the reconciler's timers and poller with it."""

    def __init__(self, reconciler: Reconciler) -> None:
        super().__init__()
        self.reconciler = reconciler

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(("Pausing operations", "Pausing all operators")):
            self.reconciler.pause()
        elif message.startswith("Resuming operations"):
            self.reconciler.resume()
        return True


def follow_peering(reconciler: Reconciler) -> None:
    peering = logging.getLogger("kopf._core.engines.peering")
    if peering.getEffectiveLevel() > logging.INFO:  # its pause/resume records are INFO
        peering.setLevel(logging.INFO)
    for old in [f for f in peering.filters if isinstance(f, _PeeringState)]:
        peering.removeFilter(old)
    peering.addFilter(_PeeringState(reconciler))


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf's default builds one per event (a deep copy of the object, then a
    diff) for on.create/update/field handlers, which this operator does not have."""

    def build(self, *, body: kopf.Body, extra_fields=None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def slim(body: kopf.Body) -> dict:
    """An object without managedFields (most of its bytes). It shares the rest with the watch
    event's own decoded dict, which nothing changes: readers of an index never write to it."""
    raw = dict(body)  # the decoded event's own values (kopf's Body only views them)
    metadata = {k: v for k, v in raw["metadata"].items() if k != "managedFields"}
    return {"apiVersion": raw["apiVersion"], "kind": raw["kind"], "metadata": metadata,
            "spec": raw.get("spec") or {}, "status": raw.get("status") or {}}


#: A child's events (a pod created, scheduled, running...) come in bursts: the run is
#: reconciled once, this many seconds after the first, as the Job controller batches its
#: pods' updates. The run's own events are reconciled at once.
CHILD_EVENT_BATCH_SECONDS = 1.0


def _wake_run(key: tuple[str, str], memo: kopf.Memo, runs: kopf.Index, models: kopf.Index,
              run_workloads: kopf.Index | None = None, child: bool = True, **_) -> None:
    """Queue the run's reconcile (on the reconciler's own workers, from the indexes): kopf's
    handler returns at once, so no event waits, decoded, behind a reconcile's API calls."""
    memo.reconciler.bind(runs=runs, models=models, run_workloads=run_workloads)
    memo.reconciler.runs.wake(key, CHILD_EVENT_BATCH_SECONDS if child else 0.0)


# --- runs (their Jobs and Pods: children.py) ----------------------------------------------


@kopf.index(GROUP, VERSION, PLURALS["FineTuneRun"])
async def runs(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): slim(body)}


@kopf.on.event(GROUP, VERSION, PLURALS["FineTuneRun"])
async def run_event(type: str, namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
              **kwargs) -> None:
    metrics.track_runs(kwargs["runs"])
    schedule = (body.get("metadata", {}).get("labels") or {}).get(SCHEDULE_LABEL)
    if schedule:
        memo.reconciler.schedules.wake((namespace, schedule))
    if type == "DELETED":
        memo.reconciler.run_deleted((namespace, name), body.get("spec", {}).get("modelName", ""))
        return
    _wake_run((namespace, name), memo, child=False, **kwargs)


def watch_kueue() -> None:
    """Follow Kueue's Workloads of the runs' Jobs. Registered by __main__ only when the
    config turns Kueue on: a cluster without Kueue has no Workloads to watch."""
    group, version = KUEUE_API_VERSION.split("/")

    # Explicit ids: kopf passes each index to handlers as a keyword argument named by its id.
    @kopf.index(group, version, "workloads", id="run_workloads")
    async def run_workloads(namespace: str, body: kopf.Body, **_) -> dict | None:
        summary = objects.workload_summary(body)
        return {(namespace, summary.job): summary} if summary.job else None

    @kopf.on.event(group, version, "workloads", id="workload_event")
    async def workload_event(namespace: str, body: kopf.Body, memo: kopf.Memo,
                             **kwargs) -> None:
        job = objects.workload_summary(body).job
        if job and (run := memo.children.jobs.run_of(namespace, job)) is not None:
            _wake_run(run, memo, **kwargs)


# --- the registry -------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, PLURALS["Model"])
async def models(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    """Each Model's promotion alias and aliases (not its list of versions), which a new
    attempt reads for its card's baseline without a GET per attempt; registration and
    serving read the Model afresh, under its lock."""
    return {(namespace, name): {"metadata": {"name": name, "namespace": namespace},
                                "spec": {"promotion": copy.deepcopy(body.spec.get("promotion"))},
                                "status": {"aliases": copy.deepcopy(body.status.get("aliases"))}}}


@kopf.on.event(GROUP, VERSION, PLURALS["Model"])
def model_event(type: str, namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    if type != "DELETED":
        memo.reconciler.model_changed(namespace, name)


# --- schedules ----------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, PLURALS["FineTuneSchedule"])
async def schedule_index(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): slim(body)}


@kopf.index(GROUP, VERSION, PLURALS["FineTuneRun"], labels={SCHEDULE_LABEL: kopf.PRESENT})
async def schedule_runs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[SCHEDULE_LABEL]): slim(body)}


@kopf.on.event(GROUP, VERSION, PLURALS["FineTuneSchedule"])
async def schedule_event(type: str, namespace: str, name: str, schedule_index: kopf.Index,
                   schedule_runs: kopf.Index, memo: kopf.Memo, **_) -> None:
    memo.reconciler.bind(schedule_index=schedule_index, schedule_runs=schedule_runs)
    if type == "DELETED":
        memo.reconciler.schedule_deleted((namespace, name))
        return
    memo.reconciler.schedules.wake((namespace, name))
