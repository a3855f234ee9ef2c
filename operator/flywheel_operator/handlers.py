"""kopf registrations: thin handlers that feed the pure decisions and carry out their plans.

Level-triggered: runs, their Jobs and Pods are kept in kopf indexes (slim summaries, so memory
stays small at thousands of runs); any event on any of them reconciles the run: decide from the
indexes (`lifecycle.decide`), then act through `kube`. Registration applies `registry`'s
decisions, schedules `schedules.plan`. kopf writes nothing to the runs (no annotations, no
finalizers). A failed reconcile comes back with backoff (`waker.Waker`). The operator config
arrives at start-up in kopf's memo (`memo.config`, see __main__)."""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import kopf

from . import (
    kube,
    lifecycle,
    metrics,
    observe,
    poller,
    queueing,
    registry,
    render,
    schedules,
    waker,
)
from .config import OperatorConfig
from .poller import Key
from .vocab import (
    API_VERSION,
    GROUP,
    KUEUE_API_VERSION,
    MODEL_LABEL,
    PLURALS,
    QUEUE_NAME_LABEL,
    RUN_LABEL,
    SCHEDULE_LABEL,
    TERMINAL,
    VERSION,
    format_time,
    set_condition,
)

log = logging.getLogger("flywheel")
API = API_VERSION
CREATORS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="flywheel-create")
# The status we last wrote per run, with the resourceVersion it was based on: until the
# watch delivers a newer version of the run, the index still holds the pre-write copy.
_written: dict[Key, tuple[str, dict]] = {}
#: Rank 0's progress of every training run, fetched by one shared thread (poller.py).
POLLER: poller.Poller | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Post only our own Events (kopf.event) and warnings: kopf would otherwise post an Event
    # for every "Handler succeeded" line, an API write per watch event.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 32
    memo.setdefault("config", OperatorConfig())
    kube.configure(memo.config.apiConnectTimeoutSeconds, memo.config.apiReadTimeoutSeconds)
    global POLLER
    POLLER = poller.Poller(memo.config.progressIntervalSeconds, on_update=RUNS.wake)
    metrics.serve(memo.get("metrics_port", 0))
    log.warning("flywheel operator: started (pools: %s)", ", ".join(sorted(memo.config.pools)))


RUNS = waker.Waker("run")
CONFLICT_RECHECK_SECONDS = 30
SCHEDULER = waker.Waker("schedule")


# --- indexes ------------------------------------------------------------------------------


def slim(body: kopf.Body) -> dict:
    """A private copy of an object without managedFields (most of its bytes)."""
    metadata = {k: v for k, v in body.metadata.items() if k != "managedFields"}
    return copy.deepcopy({"apiVersion": body["apiVersion"], "kind": body["kind"],
                          "metadata": metadata, "spec": dict(body.spec),
                          "status": dict(body.status)})


@kopf.index(GROUP, VERSION, PLURALS["FineTuneRun"])
def runs(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): slim(body)}


@kopf.index("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
def run_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[RUN_LABEL]): observe.job_summary(body)}


@kopf.index("v1", "pods", labels={RUN_LABEL: kopf.PRESENT})
def run_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[RUN_LABEL]): observe.pod_summary(body)}


# --- events -------------------------------------------------------------------------------


def _reconcile_run(key: Key, memo: kopf.Memo, runs: kopf.Index, run_jobs: kopf.Index,
                   run_pods: kopf.Index, run_workloads: kopf.Index | None = None, **_) -> None:
    RUNS.bind(lambda k: reconcile(k, runs, run_jobs, run_pods, memo.config, run_workloads))
    RUNS.attempt(key)


@kopf.on.event(GROUP, VERSION, PLURALS["FineTuneRun"])
def run_event(type: str, namespace: str, name: str, body: kopf.Body, **kwargs) -> None:
    metrics.track_runs(kwargs["runs"])
    schedule = (body.get("metadata", {}).get("labels") or {}).get(SCHEDULE_LABEL)
    if schedule:
        SCHEDULER.wake((namespace, schedule))
    if type == "DELETED":
        _written.pop((namespace, name), None)
        RUNS.failures.pop((namespace, name), None)
        if POLLER:
            POLLER.drop((namespace, name))
        return
    _reconcile_run((namespace, name), **kwargs)


