"""What the operator keeps of the objects it watches: small typed summaries, pure.

The kopf indexes hold these instead of whole objects (a few hundred bytes per Job or Pod, so
thousands of runs fit in little memory), and every decision reads them by attribute:
`JobSummary` and `PodSummary` of a run's children, `WorkloadSummary` of Kueue's Workloads.
A run's children are its own by owner uid (`owned`), never by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from .vocab import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_ANNOTATION,
    COMPONENT_LABEL,
    PROGRESS_PORT_NAME,
    QUEUE_NAME_LABEL,
)

#: Pod phases after which a pod runs no more (not to be confused with a run's phases).
POD_DONE = ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class Why:
    """A condition's reason and message (and when it turned true)."""

    reason: str
    message: str = ""
    at: str | None = None


@dataclass(frozen=True, slots=True)
class JobSummary:
    name: str
    uid: str | None = None
    owner: str | None = None            # the FineTuneRun's uid in its ownerReferences
    component: str = "trainer"          # trainer or preflight
    attempt: int = 0
    suspended: bool = False
    queue: str | None = None            # Kueue LocalQueue label
    complete: bool = False
    failed: str | None = None           # the Failed condition's message, when failed
    failed_reason: str | None = None
    deleting: bool = False
    created: str | None = None          # metadata.creationTimestamp


@dataclass(frozen=True, slots=True)
class PodSummary:
    name: str
    job: str | None = None              # the owning Job's uid
    component: str = "trainer"
    attempt: int = 0
    index: int = 0                      # the Job's completion index (node rank)
    phase: str = "Pending"
    node: str | None = None
    unschedulable: str | None = None    # the scheduler's message
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None           # the terminated container's reason (OOMKilled, ...)
    message: str | None = None          # its termination message
    disruption: Why | None = None       # DisruptionTarget
    waiting: Why | None = None          # a waiting container (ImagePullBackOff, ...)
    scheduled_at: str | None = None
    ip: str | None = None
    progress_port: int | None = None
    deleting: bool = False              # deletionTimestamp set (deleted, evicted, drained)

    @property
    def done(self) -> bool:
        return self.phase in POD_DONE


@dataclass(frozen=True, slots=True)
class WorkloadSummary:
    name: str
    job: str | None = None              # the Job's name (ownerReferences)
    active: bool = True
    queue: str | None = None
    admitted: bool = False
    admitted_at: str | None = None
    cluster_queue: str | None = None
    flavors: tuple[str, ...] = ()
    pending: Why | None = None          # QuotaReserved false: Kueue's reason
    evicted: Why | None = None
    finished: bool = False


def _owner_uid(body: dict, kind: str) -> str | None:
    return next((r.get("uid") for r in body["metadata"].get("ownerReferences") or []
                 if r.get("kind") == kind), None)


def job_summary(body: dict) -> JobSummary:
    meta, status = body["metadata"], body.get("status") or {}
    labels = meta.get("labels") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c["status"] == "True"}
    failed = conditions.get("Failed")
    return JobSummary(
        name=meta["name"], uid=meta.get("uid"), owner=_owner_uid(body, "FineTuneRun"),
        component=labels.get(COMPONENT_LABEL, "trainer"),
        attempt=int(labels.get(ATTEMPT_LABEL, "0")),
        suspended=bool((body.get("spec") or {}).get("suspend")),
        queue=labels.get(QUEUE_NAME_LABEL), complete="Complete" in conditions,
        failed=failed.get("message") if failed else None,
        failed_reason=failed.get("reason") if failed else None,
        deleting=bool(meta.get("deletionTimestamp")), created=meta.get("creationTimestamp"))


def pod_summary(body: dict) -> PodSummary:
    meta, status = body["metadata"], body.get("status") or {}
    labels = meta.get("labels") or {}
    scheduled = next((c for c in status.get("conditions") or []
                      if c["type"] == "PodScheduled"), None)
    states = [cs.get("state") or {} for cs in status.get("containerStatuses") or []]
    terminated = next((s["terminated"] for s in states if s.get("terminated")), None)
    running = next((s["running"] for s in states if s.get("running")), None)
    waiting = next((s["waiting"] for s in states if s.get("waiting")), None)
    disrupted = next((c for c in status.get("conditions") or []
                      if c["type"] == "DisruptionTarget" and c["status"] == "True"), None)
    port = next((p["containerPort"] for c in (body.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or [] if p.get("name") == PROGRESS_PORT_NAME), None)
    return PodSummary(
        name=meta["name"], job=_owner_uid(body, "Job"),
        component=labels.get(COMPONENT_LABEL, "trainer"),
        attempt=int(labels.get(ATTEMPT_LABEL, "0")),
        index=int((meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0")),
        phase=status.get("phase", "Pending"), node=(body.get("spec") or {}).get("nodeName"),
        unschedulable=scheduled["message"] if scheduled and scheduled["status"] == "False"
        and scheduled.get("reason") == "Unschedulable" else None,
        started_at=(running or terminated or {}).get("startedAt"),
        finished_at=(terminated or {}).get("finishedAt"),
        exit_code=(terminated or {}).get("exitCode"),
        reason=(terminated or {}).get("reason"), message=(terminated or {}).get("message"),
        disruption=Why(disrupted.get("reason", ""), disrupted.get("message", ""))
        if disrupted else None,
        waiting=Why(waiting.get("reason", ""), waiting.get("message", "")) if waiting else None,
        scheduled_at=scheduled.get("lastTransitionTime")
        if scheduled and scheduled["status"] == "True" else None,
        ip=status.get("podIP"), progress_port=port,
        deleting=bool(meta.get("deletionTimestamp")))


def workload_summary(body: dict) -> WorkloadSummary:
    """What the operator keeps of a Kueue Workload (indexed by its Job's name)."""
    status, spec = body.get("status") or {}, body.get("spec") or {}
    conds = {c["type"]: c for c in status.get("conditions") or []}

    def true(kind: str) -> dict | None:
        return conds[kind] if conds.get(kind, {}).get("status") == "True" else None

    admission = status.get("admission") or {}
    reserved, admitted, evicted = true("QuotaReserved"), true("Admitted"), true("Evicted")
    pending = conds.get("QuotaReserved") if not reserved else None
    return WorkloadSummary(
        name=body["metadata"]["name"],
        job=next((o["name"] for o in body["metadata"].get("ownerReferences") or []
                  if o.get("kind") == "Job"), None),
        active=spec.get("active", True), queue=spec.get("queueName"),
        admitted=bool(admitted), admitted_at=(admitted or {}).get("lastTransitionTime"),
        cluster_queue=admission.get("clusterQueue"),
        flavors=tuple(sorted({f for ps in admission.get("podSetAssignments") or []
                              for f in (ps.get("flavors") or {}).values()})),
        pending=Why(pending.get("reason", "Pending"), pending.get("message", ""))
        if pending else None,
        evicted=Why(evicted.get("reason", "Evicted"), evicted.get("message", ""),
                    evicted.get("lastTransitionTime")) if evicted else None,
        finished=bool(true("Finished")))


def owned(run_uid: str, jobs: list[JobSummary], pods: list[PodSummary]
          ) -> tuple[list[JobSummary], list[PodSummary]]:
    """The run's own Jobs (ownerReferences name its uid) and those Jobs' Pods. Objects that
    only carry the run's name (a deleted namesake's, or anyone's) are never the run's."""
    mine = [j for j in jobs if j.owner == run_uid]
    uids = {j.uid for j in mine}
    return mine, [p for p in pods if p.job in uids]
