"""The reconciler: one object, built at start-up, that carries out the pure decisions.

It owns what the operator keeps between events: the indexes it reads (its own watches'
and kopf's, `index`), the wakers that reconcile runs, schedules and Models when due
(`waker.Waker`), the progress poller (`poller.Poller`), the statuses it wrote last, and the
pool that creates an attempt's objects. A reconcile reads a run's summaries from the
indexes, asks `lifecycle.decide` for a plan and executes it through `kube`; registration
applies `registry`'s decisions, schedules `schedules.plan`'s. Every choice is made in those
pure modules; this file only does I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from flywheel_trainer.contract import Summary

from . import (
    isolation,
    kube,
    lifecycle,
    metrics,
    objects,
    observe,
    poller,
    queueing,
    registry,
    render,
    schedules,
    waker,
)
from .api import FineTuneRunStatus, ResolvedModel, Run, set_condition, status_document, status_patch
from .config import OperatorConfig
from .vocab import API_VERSION as API
from .vocab import (
    KSERVE_API_VERSION,
    KUEUE_API_VERSION,
    MODEL_LABEL,
    RUN_UID_LABEL,
    SCHEDULE_LABEL,
    Key,
    Written,
    format_time,
    trusted,
    wrote,
)

log = logging.getLogger("flywheel")
CONFLICT_RECHECK_SECONDS = 30
#: How long a Job this operator created is taken as existing before the watch shows it.
EXPECTATION_SECONDS = 60.0


class Reconciler:
    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.runs = waker.Waker("run", workers=48)
        self.schedules = waker.Waker("schedule")
        self.models = waker.Waker("model", workers=4)
        #: Rank 0's progress of every training run, fetched by one shared thread.
        self.poller = poller.Poller(config.progressIntervalSeconds, on_update=self.runs.wake)
        #: The status last written per run or schedule, and the resourceVersions older than
        #: that write: while the index holds one of them, it has not caught up (vocab.trusted).
        self.written: dict[tuple, Written] = {}
        #: The Job of an attempt just created, until the watch delivers it (the Job
        #: controller's "expectations"): a reconcile in between must not create it again.
        self.expected: dict[Key, tuple[float, str]] = {}  # key -> (since, Job name)
        self.creators = ThreadPoolExecutor(max_workers=48, thread_name_prefix="flywheel-create")
        #: Namespaces whose fence (isolation.namespace_fence) this process has put in place.
        self.fenced: set[str] = set()
        self.visibility = queueing.Visibility()
        #: runs, run_jobs, run_pods, models, schedule_runs (watches.py); schedule_index and
        #: run_workloads (kopf's)
        self.index: dict[str, Mapping[Any, Any]] = {}
        for table, size in {
                "locks": waker.lock_count, "written": lambda: len(self.written),
                "expected_jobs": lambda: len(self.expected),
                "run_wakeups": lambda: len(self.runs.heap),
                "run_failures": lambda: len(self.runs.failures),
                "poll_targets": lambda: len(self.poller.targets),
                "poll_queue": lambda: len(self.poller.heap),
                # the indexes, by run: a run gone must leave none of its entries behind
                **{f"index_{name}": (lambda name=name: len(self.index.get(name, ())))
                   for name in ("runs", "run_jobs", "run_pods")}}.items():
            metrics.track_table(table, size)

    # --- high availability: a standby replica does nothing ------------------------------

    def pause(self, why: str = "another replica is active") -> None:
        """kopf paused this replica (a peer of higher priority is active): stop every timer
        and the poller too, not only kopf's watches."""
        log.warning("flywheel operator: paused (%s)", why)
        for w in (self.runs, self.schedules, self.models):
            w.pause()
        self.poller.pause()

    def resume(self) -> None:
        """This replica is active again: reconcile every run and schedule from the indexes."""
        log.warning("flywheel operator: active")
        for w in (self.runs, self.schedules, self.models):
            w.resume()
        self.poller.resume()
        for w, name in ((self.runs, "runs"), (self.schedules, "schedule_index"),
                        (self.models, "models")):
            for key in list(self.index.get(name, {})):
                w.wake(key)

    def start(self, **indexes: Mapping[Any, Any] | None) -> None:
        """Read these indexes (each is kept by its watch, and never replaced) and start
        reconciling what was woken meanwhile."""
        self.index.update({k: v for k, v in indexes.items() if v is not None})
        self.runs.start_with(self.reconcile_run)
        self.schedules.start_with(self.reconcile_schedule)
        self.models.start_with(lambda key: self.model_changed(*key))

    # --- what the watches report ----------------------------------------------------------

    def run_event(self, type: str, key: Key, run: dict) -> None:
        """A run was added, changed or deleted (watches.py): reconcile it at once, and its
        schedule."""
        schedule = (run["metadata"].get("labels") or {}).get(SCHEDULE_LABEL)
        if schedule:
            self.schedules.wake((key[0], schedule))
        if type == "DELETED":
            self.run_deleted(key, run["spec"].get("modelName", ""))
        else:
            self.runs.wake(key)

    def model_event(self, type: str, key: Key, model: dict) -> None:
        """A Model changed: keep its pinned aliases and serving targets in step."""
        if type != "DELETED":
            self.models.wake(key)

    # --- runs -----------------------------------------------------------------------------

    def run_deleted(self, key: Key, model: str) -> None:
        metrics.forget_run(*key, model)
        self.written.pop(key, None)
        self.expected.pop(key, None)
        # Its namespace may be going (or a user removed the fence): the next attempt there
        # puts the fence in place again, one request that finds it there in the usual case.
        self.fenced.discard(key[0])
        self.runs.failures.pop(key, None)
        self.poller.drop(key)

    def reconcile_run(self, key: Key) -> None:
        if key not in self.index["runs"]:
            return
        with waker.lock(key):
            # Read under the lock: a copy read before it may predate a status another thread
            # wrote meanwhile, and the write would be repeated.
            found = list(self.index["runs"].get(key, []))
            if not found or found[0]["metadata"].get("deletionTimestamp"):
                return
            # The run enters the decisions here, parsed once into the API models.
            run = Run.parse(trusted(found[0], self.written.get(key)))
            started = time.monotonic()
            # Only the run's own children (by owner uid): a namesake's are never adopted.
            jobs, pods = objects.owned(run.uid,
                                       list(self.index["run_jobs"].get(key, [])),
                                       list(self.index["run_pods"].get(key, [])))
            if self.awaiting_job(key, jobs):
                return
            workloads = [w for j in jobs for w in self.index.get("run_workloads", {}).get(
                (key[0], j.name), [])]
            position = self.queue_position(key[0], jobs, workloads) if workloads else None
            plan = lifecycle.decide(run, jobs, pods, config=self.config,
                                    polled=self.poller.polled(key), workloads=workloads,
                                    position=position,
                                    base_model=self.resolve_base_model(run) if not jobs else None)
            try:
                self.execute(key, run, plan)
            except kube.Conflict as conflict:
                self.report_conflict(key, run, plan, conflict)
                return
            except kube.Terminating:
                self.fenced.discard(key[0])
                return  # the namespace is going away, and the run with it
            self.clear_conflict(key, run, plan)
            url = observe.progress_url(observe.rank0(pods, plan.status.attempt))
            if plan.status.phase == "Running" and url and plan.status.attempt:
                self.poller.want(key, plan.status.attempt, url)
            else:
                self.poller.drop(key)
            if plan.recheck_after is not None:  # e.g. when a start failure's grace is up
                self.runs.wake(key, plan.recheck_after + 1)
            metrics.RECONCILE.observe(time.monotonic() - started)

    def awaiting_job(self, key: Key, jobs: list[objects.JobSummary]) -> bool:
        """True while the index does not show the Job this operator just created, as the Job
        controller's expectations: until then a reconcile would find the run without it and
        create it again, and the Job's own event reconciles the run anyway."""
        since, name = self.expected.get(key, (0.0, None))
        if name is None:
            return False
        if any(j.name == name for j in jobs) or (
                time.monotonic() - since > EXPECTATION_SECONDS):
            del self.expected[key]
            return False
        return True

    def queue_position(self, namespace: str, jobs: list[objects.JobSummary],
                       workloads: list[objects.WorkloadSummary]) -> int | None:
        """The waiting Workload's place in its LocalQueue (Kueue's visibility API)."""
        ask = queueing.position_to_ask(jobs, workloads)
        if ask is None or not self.visibility.due(time.monotonic()):
            return None
        queue, workload = ask
        positions = kube.queue_positions(namespace, queue)
        if positions is None:
            self.visibility.unavailable(time.monotonic())
            return None
        return positions.get(workload)

    def resolve_base_model(self, run: Run) -> ResolvedModel | str | None:
        """For a model:// base model not yet resolved: status.baseModel, or why it names no
        version (lifecycle.resolve_base_model records either)."""
        ref = registry.parse_ref(run.spec.baseModel)
        if ref is None or run.status.baseModel:
            return None
        try:
            name = registry.ref_version_name(ref, kube.get(API, "Model", run.namespace,
                                                           ref.model))
            mv = kube.get(API, "ModelVersion", run.namespace, name)
            return registry.resolve_ref(run.spec.baseModel, ref, mv, name)
        except registry.RefError as err:
            return str(err)

    def write_status(self, key: Key, run: Run, status: FineTuneRunStatus,
                     force: bool = False) -> bool:
        """Merge-patch the run's status where it differs from what the run has (or `force`);
        the status is serialised here, at the edge, as the API models write it."""
        old, new = status_document(run.status), status_document(status)
        if new == old and not force:
            return False
        patch = status_patch(old, new)
        written = kube.patch_status("FineTuneRun", *key, patch) or {}
        self.written[key] = wrote(self.written.get(key), run.resource_version,
                                  written.get("metadata", {}).get("resourceVersion"), patch)
        return True

    def report_conflict(self, key: Key, run: Run, plan: lifecycle.Plan,
                        err: kube.Conflict) -> None:
        """A child's name is taken by an object that is not the run's: say so on the run (it
        is never adopted nor deleted) and look again later (a namesake's children go)."""
        status = plan.status.model_copy(deep=True, update={"message": str(err)[:1024]})
        set_condition(status, "Conflict", True, "NameTaken", str(err),
                      format_time(), run.generation)
        if self.write_status(key, run, status):
            kube.post_event(run.ref, "Warning", "Conflict", str(err))
        self.runs.wake(key, CONFLICT_RECHECK_SECONDS)

    def clear_conflict(self, key: Key, run: Run, plan: lifecycle.Plan) -> None:
        if any(c.type == "Conflict" and c.status == "True" for c in plan.status.conditions):
            status = plan.status.model_copy(deep=True)
            set_condition(status, "Conflict", False, "Resolved", "", format_time(),
                          run.generation)
            self.write_status(key, run, status, force=True)

    def execute(self, key: Key, run: Run, plan: lifecycle.Plan) -> None:
        namespace, name = key
        uid = run.uid
        if plan.register is not None:  # before the status: Succeeded means registered
            lifecycle.registered(plan, self.register(run, plan.register))
        run_for_render = dataclasses.replace(run, status=plan.status)
        # A gang's Service and NetworkPolicy are created while its status is written (new
        # names: a crash leaves nothing the next reconcile would not create again).
        job, parts = self.start_attempt(key, run_for_render, plan.create_attempt) \
            if plan.create_attempt else (None, [])
        job_first = job is not None and not parts and self.job_first(run, plan, job)
        if job_first:
            # A run's first lone Job goes first; its status follows with the Job's own event
            # and its pods' first news (lifecycle.adopt_attempt, as after a crash in between):
            # nothing between apply and Job but the Job, and one status write less per run.
            # One that cannot be created leaves the status saying it is being created.
            try:
                kube.create_owned(job, namespace, uid)
            except (kube.Conflict, kube.Terminating):
                raise  # reported on the run, or its namespace is going (reconcile_run)
            except Exception:
                self.write_status(key, run, plan.status)
                raise
        # Else the status first: a crash after this line resumes at the recorded attempt.
        elif self.write_status(key, run, plan.status):
            metrics.count_spend(namespace, run.spec.modelName, run.status, plan.status)
        for attempt in plan.delete_attempts:
            for child in render.attempt_children(name, attempt):  # only the run's own
                kube.delete_owned(child.api_version, child.kind, namespace, child.name, uid)
        if plan.create_preflight:
            for obj in render.preflight_objects(run_for_render, self.config):
                kube.create_owned(obj, namespace, uid)
        if plan.suspend_job:
            job_name, suspend = plan.suspend_job
            kube.patch("batch/v1", "Job", namespace, job_name, {"spec": {"suspend": suspend}})
        if plan.activate:  # a Kueue run's spec.suspend: Kueue stops or requeues it
            workload, active = plan.activate
            kube.patch(KUEUE_API_VERSION, "Workload", namespace, workload,
                       {"spec": {"active": active}})
        if job is not None:
            # The Job last, after its status and parts: its existence says the attempt was
            # created, so a crash before it makes the next reconcile create the attempt again.
            if not job_first:
                for part in parts:
                    part.result()
                kube.create_owned(job, namespace, uid)
            # Until the watch shows it; for a Job that went first, the reconcile its event
            # brings writes the status.
            self.expected[key] = (time.monotonic(), job["metadata"]["name"])
        for event_type, reason, message in plan.events:
            kube.post_event(run.ref, event_type, reason, message)
            log.info("%s/%s: %s: %s", namespace, name, reason, message)
            if reason == "Stalled":
                metrics.STALLS.labels(namespace, name, run.spec.modelName).inc()

    def start_attempt(self, key: Key, run: Run, attempt: int) -> tuple[dict, list[Future]]:
        """Render `attempt` and start creating every object of it but the Job (returned)."""
        namespace = key[0]
        self.fence(namespace)
        metrics.ATTEMPTS.labels(namespace).inc()
        if attempt > 1:
            metrics.RESTARTS.labels(namespace).inc()
        model = next(iter(self.index["models"].get((namespace, run.spec.modelName), [])), None)
        baseline = registry.promoted_summary(
            model, lambda mv: kube.get(API, "ModelVersion", namespace, mv))
        *parts, job = render.attempt_objects(run, attempt, self.config, baseline)
        return job, [self.creators.submit(kube.create_owned, obj, namespace, run.uid)
                     for obj in parts]

    @staticmethod
    def job_first(run: Run, plan: lifecycle.Plan, job: dict) -> bool:
        """Whether the attempt's Job may be created before its status is written: a run's
        first attempt, started at once (not suspended, not queued), of a run whose status
        records nothing yet, so that the Job's own event adopts it (lifecycle.adopt_attempt):
        not after a preflight, nor for a registry base model (resolved once, and recorded
        first)."""
        return (plan.create_attempt == 1 and not run.status.attempt
                and not job["spec"].get("suspend")
                and registry.parse_ref(run.spec.baseModel) is None)

    def fence(self, namespace: str) -> None:
        """The namespace's fence over its trainer pods, in place before its first Job (once
        per namespace and process; an existing one is brought to this config's peers). With
        policies turned off, a fence left from before goes: it would cut a gang's pods off
        from each other with no attempt's policy to let them through."""
        if namespace in self.fenced:
            return
        with waker.lock(("fence", namespace)):  # the first of a burst's runs puts it there
            if namespace in self.fenced:
                return
            fence = isolation.namespace_fence(self.config)
            if fence is None:
                kube.delete(isolation.NETWORK_POLICY_API, "NetworkPolicy", namespace,
                            isolation.FENCE_NAME)
            elif not kube.create(fence, namespace):
                kube.patch(fence["apiVersion"], fence["kind"], namespace, isolation.FENCE_NAME,
                           {"metadata": {"labels": fence["metadata"]["labels"]},
                            "spec": fence["spec"]})
            self.fenced.add(namespace)

    # --- registration and serving -------------------------------------------------------

    def register(self, run: Run, summary: Summary) -> dict:
        """Create the run's ModelVersion (once, under the next free number) and record it in
        its Model, creating the Model when it is new. Returns the ModelVersion."""
        namespace, uid, model_name = run.namespace, run.uid, run.spec.modelName
        with waker.lock(("model", namespace, model_name)):
            model = kube.get(API, "Model", namespace, model_name)
            if model is None:
                kube.create({"apiVersion": API, "kind": "Model",
                             "metadata": {"name": model_name}, "spec": {}}, namespace)
                model = kube.get(API, "Model", namespace, model_name)
            def get(name: str) -> dict | None:
                return kube.get(API, "ModelVersion", namespace, name)

            def listed(selector: str) -> list[dict]:
                return kube.list_objects(API, "ModelVersion", namespace,
                                         f"{MODEL_LABEL}={model_name}{selector}")

            base = registry.baseline(model, get)
            mv = registry.allocate_version(
                uid,
                make=lambda number: registry.model_version(
                    run, summary, number, base, registry.promoted_alias(model)),
                known=registry.recorded_numbers(model),
                list_own=lambda: listed(f",{RUN_UID_LABEL}={uid}"),
                list_versions=lambda: listed(""),
                create=lambda candidate: kube.create(candidate, namespace), get=get)
            update = registry.record_version(model, mv, base, format_time())
            name = model["metadata"]["name"]
            for gate in update.blocked_gates:
                metrics.GATE_FAILURES.labels(namespace, name, gate).inc()
            if update.promoted:
                metrics.PROMOTIONS.labels(namespace, name, update.promoted).inc()
            for event_type, reason, message in update.events:
                kube.post_event(model, event_type, reason, message)
            kube.patch_status("Model", namespace, name, update.status)
            return mv

    def model_changed(self, namespace: str, name: str) -> None:
        """Keep pinned aliases and serving targets in step with the Model."""
        with waker.lock(("model", namespace, name)):
            model = kube.get(API, "Model", namespace, name)
            if model is None:
                return
            pinned = {alias: kube.get(API, "ModelVersion", namespace,
                                      registry.version_name(name, v))
                      for alias, v in registry.pins_to_move(model).items()}
            update = registry.pin_aliases(model, pinned, format_time())
            if update.status != (model.get("status") or {}):
                kube.patch_status("Model", namespace, name, update.status)
            for event_type, reason, message in update.events:
                kube.post_event(model, event_type, reason, message)
            target = (update.status.get("aliases") or {}).get(registry.promoted_alias(model))
            for serving in ((model.get("spec") or {}).get("servingTargets") or []
                            if target else []):
                self.sync_serving(model, serving, target)

    def sync_serving(self, model: dict, serving: dict, target: dict) -> None:
        """Point one serving target (a Deployment or a KServe InferenceService) at `target`."""
        namespace = model["metadata"]["namespace"]
        wanted = (target["uri"], target["digest"])
        if serving.get("inferenceService"):
            kind, name, api = "InferenceService", serving["inferenceService"], KSERVE_API_VERSION
            obj = kube.get(api, kind, namespace, name)
            current = obj and registry.isvc_current(obj)
            patch, content_type = registry.isvc_patch(*wanted), kube.MERGE_PATCH
        else:
            kind, name, api = "Deployment", serving["deployment"], "apps/v1"
            obj = kube.get(api, kind, namespace, name)
            current = obj and registry.serving_current(obj, serving["container"])
            patch = registry.serving_patch(serving["container"], *wanted)
            content_type = kube.STRATEGIC_MERGE_PATCH
        if obj is None:
            kube.post_event(model, "Warning", "ServingTargetMissing", f"{kind} {name} not found")
            return
        if current == wanted:
            return
        kube.patch(api, kind, namespace, name, patch, content_type=content_type)
        kube.post_event(model, "Normal", "ServingUpdated",
                        f"{kind} {name} now serves version {target['version']} "
                        f"({target['digest'][:19]}...)")

    # --- schedules ------------------------------------------------------------------------

    def schedule_deleted(self, key: Key) -> None:
        self.written.pop(("schedule", *key), None)
        self.schedules.failures.pop(key, None)

    def reconcile_schedule(self, key: Key) -> None:
        found = list(self.index.get("schedule_index", {}).get(key, []))
        if not found:
            return
        namespace, name = key
        with waker.lock(("schedule", namespace, name)):
            schedule = trusted(found[0], self.written.get(("schedule", *key)))
            if schedule["metadata"].get("deletionTimestamp"):
                return
            uid = schedule["metadata"]["uid"]
            runs = schedules.owned_runs(
                schedule, self.index.get("schedule_runs", {}).get(key, []))
            plan = schedules.plan(schedule, runs, datetime.now(UTC))
            for run_name in plan.delete:  # only runs the schedule owns
                kube.delete_owned(API, "FineTuneRun", namespace, run_name, uid)
            try:
                for run in plan.create:
                    kube.create_owned(run, namespace, uid)
            except kube.Terminating:
                return
            except kube.Conflict as err:
                kube.post_event(schedule, "Warning", "Conflict", str(err))
            # None values are removals in a merge patch; compare without them.
            if {k: v for k, v in plan.status.items() if v is not None} != (
                    schedule.get("status") or {}):
                written = kube.patch_status("FineTuneSchedule", namespace, name,
                                            plan.status) or {}
                self.written[("schedule", *key)] = wrote(
                    self.written.get(("schedule", *key)),
                    schedule["metadata"]["resourceVersion"],
                    written.get("metadata", {}).get("resourceVersion"), plan.status)
            for event_type, reason, message in plan.events:
                kube.post_event(schedule, event_type, reason, message)
                log.info("schedule %s/%s: %s: %s", namespace, name, reason, message)
        if plan.requeue_after is not None:
            self.schedules.wake(key, min(plan.requeue_after, 3600.0))
