"""The FineTuneRun lifecycle as a pure function: observed state in, a plan out.

`decide(run, jobs, pods, now)` looks at the run and the slim summaries of its Jobs and Pods
(objects.JobSummary / PodSummary, kept in kopf indexes, see handlers.py) and returns a
`Plan`: the status the run should have and the few actions that get it there. No I/O happens
here, so every transition is unit-tested without a cluster, and re-running `decide` on the
same inputs is a no-op plan.

Attempts: the attempt number is the larger of `status.attempt` and the newest attempt label
among the run's Jobs. The operator records attempt n+1 in status *before* it tears down
attempt n and creates n+1, so a crash at any point resumes at the right attempt and the
deterministic child names make every create idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from flywheel_trainer.contract import Summary, SummaryError, parse_summary

from . import failures, observe, queueing
from .api import (
    FineTuneRunStatus,
    GangStatus,
    PreflightStatus,
    Progress,
    QueueStatus,
    ResolvedModel,
    Run,
    checked,
    has_condition,
    set_condition,
    status_document,
)
from .attempts import (
    add_gpu_hours,
    pods_behind,
    preflight_result,
    preflight_status,
    record_attempt,
)
from .config import OperatorConfig
from .failures import DISRUPTION, FATAL, RETRY, Failure
from .objects import JobSummary, PodSummary, WorkloadSummary
from .observe import Polled
from .policy import refusal
from .render import run_paths
from .vocab import (
    MODEL_REF_SCHEME,
    TERMINAL,
    comet_experiment_url,
    experiment_key,
    format_time,
    pods_gpu_hours,
)

# --- the plan -----------------------------------------------------------------------------


@dataclass
class Plan:
    """What the handler does, in order: register, patch status, delete, create, post events."""

    status: FineTuneRunStatus                  # the run's whole new status
    was: str | None = None                     # its phase before (events fire on a change)
    register: Summary | None = None            # register rank 0's model, then `registered()`
    create_attempt: int | None = None          # render and create this attempt's children
    create_preflight: bool = False             # render and create the preflight Job
    delete_attempts: list[int] = field(default_factory=list)
    suspend_job: tuple[str, bool] | None = None  # (job name, suspend)
    activate: tuple[str, bool] | None = None     # (Workload name, spec.active): Kueue runs
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, msg)
    recheck_after: float | None = None         # decide again in this many seconds
    now: str = ""                              # the decision's time, as written in status
    generation: int = 1                        # the run's metadata.generation

    def transition(self, phase: str, reason: str, message: str, event_type: str = "Normal"):
        if phase != self.was:
            self.events.append((event_type, reason, message))
        self.status.phase = phase  # type: ignore[assignment]
        self.status.message = message

    def condition(self, type_: str, value: bool, reason: str, message: str) -> None:
        """Set a condition of the run (observedGeneration: the run's generation)."""
        set_condition(self.status, type_, value, reason, message, self.now,
                      self.generation)

    def fail(self, reason: str, message: str) -> None:
        """The run failed: completionTime, phase Failed (a Warning event) and the condition."""
        self.status.completionTime = self.now
        self.transition("Failed", reason, message, "Warning")
        self.condition("Failed", True, reason, message)


def decide(run: Run, jobs: list[JobSummary], pods: list[PodSummary],
           now: datetime | None = None, config: OperatorConfig | None = None,
           workloads: list[WorkloadSummary] | None = None,
           position: int | None = None, polled: Polled | None = None,
           base_model: ResolvedModel | str | None = None) -> Plan:
    """The run's next status and actions (the status checked against FineTuneRunStatus).
    One step per stage: refuse, preflight, start_attempt, succeed, preempt (Kueue took it
    back), fail_attempt (restart or give up), else follow_queued (a Kueue run) or
    follow_attempt (suspend, scheduling, running, progress, stalls); a new stage is a new
    step here. `polled`: what the progress poller last heard from rank 0. `workloads`:
    Kueue's Workloads of the run's Jobs (objects.WorkloadSummary); `position`: the current
    one's place in its LocalQueue, where Kueue's visibility API gives it. `base_model`: for a
    model:// base model not yet resolved, its resolution (status.baseModel) or why it cannot
    be."""
    config = config or OperatorConfig()
    old = run.status
    plan = Plan(status=old.model_copy(deep=True), was=old.phase, now=format_time(now),
                generation=run.generation)
    ts, status = plan.now, plan.status
    status.observedGeneration = run.generation
    pre_jobs = [j for j in jobs if j.component == "preflight"]
    pre_pods = [p for p in pods if p.component == "preflight"]
    jobs = [j for j in jobs if j.component != "preflight"]
    pods = [p for p in pods if p.component != "preflight"]
    attempt = status.attempt = max([old.attempt or 0] + [j.attempt for j in jobs]) or 1
    plan.delete_attempts = sorted({j.attempt for j in jobs if j.attempt < attempt})
    job = next((j for j in jobs if j.attempt == attempt), None)
    current = [p for p in pods if p.attempt == attempt]
    # Pods of a suspended Job are stopped on purpose (they may end Failed, as kubelets
    # report a SIGTERM): not a failure of the attempt.
    failed_pod = not (job and job.suspended) and any(p.phase == "Failed" for p in current)
    stuck, plan.recheck_after = failures.start_failure(current, ts,
                                                       config.startFailureGraceSeconds)
    # A Job is under Kueue when it was created with a queue; a new one when the config says.
    queue = job.queue if job else config.kueue.queue(run.namespace, run.spec.queueName)
    wl = next((w for w in workloads or [] if job and w.job == job.name), None)
    heard = polled if polled and polled.attempt == attempt else None  # this attempt's rank 0

    if job is not None and not old.attempt and plan.was not in TERMINAL:
        adopt_attempt(plan, run, job)
    if plan.was in TERMINAL:
        pass
    elif job is None and (why := refusal(run, config)):
        plan.fail(why.reason, why.message)
    elif job is None and not resolve_base_model(plan, run, base_model):
        pass  # a registry base model that names no version: the run failed
    elif (job is None and attempt == 1 and run.spec.preflight.enabled
          and (status.preflight is None or status.preflight.phase != "Succeeded")
          and not preflight(plan, run, pre_jobs, pre_pods, config)):
        pass  # preflight is running, or failed the run
    elif job is None:
        start_attempt(plan, run, queue)
    elif not stuck and pods_behind(job, current):
        plan.recheck_after = PODS_BEHIND_RECHECK_SECONDS  # the pods' own events follow
    elif job.complete and not failed_pod:
        succeed(plan, run, job, current, config)
    elif queue and queueing.preempted(wl) and not run.spec.suspend:
        preempt(plan, run, job, wl, current, config, queue)  # type: ignore[arg-type]
    elif job.failed is not None or failed_pod or stuck:
        fail_attempt(plan, run, job, current, config, stuck or failures.classify(current, job))
    elif queue:
        state = queueing.queue_state(run, status, attempt, wl, queue, position)
        if apply_queue(plan, state):
            follow_pods(plan, run, job, current, config, heard)
    else:
        follow_attempt(plan, run, job, current, config, heard)
    checked(FineTuneRunStatus, status_document(status))  # values within the API's bounds
    return plan


def preflight(plan: Plan, run: Run, jobs: list[JobSummary], pods: list[PodSummary],
              config: OperatorConfig) -> bool:
    """Start, follow or conclude the preflight Job; True once it passed (training may start)."""
    status, ts = plan.status, plan.now
    before = status.preflight or PreflightStatus()
    status.startTime = status.startTime or ts
    if not jobs:
        plan.create_preflight = True
        status.preflight = PreflightStatus(phase="Running", startTime=before.startTime or ts)
        plan.transition("Pending", "PreflightStarted",
                        "preflight: checking data, chat template and categories on CPU")
        return False
    result = preflight_result(pods, jobs[0])
    if result is None:
        status.preflight = before.model_copy(update={"phase": "Running", "job": jobs[0].name})
        status.message = "preflight: checking data, chat template and categories on CPU"
        return False
    figures = preflight_status(result, run.spec, config)
    pre = status.preflight = before.model_copy(update={
        **status_document(figures), "job": jobs[0].name, "completionTime": ts,
        "phase": "Succeeded" if result.ok else "Failed"})
    if not result.ok:
        first = "; ".join(figures.problems[:3]) or "preflight failed"
        if figures.missingCategories:
            first += "; missing categories: " + ", ".join(
                f"{c} ({figures.categories.get(c, 0)})" for c in figures.missingCategories)
        pre.message = first[:1024]
        plan.fail("PreflightFailed", f"preflight failed: {first}"[:1024])
        return False
    pre.message = f"{figures.examples} examples, {figures.tokens} tokens, {figures.steps} steps"
    plan.events.append(("Normal", "PreflightPassed", pre.message))
    return True


def resolve_base_model(plan: Plan, run: Run, base_model: ResolvedModel | str | None) -> bool:
    """Record where the run's output and checkpoints go and, for a model:// base model, the
    version it resolved to (once: later attempts train from the same version, wherever the
    alias has moved since). False when the reference names no version: the run fails."""
    status = plan.status
    status.outputUri, status.checkpointUri = run_paths(run)
    if status.baseModel or not run.spec.baseModel.startswith(MODEL_REF_SCHEME):
        return True
    if isinstance(base_model, ResolvedModel):
        status.baseModel = base_model
        plan.events.append(("Normal", "BaseModelResolved", f"{base_model.ref} is "
                            f"{base_model.modelVersion} ({base_model.digest[:19]}...)"))
        return True
    plan.fail("BaseModelNotFound",
              f"baseModel {run.spec.baseModel}: {base_model or 'not resolved'}")
    return False


def suspended_condition(plan: Plan, suspend: bool) -> None:
    plan.condition("Suspended", suspend, "Suspended" if suspend else "Active",
                   "spec.suspend is true" if suspend else "")


def record_start(plan: Plan, run: Run) -> None:
    """What a run's first attempt records: its start, its Comet experiment."""
    status = plan.status
    status.startTime = status.startTime or plan.now
    status.experimentKey = status.experimentKey or experiment_key(run.uid)
    comet = run.spec.tracking.comet
    if comet:
        status.trackingUrl = status.trackingUrl or comet_experiment_url(
            comet.workspace, comet.project, status.experimentKey)


def adopt_attempt(plan: Plan, run: Run, job: JobSummary) -> None:
    """A run's first lone Job is created before its status is written (reconciler.execute),
    which then follows with the Job's own event, as a crash in between leaves it: the start
    is recorded now, at the Job's creation; what follows is decided from the Job and its pods
    as for any attempt. Its start was announced with the Job (the AttemptCreated event)."""
    plan.status.outputUri, plan.status.checkpointUri = run_paths(run)
    plan.status.startTime = plan.status.startTime or job.created
    record_start(plan, run)
    plan.was = plan.was or "Pending"


def start_attempt(plan: Plan, run: Run, queue: str | None) -> None:
    """The current attempt has no Job yet: create it (suspended when spec.suspend; with a
    queue, created suspended for Kueue to admit, and not at all while spec.suspend)."""
    status, suspend, attempt = plan.status, run.spec.suspend, plan.status.attempt
    if queue and suspend:  # Kueue would admit a Job it sees: create none until resumed
        plan.transition("Suspended", "Suspended", "the run is suspended")
        suspended_condition(plan, True)
        return
    plan.create_attempt = attempt
    record_start(plan, run)
    if suspend:
        plan.transition("Suspended", "Suspended", "the run is suspended")
    elif queue:
        status.queue = QueueStatus(name=queue)
        plan.transition("Queued", "Queued", f"attempt {attempt}: queued in {queue}")
    else:
        plan.transition("Pending", "AttemptCreated", f"attempt {attempt}: creating the Job")
    suspended_condition(plan, suspend)
    if not (suspend or queue):
        # Already what follow_pods says of the new Job's pods, so the Job's arrival writes
        # no status of its own (the event says what happened).
        status.message = pods_pending(attempt, 0, run.spec.resources.nodes)
        plan.condition("Running", False, "PodsPending", status.message)


def fail_attempt(plan: Plan, run: Run, job: JobSummary, pods: list[PodSummary],
                 config: OperatorConfig, failure: Failure) -> None:
    """The attempt failed (failures.classify says how): start the next one, resuming from the
    checkpoint, while its budget lasts (disruptions: maxDisruptions, other failures:
    maxRestarts); fail the run at once on a data or start-up error, or when the budget is
    spent."""
    status, spec, attempt = plan.status, run.spec, plan.status.attempt or 1
    why = f"{failure.reason}: {failure.message}"
    record_attempt(status, attempt, job, pods, "Failed", failure.reason, failure.message, spec,
                   plan.now, config)
    plan.delete_attempts.append(attempt)
    plan.condition("Running", False, failure.reason, failure.message)
    if failure.reason == "Stalled":
        plan.events.append(("Warning", "Stalled", f"attempt {attempt}: {failure.message}"))
    # Kueue's preemptions (phase Preempted) spend neither budget; disruptions spend their own.
    preempted = sum(a.phase == "Preempted" for a in status.attempts)
    disrupted = sum(a.phase != "Preempted" and a.reason in failures.DISRUPTED
                    for a in status.attempts)
    failed = attempt - disrupted - preempted  # every other attempt so far failed
    budget, used, name = ((spec.maxDisruptions, disrupted, "disruption")
                          if failure.kind == DISRUPTION else (spec.maxRestarts, failed, "restart"))
    if failure.kind != FATAL and used <= budget:
        status.attempt = plan.create_attempt = attempt + 1
        plan.events.append(("Warning", "AttemptDisrupted" if failure.kind == DISRUPTION
                            else "AttemptFailed",
                            f"attempt {attempt} failed ({why}); starting attempt {attempt + 1} "
                            f"({name} {used} of {budget}), resuming from the last complete "
                            "checkpoint"))
        status.phase = "Pending"
        status.message = f"attempt {attempt} failed: {why}"[:1024]
        return
    if failure.kind == FATAL:
        reason, message = failure.reason, f"attempt {attempt} failed, not retried: {why}"
    else:
        reason = "DisruptionBudgetExhausted" if failure.kind == DISRUPTION else (
            "RestartBudgetExhausted")
        message = f"attempt {attempt} failed and the {name} budget ({budget}) is spent: {why}"
    plan.fail(reason, message[:1024])


def apply_queue(plan: Plan, state: queueing.QueueState) -> bool:
    """Write a Kueue run's queue state into its status; True when admitted (the lifecycle
    then follows its pods)."""
    plan.activate = state.activate
    plan.status.queue = state.queue
    for kind, value, reason, message in state.conditions:
        plan.condition(kind, value, reason, message)
    if state.phase:
        plan.transition(*state.phase)
    if state.event:
        plan.events.append(state.event)
    if not state.admitted:
        plan.status.gang = None  # suspended or requeued: admitted again, a new gang
    return state.admitted


def follow_attempt(plan: Plan, run: Run, job: JobSummary, pods: list[PodSummary],
                   config: OperatorConfig, polled: Polled | None = None) -> None:
    """The attempt is under way: suspend or resume its Job, then follow its pods."""
    suspend = run.spec.suspend
    if job.suspended != suspend:
        plan.suspend_job = (job.name, suspend)
    suspended_condition(plan, suspend)
    if suspend:
        plan.status.gang = None  # resumed, the Job makes new pods: a new gang
        plan.transition("Suspended", "Suspended", "the run is suspended; its pods are stopped")
        plan.condition("Running", False, "Suspended", "")
        return
    follow_pods(plan, run, job, pods, config, polled)


def follow_pods(plan: Plan, run: Run, job: JobSummary, pods: list[PodSummary],
                config: OperatorConfig, polled: Polled | None = None) -> None:
    """Report the attempt's scheduling and whether all of its pods run; while it trains, its
    progress and GPU-hours, or tear it down when it has stalled."""
    status, spec, attempt = plan.status, run.spec, plan.status.attempt
    nodes = spec.resources.nodes
    lost = failures.lost_member(pods, status.gang, attempt or 1)
    if lost:
        fail_attempt(plan, run, job, pods, config, lost)
        return
    unschedulable = [p for p in pods if p.unschedulable]
    if unschedulable:
        msg = f"{len(unschedulable)} pod(s) cannot be scheduled: {unschedulable[0].unschedulable}"
        plan.condition("Scheduled", False, "Unschedulable", msg)
        if not has_condition(run.status.conditions, "Scheduled", "False", "Unschedulable"):
            plan.events.append(("Warning", "Unschedulable", msg))
    elif len(pods) == nodes and all(p.node for p in pods):
        plan.condition("Scheduled", True, "Scheduled",
                       f"{nodes} pod(s) placed on {len({p.node for p in pods})} node(s)")

    # A pod that already exited 0 (a worker rank finishing first) still counts as up.
    running = [p for p in pods if p.phase in ("Running", "Succeeded")]
    if len(running) == nodes:
        since = max((p.started_at for p in running if p.started_at), default=None)
        stall = observe.stalled(polled, since, plan.now, observe.allowances(spec, config))
        if stall:
            plan.condition("Stalled", True, stall[0], stall[1][:1024])
            fail_attempt(plan, run, job, pods, config, Failure("Stalled", RETRY, stall[1]))
            return
        plan.transition("Running", "Running", f"attempt {attempt}: {nodes} node(s) training")
        status.gang = GangStatus(attempt=attempt or 1, pods=sorted(p.name for p in running))
        plan.condition("Running", True, "AllPodsRunning", status.message or "")
        if any(c.type == "Stalled" for c in status.conditions):
            plan.condition("Stalled", False, "Training", f"attempt {attempt} is running")
        if polled is not None and polled.doc is not None:  # rank 0 has answered (once)
            status.progress = observe.progress_status(polled, status.progress)
            checkpoint = observe.last_checkpoint(
                polled, status.checkpointUri or run_paths(run)[1])
            if checkpoint:
                status.lastCheckpoint = checkpoint
            add_gpu_hours(status, pods_gpu_hours(pods, spec.resources.gpusPerNode,
                                                 polled.polled_at), spec, config)
    else:
        message = pods_pending(attempt, len(running), nodes, bool(unschedulable))
        plan.transition("Pending", "Pending", message)
        plan.condition("Running", False, "PodsPending", message)


def pods_pending(attempt: int | None, running: int, nodes: int,
                 unschedulable: bool = False) -> str:
    return (f"attempt {attempt}: {running}/{nodes} pod(s) running"
            + ("; unschedulable" if unschedulable else ""))


def preempt(plan: Plan, run: Run, job: JobSummary, wl: WorkloadSummary,
            pods: list[PodSummary], config: OperatorConfig, queue: str) -> None:
    """Kueue evicted the attempt (preemption, waitForPodsReady timeout): close it as
    Preempted with the GPU-hours it held, without spending maxRestarts, and queue the next
    attempt, which resumes from the last complete checkpoint."""
    status, resources, attempt = plan.status, run.spec.resources, plan.status.attempt or 1
    evicted = wl.evicted
    assert evicted is not None  # queueing.preempted
    why = f"{evicted.reason}: {evicted.message}".rstrip(": ")
    end = evicted.at or plan.now
    admitted_at = status.queue and status.queue.admittedAt
    hours = queueing.held_gpu_hours(pods_gpu_hours(pods, resources.gpusPerNode, end),
                                    admitted_at, end, resources.nodes * resources.gpusPerNode)
    record_attempt(status, attempt, job, pods, "Preempted", evicted.reason, why, run.spec, end,
                   config, gpu_hours=hours, started=admitted_at)
    plan.delete_attempts.append(attempt)
    status.attempt = plan.create_attempt = attempt + 1
    status.queue = QueueStatus(name=queue)
    message = (f"attempt {attempt} preempted ({why}); attempt {attempt + 1} queued in {queue}, "
               "resuming from the last complete checkpoint")[:1024]
    for kind, value in (("Running", False), ("Admitted", False), ("Queued", True)):
        plan.condition(kind, value, "Preempted", why[:1024])
    plan.events.append(("Warning", "Preempted", message))
    status.phase, status.message = "Queued", message


#: Seconds before deciding again on a Job whose pods, as seen, are behind its verdict.
PODS_BEHIND_RECHECK_SECONDS = 5.0


def succeed(plan: Plan, run: Run, job: JobSummary, pods: list[PodSummary],
            config: OperatorConfig) -> None:
    """The attempt's Job completed. Rank 0's summary decides: a valid one marks the run
    Succeeded and asks for its model's registration (`plan.register`); a missing or malformed
    one fails the run (InvalidSummary) and registers nothing."""
    status, attempt = plan.status, plan.status.attempt or 1
    status.completionTime = plan.now
    record_attempt(status, attempt, job, pods, "Succeeded", "Completed", "", run.spec,
                   plan.now, config)
    plan.condition("Running", False, "Completed", "")
    rank0 = next((p for p in pods if p.index == 0), None)
    try:
        summary = parse_summary(rank0.message if rank0 else None)
    except SummaryError as err:
        status.phase, status.message = "Failed", str(err)
        plan.condition("Succeeded", False, "InvalidSummary", str(err))
        plan.condition("Failed", True, "InvalidSummary", str(err))
        plan.events = [("Warning", "InvalidSummary", str(err))]
        return
    plan.transition("Succeeded", "Succeeded", f"attempt {attempt} completed")
    plan.condition("Succeeded", True, "JobComplete",
                   f"all {run.spec.resources.nodes} node(s) of attempt {attempt} exited 0")
    done = {k: v for k, v in status_document(status.progress or Progress()).items()
            if k not in ("eta", "stage")}
    tokens_per_second = summary.throughput.tokensPerSecond
    status.progress = Progress(**{
        **done, "stage": "done", "step": summary.steps, "totalSteps": summary.steps,
        "percent": "100%", "tokens": summary.tokens,
        **({"tokensPerSecond": round(tokens_per_second, 1)} if tokens_per_second else {})})
    if summary.tracking.url:
        status.trackingUrl = summary.tracking.url
    if not status.modelVersion:
        plan.register = summary


def registered(plan: Plan, mv: dict) -> None:
    """Record the ModelVersion that `plan.register` produced (status and event)."""
    plan.status.modelVersion = mv["metadata"]["name"]
    plan.events.append(("Normal", "Registered", f"ModelVersion {mv['metadata']['name']} "
                        f"(digest {mv['spec']['artifact']['digest'][:19]}...)"))