@kopf.on.event("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
def job_event(namespace: str, labels: kopf.Labels, **kwargs) -> None:
    _reconcile_run((namespace, labels[RUN_LABEL]), **kwargs)


@kopf.on.event("v1", "pods", labels={RUN_LABEL: kopf.PRESENT})
def pod_event(namespace: str, labels: kopf.Labels, **kwargs) -> None:
    _reconcile_run((namespace, labels[RUN_LABEL]), **kwargs)


def watch_kueue() -> None:
    """Follow Kueue's Workloads of the runs' Jobs. Registered by __main__ only when the
    config turns Kueue on: a cluster without Kueue has no Workloads to watch."""
    group, version = KUEUE_API_VERSION.split("/")

    # Explicit ids: kopf passes each index to handlers as a keyword argument named by its id.
    @kopf.index(group, version, "workloads", id="run_workloads")
    def run_workloads(namespace: str, body: kopf.Body, **_) -> dict | None:
        summary = queueing.workload_summary(body)
        return {(namespace, summary["job"]): summary} if summary["job"] else None

    @kopf.index("batch", "v1", "jobs", id="queued_jobs",
                labels={RUN_LABEL: kopf.PRESENT, QUEUE_NAME_LABEL: kopf.PRESENT})
    def queued_jobs(namespace: str, name: str, labels: kopf.Labels, **_) -> dict:
        return {(namespace, name): labels[RUN_LABEL]}

    @kopf.on.event(group, version, "workloads", id="workload_event")
    def workload_event(namespace: str, body: kopf.Body, queued_jobs: kopf.Index,
                       **kwargs) -> None:
        job = queueing.workload_summary(body)["job"]
        for run in set(queued_jobs.get((namespace, job), [])):
            _reconcile_run((namespace, run), **kwargs)


_no_visibility_until = 0.0


def queue_position(namespace: str, jobs: list[dict], workloads: list[dict]) -> int | None:
    """The newest queued Job's Workload's place in its LocalQueue, while it waits (Kueue's
    visibility API; where the cluster does not serve it, asked again after a minute)."""
    global _no_visibility_until
    job = max((j for j in jobs if j["queue"]), key=lambda j: j["attempt"], default=None)
    wl = next((w for w in workloads if job and w["job"] == job["name"]), None)
    if not wl or wl["admitted"] or time.monotonic() < _no_visibility_until:
        return None
    positions = kube.queue_positions(namespace, job["queue"])  # type: ignore[index]
    if positions is None:
        _no_visibility_until = time.monotonic() + 60
        return None
    return positions.get(wl["name"])


# --- reconcile ----------------------------------------------------------------------------


def reconcile(key: Key, runs: kopf.Index, run_jobs: kopf.Index, run_pods: kopf.Index,
              config: OperatorConfig, run_workloads: kopf.Index | None = None) -> None:
    if key not in runs:
        return
    with waker.lock(key):
        # Read under the lock: a copy read before it may predate a status another thread
        # wrote meanwhile, and the write would be repeated.
        found = list(runs.get(key, []))
        if not found:
            return
        run = found[0]
        if run["metadata"].get("deletionTimestamp"):
            return
        written = _written.get(key)
        # A terminal status we wrote is final, even when the index meanwhile delivered an
        # older write of ours (several status writes in a row: progress, then a failure).
        if written and (written[0] == run["metadata"]["resourceVersion"] or (
                written[1].get("phase") in TERMINAL
                and (run.get("status") or {}).get("phase") not in TERMINAL)):
            run = {**run, "status": written[1]}
        started = time.monotonic()
        # Only the run's own children (by owner uid): a namesake's are never adopted.
        jobs, pods = observe.owned(run["metadata"]["uid"], list(run_jobs.get(key, [])),
                                   list(run_pods.get(key, [])))
        workloads = [w for j in jobs if run_workloads is not None
                     for w in run_workloads.get((key[0], j["name"]), [])]
        position = queue_position(key[0], jobs, workloads) if workloads else None
        plan = lifecycle.decide(run, jobs, pods, config=config,
                                polled=POLLER.polled(key) if POLLER else None,
                                workloads=workloads, position=position,
                                base_model=resolve_base_model(run) if not jobs else None)
        try:
            execute(key, run, plan, config)
        except kube.Conflict as conflict:
            report_conflict(key, run, plan, conflict)
            return
        except kube.Terminating:
            return  # the namespace is going away, and the run with it
        clear_conflict(key, run, plan)
        watch_progress(key, plan, pods)
        if plan.recheck_after is not None:  # e.g. when a start failure's grace is up
            RUNS.wake(key, plan.recheck_after + 1)
        metrics.RECONCILE.observe(time.monotonic() - started)


def resolve_base_model(run: dict) -> dict | str | None:
    """For a model:// base model not yet resolved: status.baseModel, or why it names no
    version (lifecycle.resolve_base_model records either)."""
    ref = registry.parse_ref(run["spec"]["baseModel"])
    if ref is None or (run.get("status") or {}).get("baseModel"):
        return None
    namespace = run["metadata"]["namespace"]
    try:
        name = registry.ref_version_name(ref, kube.get(API, "Model", namespace, ref.model))
        mv = kube.get(API, "ModelVersion", namespace, name)
        return registry.resolve_ref(run["spec"]["baseModel"], ref, mv, name)
    except registry.RefError as err:
        return str(err)


def report_conflict(key: Key, run: dict, plan: lifecycle.Plan, err: kube.Conflict) -> None:
    """A child's name is taken by an object that is not the run's: say so on the run (it is
    never adopted nor deleted) and look again later (a deleted namesake's children go)."""
    status = {**plan.status}
    set_condition(status, "Conflict", True, "NameTaken", str(err), format_time(),
                  run["metadata"].get("generation", 1))
    status["message"] = str(err)[:1024]
    if status != (run.get("status") or {}):
        kube.patch_status("FineTuneRun", *key, status)
        _written[key] = (run["metadata"]["resourceVersion"], status)
        kopf.event(run, type="Warning", reason="Conflict", message=str(err))
    RUNS.wake(key, CONFLICT_RECHECK_SECONDS)


def clear_conflict(key: Key, run: dict, plan: lifecycle.Plan) -> None:
    conditions = (plan.status.get("conditions") or [])
    if any(c["type"] == "Conflict" and c["status"] == "True" for c in conditions):
        status = {**plan.status}
        set_condition(status, "Conflict", False, "Resolved", "", format_time(),
                      run["metadata"].get("generation", 1))
        kube.patch_status("FineTuneRun", *key, status)
        _written[key] = (run["metadata"]["resourceVersion"], status)


def watch_progress(key: Key, plan: lifecycle.Plan, pods: list[dict]) -> None:
    """Have the poller follow the current attempt's rank 0 while the run is Running."""
    if POLLER is None:
        return
    attempt = plan.status.get("attempt")
    rank0 = next((p for p in pods if p["component"] == "trainer" and p["attempt"] == attempt
                  and p["index"] == 0 and p["phase"] == "Running"), None)
    url = rank0 and poller.progress_url(rank0)
    if plan.status.get("phase") == "Running" and url:
        POLLER.want(key, attempt, url)
    else:
        POLLER.drop(key)


def execute(key: Key, run: dict, plan: lifecycle.Plan, config: OperatorConfig) -> None:
    namespace, name = key
    if plan.register is not None:  # before the status: Succeeded means registered
        lifecycle.registered(plan, register(run, plan.register))
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
    uid = run["metadata"]["uid"]
    run_for_render = {**run, "status": plan.status}
    for attempt in plan.delete_attempts:
        for child in render.attempt_children(name, attempt):  # only the run's own
            kube.delete_owned(child.api_version, child.kind, namespace, child.name, uid)
    if plan.create_preflight:
        for obj in render.preflight_objects(run_for_render, config):
            kube.create_owned(obj, namespace, uid)
    if plan.suspend_job:
        job, suspend = plan.suspend_job
        kube.patch("batch/v1", "Job", namespace, job, {"spec": {"suspend": suspend}})
    if plan.activate:  # a Kueue run's spec.suspend: Kueue stops or requeues it
        workload, active = plan.activate
        kube.patch(KUEUE_API_VERSION, "Workload", namespace, workload, {"spec": {"active": active}})
    if plan.create_attempt:
        metrics.ATTEMPTS.labels(namespace).inc()
        if plan.create_attempt > 1:
            metrics.RESTARTS.labels(namespace).inc()
        objects = render.attempt_objects(run_for_render, plan.create_attempt, config,
                                         _promoted(namespace, run["spec"]["modelName"]))
        # The Job last: its existence says the attempt was created, so a crash before it
        # makes the next reconcile create the attempt again (existing objects are kept).
        *parts, job = objects
        list(CREATORS.map(lambda obj: kube.create_owned(obj, namespace, uid), parts))
        kube.create_owned(job, namespace, uid)
    for event_type, reason, message in plan.events:
        kopf.event(run, type=event_type, reason=reason, message=message)
        log.info("%s/%s: %s: %s", namespace, name, reason, message)
        if reason == "Stalled":
            metrics.STALLS.labels(namespace, name, run["spec"]["modelName"]).inc()


def _promoted(namespace: str, model_name: str) -> dict | None:
    """{name, metrics} of the version the Model's promotion alias points to: the model card
    compares the new version with it."""
    model = kube.get(API, "Model", namespace, model_name) or {}
    alias = ((model.get("spec") or {}).get("promotion") or {}).get("alias", "production")
    target = ((model.get("status") or {}).get("aliases") or {}).get(alias)
    if not (target and target.get("modelVersion")):
        return None
    mv = kube.get(API, "ModelVersion", namespace, target["modelVersion"])
    return mv and {"name": mv["metadata"]["name"], "metrics": mv["spec"].get("metrics", {})}


# --- registration -------------------------------------------------------------------------


def register(run: dict, summary: registry.Summary) -> dict:
    """Create the run's ModelVersion (once; a taken number takes the next) and record it in
    its Model, creating the Model when it is new. Returns the ModelVersion."""
    namespace, uid = run["metadata"]["namespace"], run["metadata"]["uid"]
    model_name = run["spec"]["modelName"]
    with waker.lock(("model", namespace, model_name)):
        model = kube.get(API, "Model", namespace, model_name)
        if model is None:
            kube.create({"apiVersion": API, "kind": "Model",
                         "metadata": {"name": model_name}, "spec": {}}, namespace)
            model = kube.get(API, "Model", namespace, model_name)

        mv, versions = registry.allocate_version(
            uid,
            make=lambda number, versions: registry.model_version(
                run, summary, number, registry.baseline(model, versions),
                registry.promoted_alias(model)),
            list_versions=lambda: kube.list_objects(API, "ModelVersion", namespace,
                                                    f"{MODEL_LABEL}={model_name}"),
            create=lambda candidate: kube.create(candidate, namespace),
            get=lambda name: kube.get(API, "ModelVersion", namespace, name))
        update = registry.record_version(model, mv, versions, format_time())
        name = model["metadata"]["name"]
        for gate in update.blocked_gates:
            metrics.GATE_FAILURES.labels(namespace, name, gate).inc()
        if update.promoted:
            metrics.PROMOTIONS.labels(namespace, name, update.promoted).inc()
        for event_type, reason, message in update.events:
            kopf.event(model, type=event_type, reason=reason, message=message)
        kube.patch_status("Model", namespace, name, update.status)
        return mv


# --- serving ------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURALS["Model"])
def model_event(type: str, body: kopf.Body, namespace: str, name: str, **_) -> None:
    """Keep pinned aliases and serving targets in step with the Model."""
    if type == "DELETED":
        return
    with waker.lock(("model", namespace, name)):
        model = kube.get(API, "Model", namespace, name)
        if model is None:
            return
        pinned = {alias: kube.get(API, "ModelVersion", namespace, registry.version_name(name, v))
                  for alias, v in registry.pins_to_move(model).items()}
        update = registry.pin_aliases(model, pinned, format_time())
        if update.status != (model.get("status") or {}):
            kube.patch_status("Model", namespace, name, update.status)
        for event_type, reason, message in update.events:
            kopf.event(model, type=event_type, reason=reason, message=message)
        target = (update.status.get("aliases") or {}).get(registry.promoted_alias(model))
        for serving in ((model.get("spec") or {}).get("servingTargets") or []) if target else []:
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


@kopf.index(GROUP, VERSION, PLURALS["FineTuneSchedule"])
def schedule_index(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): slim(body)}


