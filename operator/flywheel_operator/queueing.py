"""Kueue, as the lifecycle sees it: a Workload's slim summary and what it means for a run.

Kueue (https://kueue.sigs.k8s.io) makes a Workload for each queued Job and admits it whole
or not at all: it unsuspends the Job with the flavor's nodeSelector and tolerations, and on
preemption (or a waitForPodsReady timeout) evicts it, suspending the Job again. The operator
only reads Workloads and sets `spec.active` (a run's `spec.suspend`); it never touches the
Job's `suspend`, `nodeSelector` or `tolerations`. Pure functions: no I/O here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .vocab import parse_time, set_condition

if TYPE_CHECKING:
    from .lifecycle import Plan

#: Evictions that are a suspension (ours, through spec.active), not a preemption.
DEACTIVATED = ("Deactivated", "InactiveWorkload")


def workload_summary(body: dict) -> dict:
    """What the operator keeps of a Workload (indexed by its Job's name)."""
    status, spec = body.get("status") or {}, body.get("spec") or {}
    conds = {c["type"]: c for c in status.get("conditions") or []}

    def true(kind: str) -> dict | None:
        return conds[kind] if conds.get(kind, {}).get("status") == "True" else None

    admission = status.get("admission") or {}
    reserved, admitted, evicted = true("QuotaReserved"), true("Admitted"), true("Evicted")
    pending = conds.get("QuotaReserved") if not reserved else None
    return {
        "name": body["metadata"]["name"],
        "job": next((o["name"] for o in body["metadata"].get("ownerReferences") or []
                     if o.get("kind") == "Job"), None),
        "active": spec.get("active", True),
        "queue": spec.get("queueName"),
        "admitted": bool(admitted),
        "admittedAt": (admitted or {}).get("lastTransitionTime"),
        "clusterQueue": admission.get("clusterQueue"),
        "flavors": sorted({f for ps in admission.get("podSetAssignments") or []
                           for f in (ps.get("flavors") or {}).values()}),
        "pending": {"reason": pending.get("reason", "Pending"),
                    "message": pending.get("message", "")} if pending else None,
        "evicted": {"reason": evicted.get("reason", "Evicted"),
                    "message": evicted.get("message", ""),
                    "at": evicted.get("lastTransitionTime")} if evicted else None,
        "finished": bool(true("Finished"))}


def preempted(wl: dict | None) -> bool:
    """Kueue took the admission back (preemption, waitForPodsReady timeout, ...), not us."""
    return bool(wl and wl["evicted"] and wl["active"]
                and wl["evicted"]["reason"] not in DEACTIVATED)


def admission_message(wl: dict) -> str:
    flavors = ", ".join(wl["flavors"]) or "no flavor"
    return f"admitted by ClusterQueue {wl['clusterQueue']} with flavor {flavors}"


def pending_message(queue: str, wl: dict | None, position: int | None) -> tuple[str, str]:
    """(reason, message) of a queued run: Kueue's own words, and the position if known."""
    if wl is None:
        return "WaitingForWorkload", f"queued in {queue}: waiting for Kueue to see the Job"
    # No QuotaReserved condition yet: Kueue has not tried to admit it.
    reason, why = (wl["pending"] or {}).get("reason", "PendingEvaluation"), (
        wl["pending"] or {}).get("message", "")
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


def follow_queued(plan: Plan, run: dict, wl: dict | None, ts: str, queue: str,
                  position: int | None) -> bool:
    """A Kueue run's attempt: suspend or resume it through its Workload's spec.active (never
    the Job), report it queued (Kueue's reason, the position) or admitted (the flavor).
    True when admitted: the lifecycle then follows its pods."""
    status, spec, attempt = plan.status, run["spec"], plan.status["attempt"]
    generation, suspend = run["metadata"].get("generation", 1), bool(spec.get("suspend"))
    was_suspended = any(c["type"] == "Suspended" and c["status"] == "True"
                        for c in (run.get("status") or {}).get("conditions", []))
    if wl and wl["active"] == suspend and (suspend or was_suspended):
        plan.activate = (wl["name"], not suspend)
    set_condition(status, "Suspended", suspend, "Suspended" if suspend else "Active",
                  "spec.suspend is true" if suspend else "", ts, generation)
    queue_status = {"name": queue, **({"workload": wl["name"]} if wl else {})}
    if suspend:
        status["queue"] = queue_status
        plan.transition("Suspended", "Suspended",
                        "the run is suspended; Kueue stopped its pods and released its quota")
        set_condition(status, "Running", False, "Suspended", "", ts, generation)
        return False
    if not (wl and wl["admitted"]):
        reason, message = pending_message(queue, wl, position)
        status["queue"] = {**queue_status, **({"position": position} if position is not None
                                              else {})}
        set_condition(status, "Queued", True, reason, message, ts, generation)
        set_condition(status, "Admitted", False, reason, message, ts, generation)
        plan.transition("Queued", "Queued", f"attempt {attempt}: {message}"[:1024])
        return False
    message = admission_message(wl)
    old = status.get("queue") or {}
    status["queue"] = {**queue_status, "clusterQueue": wl["clusterQueue"],
                       "flavors": wl["flavors"],
                       "admittedAt": old.get("admittedAt") or wl["admittedAt"] or ts}
    if not any(c["type"] == "Admitted" and c["status"] == "True"
               for c in status.get("conditions", [])):
        plan.events.append(("Normal", "Admitted", f"attempt {attempt}: {message}"))
    set_condition(status, "Queued", False, "Admitted", message, ts, generation)
    set_condition(status, "Admitted", True, "Admitted", message, ts, generation)
    return True
