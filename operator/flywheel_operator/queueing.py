"""Kueue, as the lifecycle sees it: a Workload's slim summary and what it means for a run.

Kueue (https://kueue.sigs.k8s.io) makes a Workload for each queued Job and admits it whole
or not at all: it unsuspends the Job with the flavor's nodeSelector and tolerations, and on
preemption (or a waitForPodsReady timeout) evicts it, suspending the Job again. The operator
only reads Workloads and sets `spec.active` (a run's `spec.suspend`); it never touches the
Job's `suspend`, `nodeSelector` or `tolerations`. Pure functions: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .api import FineTuneRunStatus, QueueStatus, Run, has_condition
from .objects import JobSummary, WorkloadSummary
from .vocab import parse_time

#: Evictions that are a suspension (ours, through spec.active), not a preemption.
DEACTIVATED = ("Deactivated", "InactiveWorkload")


class Visibility:
    """When to ask Kueue's visibility API for queue positions: always, except for a minute
    after the cluster said it does not serve it."""

    RETRY_SECONDS = 60.0

    def __init__(self) -> None:
        self.not_before = 0.0

    def due(self, now: float) -> bool:
        return now >= self.not_before

    def unavailable(self, now: float) -> None:
        self.not_before = now + self.RETRY_SECONDS


def position_to_ask(jobs: list[JobSummary], workloads: list[WorkloadSummary]
                    ) -> tuple[str, str] | None:
    """(LocalQueue, Workload) whose position is worth asking: the newest queued Job's
    Workload while it waits for admission; None otherwise."""
    job = max((j for j in jobs if j.queue), key=lambda j: j.attempt, default=None)
    wl = next((w for w in workloads if job and w.job == job.name), None)
    if job is None or job.queue is None or wl is None or wl.admitted:
        return None
    return job.queue, wl.name


def preempted(wl: WorkloadSummary | None) -> bool:
    """Kueue took the admission back (preemption, waitForPodsReady timeout, ...), not us."""
    return bool(wl and wl.evicted and wl.active and wl.evicted.reason not in DEACTIVATED)


def admission_message(wl: WorkloadSummary) -> str:
    flavors = ", ".join(wl.flavors) or "no flavor"
    return f"admitted by ClusterQueue {wl.cluster_queue} with flavor {flavors}"


def pending_message(queue: str, wl: WorkloadSummary | None, position: int | None
                    ) -> tuple[str, str]:
    """(reason, message) of a queued run: Kueue's own words, and the position if known."""
    if wl is None:
        return "WaitingForWorkload", f"queued in {queue}: waiting for Kueue to see the Job"
    # No QuotaReserved condition yet: Kueue has not tried to admit it.
    reason, why = ((wl.pending.reason, wl.pending.message) if wl.pending
                   else ("PendingEvaluation", ""))
    where = f"position {position} in {queue}" if position is not None else f"queued in {queue}"
    return reason, f"{where}: {why}" if why else where


def held_gpu_hours(pods_hours: float, admitted_at: str | None, evicted_at: str | None,
                   gpus: int) -> float:
    """GPU-hours a preempted attempt held: its pods' running time where they were seen,
    else admission to eviction (the GPUs were reserved for it all along)."""
    if pods_hours or not (admitted_at and evicted_at):
        return pods_hours
    seconds = (parse_time(evicted_at) - parse_time(admitted_at)).total_seconds()  # type: ignore
    return round(max(0.0, seconds) / 3600 * gpus, 6)


@dataclass
class QueueState:
    """What a Kueue run's attempt shows while it is queued, suspended or admitted; the
    lifecycle writes it into the run's status (`lifecycle.apply_queue`)."""

    admitted: bool                                   # True: follow the attempt's pods
    queue: QueueStatus                               # status.queue
    conditions: list[tuple[str, bool, str, str]] = field(default_factory=list)
    phase: tuple[str, str, str] | None = None        # (phase, reason, message) to show
    activate: tuple[str, bool] | None = None         # (Workload, spec.active) to write
    event: tuple[str, str, str] | None = None        # (type, reason, message)


def queue_state(run: Run, old: FineTuneRunStatus, attempt: int, wl: WorkloadSummary | None,
                queue: str, position: int | None) -> QueueState:
    """A Kueue run's attempt: suspend or resume it through its Workload's spec.active (never
    the Job), queued (Kueue's reason, the position) or admitted (the flavor). `old`: the
    status so far."""
    suspend = run.spec.suspend
    was_suspended = has_condition(run.status.conditions, "Suspended")
    activate = ((wl.name, not suspend)
                if wl and wl.active == suspend and (suspend or was_suspended) else None)
    suspended = ("Suspended", suspend, "Suspended" if suspend else "Active",
                 "spec.suspend is true" if suspend else "")
    base = QueueStatus(name=queue, workload=wl.name if wl else None)
    if suspend:
        return QueueState(False, base, [suspended, ("Running", False, "Suspended", "")],
                          ("Suspended", "Suspended", "the run is suspended; Kueue stopped its "
                           "pods and released its quota"), activate)
    if not (wl and wl.admitted):
        reason, message = pending_message(queue, wl, position)
        return QueueState(
            False, base.model_copy(update={"position": position}),
            [suspended, ("Queued", True, reason, message), ("Admitted", False, reason, message)],
            ("Queued", "Queued", f"attempt {attempt}: {message}"[:1024]), activate)
    message = admission_message(wl)
    newly = not has_condition(old.conditions, "Admitted")
    return QueueState(
        True, base.model_copy(update={
            "clusterQueue": wl.cluster_queue, "flavors": list(wl.flavors),
            "admittedAt": (old.queue and old.queue.admittedAt) or wl.admitted_at}),
        [suspended, ("Queued", False, "Admitted", message),
         ("Admitted", True, "Admitted", message)], None, activate,
        ("Normal", "Admitted", f"attempt {attempt}: {message}") if newly else None)
