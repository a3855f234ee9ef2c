"""kopf registrations, and nothing else: start-up (the config, the reconciler and the
operator's own watches of the runs, their Jobs and Pods, and the Models: watches.py), peering,
and the schedules and Kueue's Workloads, whose few events wake the reconciler (reconciler.py,
in kopf's memo as `memo.reconciler`).
Handlers that only update an index or queue a wake-up are `async`: kopf runs them on its
event loop, without a hop to its thread pool per event.

Level-triggered: any event on a run, its Jobs or its Pods reconciles the run. Nothing but
their status is written to the runs (no annotations, no finalizers). The operator config
arrives in the memo (`memo.config`, see __main__).
"""

from __future__ import annotations

import logging

import kopf

from . import kube, metrics, objects
from .config import OperatorConfig
from .reconciler import Reconciler
from .vocab import (
    GROUP,
    KUEUE_API_VERSION,
    PLURALS,
    VERSION,
)
from .watches import Watches, slim

log = logging.getLogger("flywheel")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # kopf posts only warnings as Events (the operator's own go through kube.post_event):
    # it would otherwise post one for every "Handler succeeded" line, a write per event.
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
    if memo.get("peering"):  # kopf starts paused until its peering finds no replica above
        memo.reconciler.pause("until peering finds no replica of a higher priority")
    # A dead active replica is replaced within this many seconds (kopf's default is 60).
    settings.peering.lifetime = memo.config.peeringLifetimeSeconds
    follow_peering(memo.reconciler)
    metrics.serve(memo.get("metrics_port", 0))
    log.warning("flywheel operator: started (pools: %s)", ", ".join(sorted(memo.config.pools)))


@kopf.on.startup()
def watch(memo: kopf.Memo, **indexes) -> None:
    """The runs' Jobs and Pods (only those: the apiserver filters by the runs' label), the
    Models and the runs, listed before the first run is reconciled, then watched
    (watches.py); the reconciler reads them with kopf's indexes of schedules and Workloads
    (filled by kopf from here on)."""
    rec: Reconciler = memo.reconciler
    watches = memo.watches = Watches(
        wake_run=lambda key: rec.runs.wake(key, CHILD_EVENT_BATCH_SECONDS),
        run_changed=rec.run_event, model_changed=rec.model_event)
    watches.start(memo.get("namespaces") or None)
    metrics.track_runs(watches.runs)
    rec.start(runs=watches.runs, run_jobs=watches.jobs, run_pods=watches.pods,
              models=watches.models, schedule_runs=watches.runs.group,
              schedule_index=indexes["schedule_index"],
              run_workloads=indexes.get("run_workloads"))


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


#: A child's events (a Job created, its pods created, scheduled, running...) come in bursts:
#: the run is reconciled once, this many seconds after the first, so that a new attempt's
#: status is written once its pods have moved (one write per run instead of three in a
#: burst of runs: bench/RESULTS.md). The run's own events are reconciled at once.
CHILD_EVENT_BATCH_SECONDS = 2.0


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
        if job and (run := memo.watches.jobs.run_of(namespace, job)) is not None:
            memo.reconciler.runs.wake(run, CHILD_EVENT_BATCH_SECONDS)


# --- schedules ----------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, PLURALS["FineTuneSchedule"])
async def schedule_index(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): slim(body)}


@kopf.on.event(GROUP, VERSION, PLURALS["FineTuneSchedule"])
async def schedule_event(type: str, namespace: str, name: str, memo: kopf.Memo,
                         **_) -> None:
    if type == "DELETED":
        memo.reconciler.schedule_deleted((namespace, name))
        return
    memo.reconciler.schedules.wake((namespace, name))
