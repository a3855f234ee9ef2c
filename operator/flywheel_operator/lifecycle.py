"""The FineTuneRun lifecycle as a pure function: observed state in, a plan out.

`decide(run, jobs, pods, now)` looks at the run and the slim summaries of its Jobs and Pods
(kept in kopf indexes, see handlers.py) and returns a `Plan`: the status the run should have
and the few actions that get it there. No I/O happens here, so every transition is
unit-tested without a cluster, and re-running `decide` on the same inputs is a no-op plan.

Attempts: the attempt number is the larger of `status.attempt` and the newest attempt label
among the run's Jobs. The operator records attempt n+1 in status *before* it tears down
attempt n and creates n+1, so a crash at any point resumes at the right attempt and the
deterministic child names make every create idempotent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .render import comet_experiment_url, experiment_key

RUN_LABEL = "flywheel.dev/run"
ATTEMPT_LABEL = "flywheel.dev/attempt"
TERMINAL = ("Succeeded", "Failed")


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- slim summaries (what the indexes keep per child) -----------------------------------


def job_summary(body: dict) -> dict:
    status = body.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c["status"] == "True"}
    return {
        "name": body["metadata"]["name"],
        "attempt": int(body["metadata"]["labels"].get(ATTEMPT_LABEL, "0")),
        "suspended": bool((body.get("spec") or {}).get("suspend")),
        "complete": "Complete" in conditions,
        "failed": conditions.get("Failed", {}).get("message") if "Failed" in conditions else None,
        "deleting": bool(body["metadata"].get("deletionTimestamp")),
    }


def pod_summary(body: dict) -> dict:
    status = body.get("status") or {}
    scheduled = next((c for c in status.get("conditions") or []
                      if c["type"] == "PodScheduled"), None)
    terminated = next((cs["state"]["terminated"] for cs in status.get("containerStatuses") or []
                       if (cs.get("state") or {}).get("terminated")), None)
    running = next((cs["state"]["running"] for cs in status.get("containerStatuses") or []
                    if (cs.get("state") or {}).get("running")), None)
    return {
        "name": body["metadata"]["name"],
        "attempt": int(body["metadata"]["labels"].get(ATTEMPT_LABEL, "0")),
        "index": int((body["metadata"].get("annotations") or {}).get(
            "batch.kubernetes.io/job-completion-index", "0")),
        "phase": status.get("phase", "Pending"),
        "node": (body.get("spec") or {}).get("nodeName"),
        "unschedulable": scheduled["message"] if scheduled and scheduled["status"] == "False"
        and scheduled.get("reason") == "Unschedulable" else None,
        "startedAt": (running or terminated or {}).get("startedAt"),
        "finishedAt": (terminated or {}).get("finishedAt"),
        "exitCode": (terminated or {}).get("exitCode"),
        "reason": (terminated or {}).get("reason"),
        "message": (terminated or {}).get("message"),
    }


# --- the plan -----------------------------------------------------------------------------


@dataclass
class Plan:
    status: dict
    create_attempt: int | None = None          # render and create this attempt's children
    delete_attempts: list[int] = field(default_factory=list)
    suspend_job: tuple[str, bool] | None = None  # (job name, suspend)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, msg)
    succeeded_pods: list[dict] = field(default_factory=list)


def set_condition(status: dict, type_: str, value: bool, reason: str, message: str,
                  now: str, generation: int) -> None:
    """Upsert a standard condition; lastTransitionTime moves only when the value does."""
    conditions = status.setdefault("conditions", [])
    new = {"type": type_, "status": "True" if value else "False", "reason": reason,
           "message": message, "observedGeneration": generation}
    for i, old in enumerate(conditions):
        if old["type"] == type_:
            same = old.get("status") == new["status"]
            new["lastTransitionTime"] = old.get("lastTransitionTime", now) if same else now
            conditions[i] = new
            return
    new["lastTransitionTime"] = now
    conditions.append(new)


def describe_failure(pods: list[dict], job: dict | None) -> str:
    """The failing pod's own words: its termination message, or exit code and reason."""
    failed = [p for p in pods if p["phase"] == "Failed"]
    if failed:
        pod = failed[0]
        detail = (pod["message"] or "").strip() or pod["reason"] or "Error"
        return f"pod {pod['name']} exited with code {pod['exitCode']}: {detail}"[:1024]
    return (job or {}).get("failed") or "the attempt's Job failed"


