"""kopf registrations: thin handlers that feed `lifecycle.decide` and carry out its plan.

The operator is level-triggered. Runs, their Jobs and their Pods are kept in kopf indexes
(slim summaries, so memory stays small at thousands of runs); any event on any of them
reconciles the run: decide from the indexes, then act through `kube`. kopf writes nothing
to the runs (no annotations, no finalizers): only the operator's own status patches.
"""

from __future__ import annotations

import copy
import heapq
import logging
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import kopf

from . import kube, lifecycle, metrics, registry, render, schedules
from .config import OperatorConfig, load_config
from .lifecycle import RUN_LABEL, now_iso, set_condition

log = logging.getLogger("flywheel")
GROUP, VERSION = kube.GROUP, kube.VERSION
API = f"{GROUP}/{VERSION}"
Key = tuple[str, str]

CONFIG: OperatorConfig = load_config()

_locks: defaultdict[Key, threading.Lock] = defaultdict(threading.Lock)
CREATORS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="flywheel-create")
# The status we last wrote per run, with the resourceVersion it was based on: until the
# watch delivers a newer version of the run, the index still holds the pre-write copy.
_written: dict[Key, tuple[str, dict]] = {}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # Post only our own Events (kopf.event) and warnings: kopf would otherwise post an Event
    # for every "Handler succeeded" line, an API write per watch event.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 32
    metrics.serve(int(os.environ.get("FLYWHEEL_METRICS_PORT", "0")))
    log.warning("flywheel operator: started (pools: %s)", ", ".join(sorted(CONFIG.pools)))


# --- indexes ------------------------------------------------------------------------------


def slim(body: kopf.Body) -> dict:
    """A private copy of an object without managedFields (most of its bytes)."""
    metadata = {k: v for k, v in body.metadata.items() if k != "managedFields"}
    return copy.deepcopy({"apiVersion": body["apiVersion"], "kind": body["kind"],
                          "metadata": metadata, "spec": dict(body.spec),
                          "status": dict(body.status)})


@kopf.index(GROUP, VERSION, "finetuneruns")
def runs(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): slim(body)}


@kopf.index("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
def run_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[RUN_LABEL]): lifecycle.job_summary(body)}


@kopf.index("v1", "pods", labels={RUN_LABEL: kopf.PRESENT})
def run_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[RUN_LABEL]): lifecycle.pod_summary(body)}


# --- events -------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, "finetuneruns")
def run_event(type: str, namespace: str, name: str, body: kopf.Body, runs: kopf.Index,
              run_jobs: kopf.Index, run_pods: kopf.Index, **_) -> None:
    metrics.track_runs(runs)
    schedule = (body.get("metadata", {}).get("labels") or {}).get(schedules.SCHEDULE_LABEL)
    if schedule:
        SCHEDULER.wake((namespace, schedule))
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
        plan = lifecycle.decide(run, list(run_jobs.get(key, [])), list(run_pods.get(key, [])),
                                config=CONFIG)
        execute(key, run, plan)
        metrics.RECONCILE.observe(time.monotonic() - started)


def execute(key: Key, run: dict, plan: lifecycle.Plan) -> None:
    namespace, name = key
    if plan.succeeded_pods and not plan.status.get("modelVersion"):
        finish_success(run, plan)
    if plan.status != (run.get("status") or {}):
        # Status first: a crash after this line resumes at the recorded attempt.
        kube.patch_status("FineTuneRun", namespace, name, plan.status)
        _written[key] = (run["metadata"]["resourceVersion"], plan.status)
        used = plan.status.get("gpuHours", 0) - (run.get("status") or {}).get("gpuHours", 0)
        if used > 0:
            metrics.GPU_HOURS.labels(namespace, run["spec"]["modelName"]).inc(used)
        spent = (plan.status.get("estimatedCost", 0)
                 - (run.get("status") or {}).get("estimatedCost", 0))
        if spent > 0:
            metrics.COST.labels(namespace, run["spec"]["modelName"]).inc(spent)
    for attempt in plan.delete_attempts:
        names = render.child_names(name, attempt)
        kube.delete("batch/v1", "Job", namespace, names.job)
        kube.delete("v1", "Service", namespace, names.service)
        kube.delete("v1", "ConfigMap", namespace, names.configmap)
    if plan.create_preflight:
        for obj in render.preflight_objects(run, CONFIG):
            kube.create(obj, namespace)
    if plan.suspend_job:
        job, suspend = plan.suspend_job
        kube.patch("batch/v1", "Job", namespace, job, {"spec": {"suspend": suspend}})
    if plan.create_attempt:
        metrics.ATTEMPTS.labels(namespace).inc()
        if plan.create_attempt > 1:
            metrics.RESTARTS.labels(namespace).inc()
        run_for_render = {**run, "status": plan.status}
        objects = render.attempt_objects(run_for_render, plan.create_attempt, CONFIG)
        # Independent objects: create them together (a pod waits for its ConfigMap anyway).
        list(CREATORS.map(lambda obj: kube.create(obj, namespace), objects))
    for event_type, reason, message in plan.events:
        kopf.event(run, type=event_type, reason=reason, message=message)
        log.info("%s/%s: %s: %s", namespace, name, reason, message)


