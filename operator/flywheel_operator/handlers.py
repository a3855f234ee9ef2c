"""kopf registrations: thin handlers that feed `lifecycle.decide` and carry out its plan.

The operator is level-triggered. Runs, their Jobs and their Pods are kept in kopf indexes
(slim summaries, so memory stays small at thousands of runs); any event on any of them
reconciles the run: decide from the indexes, then act through `kube`. kopf writes nothing
to the runs (no annotations, no finalizers): only the operator's own status patches.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import defaultdict

import kopf

from . import kube, lifecycle, metrics, render
from .config import OperatorConfig, load_config
from .lifecycle import RUN_LABEL

log = logging.getLogger("flywheel")
GROUP, VERSION = kube.GROUP, kube.VERSION
Key = tuple[str, str]

CONFIG: OperatorConfig = load_config()

_locks: defaultdict[Key, threading.Lock] = defaultdict(threading.Lock)
# The status we last wrote per run, with the resourceVersion it was based on: until the
# watch delivers a newer version of the run, the index still holds the pre-write copy.
_written: dict[Key, tuple[str, dict]] = {}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    metrics.serve(int(os.environ.get("FLYWHEEL_METRICS_PORT", "0")))
    log.warning("flywheel operator: started (pools: %s)", ", ".join(sorted(CONFIG.pools)))


# --- indexes ------------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, "finetuneruns")
def runs(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): copy.deepcopy(
        {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.metadata),
         "spec": dict(body.spec), "status": dict(body.status)})}


@kopf.index("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
def run_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[RUN_LABEL]): lifecycle.job_summary(body)}


@kopf.index("v1", "pods", labels={RUN_LABEL: kopf.PRESENT})
def run_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[RUN_LABEL]): lifecycle.pod_summary(body)}


# --- events -------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, "finetuneruns")
def run_event(type: str, namespace: str, name: str, runs: kopf.Index, run_jobs: kopf.Index,
              run_pods: kopf.Index, **_) -> None:
    metrics.track_runs(runs)
    if type == "DELETED":
        _written.pop((namespace, name), None)
        return
    reconcile((namespace, name), runs, run_jobs, run_pods)


@kopf.on.event("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
def job_event(namespace: str, labels: kopf.Labels, runs: kopf.Index, run_jobs: kopf.Index,
              run_pods: kopf.Index, **_) -> None:
    reconcile((namespace, labels[RUN_LABEL]), runs, run_jobs, run_pods)


@kopf.on.event("v1", "pods", labels={RUN_LABEL: kopf.PRESENT})
def pod_event(namespace: str, labels: kopf.Labels, runs: kopf.Index, run_jobs: kopf.Index,
              run_pods: kopf.Index, **_) -> None:
    reconcile((namespace, labels[RUN_LABEL]), runs, run_jobs, run_pods)


# --- reconcile ----------------------------------------------------------------------------


def reconcile(key: Key, runs: kopf.Index, run_jobs: kopf.Index, run_pods: kopf.Index) -> None:
    found = list(runs.get(key, []))
    if not found:
        return
    with _locks[key]:
        run = found[0]
        if run["metadata"].get("deletionTimestamp"):
            return
        written = _written.get(key)
        if written and written[0] == run["metadata"]["resourceVersion"]:
            run = {**run, "status": written[1]}
        started = time.monotonic()
        plan = lifecycle.decide(run, list(run_jobs.get(key, [])), list(run_pods.get(key, [])))
        execute(key, run, plan)
        metrics.observe_reconcile(time.monotonic() - started)


def execute(key: Key, run: dict, plan: lifecycle.Plan) -> None:
    namespace, name = key
    if plan.status != (run.get("status") or {}):
        # Status first: a crash after this line resumes at the recorded attempt.
        kube.patch_status("FineTuneRun", namespace, name, plan.status)
        _written[key] = (run["metadata"]["resourceVersion"], plan.status)
    for attempt in plan.delete_attempts:
        names = render.child_names(name, attempt)
        kube.delete("batch/v1", "Job", namespace, names.job)
        kube.delete("v1", "Service", namespace, names.service)
        kube.delete("v1", "ConfigMap", namespace, names.configmap)
    if plan.suspend_job:
        job, suspend = plan.suspend_job
        kube.patch("batch/v1", "Job", namespace, job, {"spec": {"suspend": suspend}})
    if plan.create_attempt:
        metrics.ATTEMPTS.labels(namespace).inc()
        if plan.create_attempt > 1:
            metrics.RESTARTS.labels(namespace).inc()
        run_for_render = {**run, "status": plan.status}
        for obj in render.attempt_objects(run_for_render, plan.create_attempt, CONFIG):
            kube.create(obj, namespace)
    for event_type, reason, message in plan.events:
        kopf.event(run, type=event_type, reason=reason, message=message)
        log.info("%s/%s: %s: %s", namespace, name, reason, message)