@kopf.index(GROUP, VERSION, PLURALS["FineTuneRun"], labels={SCHEDULE_LABEL: kopf.PRESENT})
def schedule_runs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {(namespace, labels[SCHEDULE_LABEL]): slim(body)}


@kopf.on.event(GROUP, VERSION, PLURALS["FineTuneSchedule"])
def schedule_event(type: str, namespace: str, name: str, schedule_index: kopf.Index,
                   schedule_runs: kopf.Index, **_) -> None:
    SCHEDULER.bind(lambda key: reconcile_schedule(key, schedule_index, schedule_runs))
    if type == "DELETED":
        _written.pop(("schedule", namespace, name), None)
        SCHEDULER.failures.pop((namespace, name), None)
        return
    SCHEDULER.wake((namespace, name))


def reconcile_schedule(key: Key, index: kopf.Index, runs_index: kopf.Index) -> None:
    found = list(index.get(key, []))
    if not found:
        return
    namespace, name = key
    with waker.lock(("schedule", namespace, name)):
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
        for run_name in plan.delete:  # only runs the schedule owns
            kube.delete_owned(API, "FineTuneRun", namespace, run_name, uid)
        try:
            for run in plan.create:
                kube.create_owned(run, namespace, uid)
        except kube.Terminating:
            return
        except kube.Conflict as err:
            kopf.event(schedule, type="Warning", reason="Conflict", message=str(err))
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