# --- registration -------------------------------------------------------------------------


def finish_success(run: dict, plan: lifecycle.Plan) -> None:
    """Register rank 0's model before the run is marked Succeeded (idempotent)."""
    rank0 = next((p for p in plan.succeeded_pods if p["index"] == 0), None)
    ts, generation = now_iso(), run["metadata"].get("generation", 1)
    try:
        summary = registry.parse_summary(rank0 and rank0["message"])
    except registry.SummaryError as err:
        plan.status.update(phase="Failed", message=str(err))
        set_condition(plan.status, "Succeeded", False, "InvalidSummary", str(err), ts, generation)
        set_condition(plan.status, "Failed", True, "InvalidSummary", str(err), ts, generation)
        plan.events = [("Warning", "InvalidSummary", str(err))]
        return
    mv = register(run, summary)
    plan.status["modelVersion"] = mv["metadata"]["name"]
    plan.status["progress"] = {
        **(plan.status.get("progress") or {}), "step": summary.steps,
        "totalSteps": summary.steps, "percent": "100%", "tokens": summary.tokens,
        **({"tokensPerSecond": round(summary.throughput.tokensPerSecond, 1)}
           if summary.throughput.tokensPerSecond else {})}
    if summary.tracking.url:
        plan.status["trackingUrl"] = summary.tracking.url
    plan.events.append(("Normal", "Registered",
                        f"ModelVersion {mv['metadata']['name']} (digest "
                        f"{mv['spec']['artifact']['digest'][:19]}...)"))


def register(run: dict, summary: registry.Summary) -> dict:
    namespace, uid = run["metadata"]["namespace"], run["metadata"]["uid"]
    model_name = run["spec"]["modelName"]
    with _locks[("model", namespace, model_name)]:
        model = kube.get(API, "Model", namespace, model_name)
        if model is None:
            kube.create({"apiVersion": API, "kind": "Model",
                         "metadata": {"name": model_name}, "spec": {}}, namespace)
            model = kube.get(API, "Model", namespace, model_name)
        versions = kube.list_objects(API, "ModelVersion", namespace,
                                     f"{registry.MODEL_LABEL}={model_name}")
        mine = [v for v in versions
                if v["metadata"]["labels"].get(registry.RUN_UID_LABEL) == uid]
        promotion = (model.get("spec") or {}).get("promotion") or {}
        alias = promotion.get("alias", "production")
        if mine:
            mv = mine[0]
        else:
            by_name = {v["metadata"]["name"]: v for v in versions}
            current = ((model.get("status") or {}).get("aliases") or {}).get(alias)
            baseline = by_name.get(current["modelVersion"]) if current else None
            version = max((v["spec"]["version"] for v in versions), default=0) + 1
            while True:  # a concurrent registration may take a number: take the next one
                mv = registry.model_version(run, summary, version, baseline, alias)
                if kube.create(mv, namespace):
                    versions.append(mv)
                    break
                # 409: someone took this number, or our own create succeeded before a retry.
                versions = kube.list_objects(API, "ModelVersion", namespace,
                                             f"{registry.MODEL_LABEL}={model_name}")
                mine = [v for v in versions
                        if v["metadata"]["labels"].get(registry.RUN_UID_LABEL) == uid]
                if mine:
                    mv = mine[0]
                    break
                version = max((v["spec"]["version"] for v in versions), default=0) + 1
        update_model_status(model, mv, versions)
        return mv