def decide(run: dict, jobs: list[dict], pods: list[dict], now: datetime | None = None) -> Plan:
    spec = run["spec"]
    generation = run["metadata"].get("generation", 1)
    old = run.get("status") or {}
    status = copy.deepcopy(old)
    plan = Plan(status=status)
    ts = now_iso(now)
    phase = old.get("phase")

    def transition(new_phase: str, reason: str, message: str, event_type: str = "Normal"):
        if new_phase != phase:
            plan.events.append((event_type, reason, message))
        status["phase"] = new_phase
        status["message"] = message

    status["observedGeneration"] = generation
    attempt = max([old.get("attempt") or 0] + [j["attempt"] for j in jobs]) or 1
    status["attempt"] = attempt
    plan.delete_attempts = sorted({j["attempt"] for j in jobs if j["attempt"] < attempt})

    if phase in TERMINAL:
        return plan

    job = next((j for j in jobs if j["attempt"] == attempt), None)
    current = [p for p in pods if p["attempt"] == attempt]
    nodes = spec["resources"]["nodes"]
    suspend = bool(spec.get("suspend"))
    max_restarts = spec.get("maxRestarts", 3)

    if job is None:
        plan.create_attempt = attempt
        status.setdefault("startTime", ts)
        comet = (spec.get("tracking") or {}).get("comet")
        status.setdefault("experimentKey", experiment_key(run["metadata"]["uid"]))
        if comet:
            status.setdefault("trackingUrl", comet_experiment_url(
                comet["workspace"], comet["project"], status["experimentKey"]))
        if suspend:
            transition("Suspended", "Suspended", "the run is suspended")
        else:
            transition("Pending", "AttemptCreated", f"attempt {attempt}: creating the Job")
        set_condition(status, "Suspended", suspend, "Suspended" if suspend else "Active",
                      "spec.suspend is true" if suspend else "", ts, generation)
        return plan

    failed_pod = any(p["phase"] == "Failed" for p in current)
    if job["complete"] and not failed_pod:
        status["completionTime"] = ts
        transition("Succeeded", "Succeeded", f"attempt {attempt} completed")
        set_condition(status, "Running", False, "Completed", "", ts, generation)
        set_condition(status, "Succeeded", True, "JobComplete",
                      f"all {nodes} node(s) of attempt {attempt} exited 0", ts, generation)
        plan.succeeded_pods = current
        return plan

    if job["failed"] is not None or failed_pod:
        why = describe_failure(current, job)
        if attempt <= max_restarts:
            status["attempt"] = attempt + 1
            plan.delete_attempts.append(attempt)
            plan.create_attempt = attempt + 1
            plan.events.append(("Warning", "AttemptFailed",
                                f"attempt {attempt} failed ({why}); starting attempt "
                                f"{attempt + 1} of {max_restarts + 1}, resuming from the last "
                                "complete checkpoint"))
            status["phase"] = "Pending"
            status["message"] = f"attempt {attempt} failed: {why}"
            set_condition(status, "Running", False, "AttemptFailed", why, ts, generation)
            return plan
        plan.delete_attempts.append(attempt)
        status["completionTime"] = ts
        transition("Failed", "RestartBudgetExhausted",
                   f"attempt {attempt} failed and the restart budget ({max_restarts}) is "
                   f"spent: {why}", "Warning")
        set_condition(status, "Running", False, "AttemptFailed", why, ts, generation)
        set_condition(status, "Failed", True, "RestartBudgetExhausted", status["message"], ts,
                      generation)
        return plan

    if job["suspended"] != suspend:
        plan.suspend_job = (job["name"], suspend)
    set_condition(status, "Suspended", suspend, "Suspended" if suspend else "Active",
                  "spec.suspend is true" if suspend else "", ts, generation)
    if suspend:
        transition("Suspended", "Suspended", "the run is suspended; its pods are stopped")
        set_condition(status, "Running", False, "Suspended", "", ts, generation)
        return plan

    unschedulable = [p for p in current if p["unschedulable"]]
    if unschedulable:
        why = unschedulable[0]["unschedulable"]
        msg = f"{len(unschedulable)} pod(s) cannot be scheduled: {why}"
        set_condition(status, "Scheduled", False, "Unschedulable", msg, ts, generation)
        if not any(c.get("reason") == "Unschedulable" and c["status"] == "False"
                   for c in old.get("conditions", []) if c["type"] == "Scheduled"):
            plan.events.append(("Warning", "Unschedulable", msg))
    elif len(current) == nodes and all(p["node"] for p in current):
        set_condition(status, "Scheduled", True, "Scheduled",
                      f"{nodes} pod(s) placed on {len({p['node'] for p in current})} node(s)",
                      ts, generation)

    # A pod that already exited 0 (a worker rank finishing first) still counts as up.
    running = [p for p in current if p["phase"] in ("Running", "Succeeded")]
    if len(running) == nodes:
        transition("Running", "Running", f"attempt {attempt}: {nodes} node(s) training")
        set_condition(status, "Running", True, "AllPodsRunning", status["message"], ts,
                      generation)
    else:
        message = (f"attempt {attempt}: {len(running)}/{nodes} pod(s) running"
                   + ("; unschedulable" if unschedulable else ""))
        transition("Pending", "Pending", message)
        set_condition(status, "Running", False, "PodsPending", message, ts, generation)
    return plan