def update_model_status(model: dict, mv: dict, versions: list[dict]) -> None:
    """Record the version, move `latest`, and decide the promoted alias (once per version)."""
    namespace, name = model["metadata"]["namespace"], model["metadata"]["name"]
    spec, status = model.get("spec") or {}, copy.deepcopy(model.get("status") or {})
    ts, version = now_iso(), mv["spec"]["version"]
    refs = {r["version"]: r for r in status.get("versions", [])}
    refs.setdefault(version, {"version": version, "name": mv["metadata"]["name"],
                              "digest": mv["spec"]["artifact"]["digest"], "created": ts})
    status["versions"] = [refs[v] for v in sorted(refs)]
    aliases = status.setdefault("aliases", {})
    if aliases.get("latest", {}).get("version", 0) < version:
        aliases["latest"] = registry.alias_target(mv, ts)

    promotion = spec.get("promotion")
    newest = version == max(refs)
    decided = any(c["type"] == "Promoted" and c.get("message", "").startswith(
        f"version {version}:") for c in status.get("conditions", []))
    if promotion and newest and not decided:
        alias = promotion.get("alias", "production")
        current = aliases.get(alias)
        baseline = next((v for v in versions if current
                         and v["metadata"]["name"] == current.get("modelVersion")), None)
        failures = registry.failed_gates(
            promotion, mv["spec"].get("metrics") or {},
            (baseline or {}).get("spec", {}).get("metrics") if baseline else None)
        generation = model["metadata"].get("generation", 1)
        if alias in (spec.get("pinnedAliases") or {}):
            set_condition(status, "Promoted", False, "AliasPinned",
                          f"version {version}: {alias} is pinned by spec.pinnedAliases",
                          ts, generation)
        elif failures:
            set_condition(status, "Promoted", False, "GatesFailed",
                          f"version {version}: not promoted to {alias}: " + "; ".join(failures),
                          ts, generation)
            for failure in failures:
                metrics.GATE_FAILURES.labels(namespace, name, failure.split("=")[0]
                                             .split(" ")[0]).inc()
            kopf.event(model, type="Warning", reason="PromotionBlocked",
                       message=f"version {version} not promoted to {alias}: "
                       + "; ".join(failures))
        else:
            aliases[alias] = registry.alias_target(mv, ts)
            set_condition(status, "Promoted", True, "GatesPassed",
                          f"version {version}: promoted to {alias}", ts, generation)
            metrics.PROMOTIONS.labels(namespace, name, alias).inc()
            kopf.event(model, type="Normal", reason="Promoted",
                       message=f"version {version} promoted to {alias}")
    kube.patch_status("Model", namespace, name, status)


# --- serving ------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, "models")
def model_event(type: str, body: kopf.Body, namespace: str, name: str, **_) -> None:
    """Keep pinned aliases and serving targets in step with the Model."""
    if type == "DELETED":
        return
    with _locks[("model", namespace, name)]:
        model = kube.get(API, "Model", namespace, name)
        if model is None:
            return
        spec, status = model.get("spec") or {}, copy.deepcopy(model.get("status") or {})
        aliases = status.setdefault("aliases", {})
        moved = []
        for alias, version in (spec.get("pinnedAliases") or {}).items():
            if aliases.get(alias, {}).get("version") == version:
                continue
            mv = kube.get(API, "ModelVersion", namespace, registry.version_name(name, version))
            if mv is None:
                kopf.event(model, type="Warning", reason="PinUnknownVersion",
                           message=f"{alias} is pinned to version {version}, which does not "
                           "exist")
                continue
            aliases[alias] = registry.alias_target(mv)
            moved.append(f"{alias} -> version {version} (pinned)")
        if moved:
            kube.patch_status("Model", namespace, name, status)
            kopf.event(model, type="Normal", reason="AliasPinned", message="; ".join(moved))
        alias = (spec.get("promotion") or {}).get("alias", "production")
        target = aliases.get(alias)
        if target:
            for serving in spec.get("servingTargets") or []:
                sync_serving(model, serving, target)


def sync_serving(model: dict, serving: dict, target: dict) -> None:
    namespace = model["metadata"]["namespace"]
    deployment = kube.get("apps/v1", "Deployment", namespace, serving["deployment"])
    if deployment is None:
        kopf.event(model, type="Warning", reason="ServingTargetMissing",
                   message=f"Deployment {serving['deployment']} not found")
        return
    if registry.serving_current(deployment, serving["container"]) == (
            target["uri"], target["digest"]):
        return
    kube.patch("apps/v1", "Deployment", namespace, serving["deployment"],
               registry.serving_patch(serving["container"], target["uri"], target["digest"]),
               content_type=kube.STRATEGIC_MERGE_PATCH)
    kopf.event(model, type="Normal", reason="ServingUpdated",
               message=f"Deployment {serving['deployment']} now serves version "
               f"{target['version']} ({target['digest'][:19]}...)")


# --- schedules ----------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, "finetuneschedules")
def schedule_index(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): slim(body)}


@kopf.index(GROUP, VERSION, "finetuneruns", labels={schedules.SCHEDULE_LABEL: kopf.PRESENT})
def schedule_runs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[schedules.SCHEDULE_LABEL]): slim(body)}


@kopf.on.event(GROUP, VERSION, "finetuneschedules")
def schedule_event(type: str, namespace: str, name: str, schedule_index: kopf.Index,
                   schedule_runs: kopf.Index, **_) -> None:
    SCHEDULER.bind(schedule_index, schedule_runs)
    if type == "DELETED":
        _written.pop(("schedule", namespace, name), None)
        return
    SCHEDULER.wake((namespace, name))


class Scheduler(threading.Thread):
    """Wakes schedules when they are due: a heap of (when, key), one thread, no finalizers.

    kopf's timers would put a finalizer on every schedule; this keeps the objects untouched.
    Schedules are reconciled from kopf's indexes, so a wake-up costs no API read.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True, name="flywheel-scheduler")
        self.heap: list[tuple[float, Key]] = []
        self.cv = threading.Condition()
        self.index: kopf.Index | None = None
        self.runs: kopf.Index | None = None

    def bind(self, index: kopf.Index, runs: kopf.Index) -> None:
        if self.index is None:
            self.index, self.runs = index, runs
            self.start()

    def wake(self, key: Key, after: float = 0.0) -> None:
        with self.cv:
            heapq.heappush(self.heap, (time.monotonic() + after, key))
            self.cv.notify()

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.heap or self.heap[0][0] > time.monotonic():
                    self.cv.wait(timeout=(self.heap[0][0] - time.monotonic())
                                 if self.heap else None)
                _, key = heapq.heappop(self.heap)
                # Collapse duplicate wake-ups for the same schedule that are already due.
                while self.heap and self.heap[0][1] == key and self.heap[0][0] <= time.monotonic():
                    heapq.heappop(self.heap)
            try:
                reconcile_schedule(key, self.index, self.runs)
            except Exception:
                log.exception("schedule %s/%s: reconcile failed; retrying in 10s", *key)
                self.wake(key, 10.0)


SCHEDULER = Scheduler()


def reconcile_schedule(key: Key, index: kopf.Index, runs_index: kopf.Index) -> None:
    found = list(index.get(key, []))
    if not found:
        return
    namespace, name = key
    with _locks[("schedule", namespace, name)]:
        schedule = found[0]
        if schedule["metadata"].get("deletionTimestamp"):
            return
        written = _written.get(("schedule", namespace, name))
        if written and written[0] == schedule["metadata"]["resourceVersion"]:
            schedule = {**schedule, "status": written[1]}
        uid = schedule["metadata"]["uid"]
        runs = [r for r in runs_index.get(key, [])
                if any(o.get("uid") == uid for o in r["metadata"].get("ownerReferences") or [])]
        plan = schedules.plan(schedule, runs, datetime.now(UTC))
        for run_name in plan.delete:
            kube.delete(API, "FineTuneRun", namespace, run_name)
        for run in plan.create:
            kube.create(run, namespace)
        # None values are removals in a merge patch; compare without them.
        if {k: v for k, v in plan.status.items() if v is not None} != (
                schedule.get("status") or {}):
            kube.patch_status("FineTuneSchedule", namespace, name, plan.status)
            _written[("schedule", namespace, name)] = (
                schedule["metadata"]["resourceVersion"], plan.status)
        for event_type, reason, message in plan.events:
            kopf.event(schedule, type=event_type, reason=reason, message=message)
            log.info("schedule %s/%s: %s: %s", namespace, name, reason, message)
    if plan.requeue_after is not None:
        SCHEDULER.wake(key, min(plan.requeue_after, 3600.0))
