"""Watching a run while it trains, as pure functions: rank 0's progress into status, hang
detection, and what ended an attempt.

The progress poller (poller.py) fetches rank 0's `/progress` document; `lifecycle.decide`
calls these with what it fetched and the pods' slim summaries. Nothing here does I/O.

Failure reasons (status.attempts[].reason, Events, the Failed condition) and what follows:

- `NodeLost`, `Evicted`, `Preempted`: the pod's DisruptionTarget condition (or the Job's
  podFailurePolicy rule for it). A new attempt that spends `spec.maxDisruptions`, not
  `maxRestarts`.
- `DataError`: exit code 2, the trainer's contract for a data or config error. The same input
  fails again: the run fails at once, in the trainer's words.
- `ImagePullBackOff`, `ErrImagePull`, `InvalidImageName`, `CreateContainerConfigError`,
  `CreateContainerError`: a container waiting so for longer than `startFailureGraceSeconds`.
  The run fails at once, in the kubelet's words.
- `OOMKilled` (the container's terminated reason); `CUDAOutOfMemory`, `CommunicationError`
  (NCCL, gloo, c10d), `CUDAError` (CUDA errors, Xid, ECC) from the termination message (the
  trainer's summary, or the log tail); `Stalled` (no heartbeat or no step advance for
  `stallTimeoutSeconds`); `AttemptFailed` (anything else): a new attempt, resuming from the
  last complete checkpoint, that spends `spec.maxRestarts`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta

from flywheel_trainer.contract import EXIT_DATA_ERROR, TRAINING

from .vocab import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_ANNOTATION,
    COMPONENT_LABEL,
    PROGRESS_PORT_NAME,
    QUEUE_NAME_LABEL,
    format_time,
    parse_time,
)

# --- slim summaries: what the indexes keep of a run's Jobs and Pods ---------------------


def _owner_uid(body: dict, kind: str) -> str | None:
    return next((r.get("uid") for r in body["metadata"].get("ownerReferences") or []
                 if r.get("kind") == kind), None)


def owned(run_uid: str, jobs: list[dict], pods: list[dict]) -> tuple[list[dict], list[dict]]:
    """The run's own Jobs (ownerReferences name its uid) and those Jobs' Pods. Objects that
    only carry the run's name (a deleted namesake's, or anyone's) are never the run's."""
    mine = [j for j in jobs if j.get("owner") == run_uid]
    uids = {j["uid"] for j in mine}
    return mine, [p for p in pods if p.get("job") in uids]


def job_summary(body: dict) -> dict:
    status = body.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c["status"] == "True"}
    return {
        "name": body["metadata"]["name"],
        "uid": body["metadata"].get("uid"),
        "owner": _owner_uid(body, "FineTuneRun"),
        "component": body["metadata"]["labels"].get(COMPONENT_LABEL, "trainer"),
        "attempt": int(body["metadata"]["labels"].get(ATTEMPT_LABEL, "0")),
        "suspended": bool((body.get("spec") or {}).get("suspend")),
        "queue": body["metadata"]["labels"].get(QUEUE_NAME_LABEL),
        "complete": "Complete" in conditions,
        "failed": conditions.get("Failed", {}).get("message") if "Failed" in conditions else None,
        "failedReason": conditions.get("Failed", {}).get("reason"),
        "deleting": bool(body["metadata"].get("deletionTimestamp"))}


def pod_summary(body: dict) -> dict:
    status = body.get("status") or {}
    scheduled = next((c for c in status.get("conditions") or []
                      if c["type"] == "PodScheduled"), None)
    terminated = next((cs["state"]["terminated"] for cs in status.get("containerStatuses") or []
                       if (cs.get("state") or {}).get("terminated")), None)
    running = next((cs["state"]["running"] for cs in status.get("containerStatuses") or []
                    if (cs.get("state") or {}).get("running")), None)
    waiting = next((cs["state"]["waiting"] for cs in status.get("containerStatuses") or []
                    if (cs.get("state") or {}).get("waiting")), None)
    disrupted = next((c for c in status.get("conditions") or []
                      if c["type"] == "DisruptionTarget" and c["status"] == "True"), None)
    port = next((p["containerPort"] for c in (body.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or [] if p.get("name") == PROGRESS_PORT_NAME), None)
    return {
        "name": body["metadata"]["name"],
        "job": _owner_uid(body, "Job"),
        "component": body["metadata"]["labels"].get(COMPONENT_LABEL, "trainer"),
        "attempt": int(body["metadata"]["labels"].get(ATTEMPT_LABEL, "0")),
        "index": int((body["metadata"].get("annotations") or {}).get(
            COMPLETION_INDEX_ANNOTATION, "0")),
        "phase": status.get("phase", "Pending"),
        "node": (body.get("spec") or {}).get("nodeName"),
        "unschedulable": scheduled["message"] if scheduled and scheduled["status"] == "False"
        and scheduled.get("reason") == "Unschedulable" else None,
        "startedAt": (running or terminated or {}).get("startedAt"),
        "finishedAt": (terminated or {}).get("finishedAt"),
        "exitCode": (terminated or {}).get("exitCode"),
        "reason": (terminated or {}).get("reason"),
        "message": (terminated or {}).get("message"),
        # what observe.py reads: disruption, stuck containers, rank 0's progress endpoint
        "disruption": (disrupted.get("reason"), disrupted.get("message", ""))
        if disrupted else None,
        "waiting": (waiting.get("reason"), waiting.get("message", "")) if waiting else None,
        "scheduledAt": scheduled.get("lastTransitionTime")
        if scheduled and scheduled["status"] == "True" else None,
        "ip": status.get("podIP"), "progressPort": port}



# --- failures, progress, stalls ---------------------------------------------------------

RETRY, DISRUPTION, FATAL = "retry", "disruption", "fatal"

#: DisruptionTarget reasons (Kubernetes) -> our attempt reason.
DISRUPTIONS = {"PreemptionByScheduler": "Preempted", "PreemptionByKubeScheduler": "Preempted",
               "DeletionByTaintManager": "NodeLost", "DeletionByPodGC": "NodeLost",
               "EvictionByEvictionAPI": "Evicted", "TerminationByKubelet": "Evicted"}
DISRUPTED = frozenset(DISRUPTIONS.values())  # attempt reasons that spend maxDisruptions
#: Container waiting reasons that do not fix themselves: fail after a short grace period.
START_FAILURES = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                  "CreateContainerConfigError", "CreateContainerError")
#: Termination message patterns, checked in order.
PATTERNS = [
    ("CUDAOutOfMemory", re.compile(r"CUDA out of memory|OutOfMemoryError", re.I)),
    ("CommunicationError", re.compile(
        r"NCCL|DistBackendError|DistNetworkError|ProcessGroup\w*|gloo|c10d|"
        r"Connection (reset|refused|closed) by peer|collective operation timeout|watchdog", re.I)),
    ("CUDAError", re.compile(r"CUDA error|cudaError|\bXid\b|uncorrectable ECC|"
                             r"illegal memory access|device-side assert", re.I)),
]


@dataclass(frozen=True)
class Failure:
    reason: str   # CamelCase, as in the table above
    kind: str     # RETRY, DISRUPTION or FATAL
    message: str  # the words of whoever saw it (kubelet, trainer, controller)


def _words(message: str | None) -> str:
    """A termination message's words: the trainer summary's `error`, else the text."""
    text = (message or "").strip()
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and doc.get("error"):
            return str(doc["error"])
    except ValueError:
        pass
    return text


def classify(pods: list[dict], job: dict | None) -> Failure:
    """Why a failed attempt failed, from its pods' slim summaries and its Job's."""
    for pod in pods:
        if pod.get("disruption"):
            reason, message = pod["disruption"]
            return Failure(DISRUPTIONS.get(reason, "Evicted"), DISRUPTION,
                           f"pod {pod['name']} on node {pod.get('node')}: {reason}: {message}")
    if job and job.get("failedReason") == "PodFailurePolicy" and "DisruptionTarget" in (
            job.get("failed") or ""):
        return Failure("NodeLost", DISRUPTION, job["failed"])
    failed = [p for p in pods if p["phase"] == "Failed"]
    for pod in failed:
        if pod.get("exitCode") == EXIT_DATA_ERROR:
            return Failure("DataError", FATAL, f"pod {pod['name']}: {_words(pod['message'])}"
                           [:1024])
    for pod in failed:
        if pod.get("reason") == "OOMKilled":
            return Failure("OOMKilled", RETRY, f"pod {pod['name']} on node {pod.get('node')} "
                           "ran out of memory (OOMKilled, exit code "
                           f"{pod.get('exitCode')})")
    for reason, pattern in PATTERNS:
        for pod in failed:
            words = _words(pod["message"])
            if pattern.search(words):
                return Failure(reason, RETRY, f"pod {pod['name']}: {words}"[:1024])
    if job and job.get("failedReason") == "PodFailurePolicy" and "exit code 2" in (
            job.get("failed") or ""):
        return Failure("DataError", FATAL, job["failed"])
    if failed:
        pod = failed[0]
        detail = _words(pod["message"]) or pod.get("reason") or "Error"
        return Failure("AttemptFailed", RETRY,
                       f"pod {pod['name']} exited with code {pod.get('exitCode')}: {detail}"
                       [:1024])
    return Failure("AttemptFailed", RETRY, (job or {}).get("failed") or "the attempt's Job failed")


def start_failure(pods: list[dict], now: str, grace_seconds: float
                  ) -> tuple[Failure | None, float | None]:
    """A container stuck in ImagePullBackOff & co. for longer than the grace period; else
    None and, while one is stuck within its grace, the seconds until it is up."""
    t = parse_time(now)
    left = None
    for pod in pods:
        waiting = pod.get("waiting")
        if not waiting or waiting[0] not in START_FAILURES:
            continue
        since = parse_time(pod.get("scheduledAt"))
        remaining = 0.0 if since is None else grace_seconds - (t - since).total_seconds()
        if remaining <= 0:
            reason, message = waiting
            return Failure(reason, FATAL, f"pod {pod['name']}: {reason}: {message}"[:1024]), None
        left = remaining if left is None else min(left, remaining)
    return None, left


# --- progress ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Polled:
    """What the poller knows about one attempt's rank 0."""

    attempt: int
    doc: dict | None        # the last /progress document fetched, or None
    fetched_at: str | None  # when it was fetched (operator clock)
    polled_at: str          # when the poller last tried (success or not)
    error: str | None = None  # the last try's error
    first_polled_at: str | None = None  # when this operator first tried this attempt


def progress_status(polled: Polled, old: dict | None) -> dict:
    """status.progress from rank 0's document (the last known values when a poll failed)."""
    doc = polled.doc
    if not doc:
        return old or {}
    step, total = doc.get("step"), doc.get("totalSteps")
    eta = None
    if doc.get("etaSeconds") is not None and polled.fetched_at:
        eta = format_time(parse_time(polled.fetched_at) + timedelta(seconds=doc["etaSeconds"]))
    out = {"stage": doc.get("stage"), "step": step, "totalSteps": total,
           "percent": f"{int(100 * step / total)}%" if step is not None and total else None,
           "epoch": doc.get("epoch"),
           "loss": _round(doc.get("loss"), 4),
           "tokensPerSecond": _round(doc.get("tokensPerSecond"), 1),
           "mfu": _round(doc.get("mfu"), 4),
           "eta": eta, "heartbeatTime": doc.get("heartbeatTime")}
    return {k: v for k, v in out.items() if v is not None}


def last_checkpoint(polled: Polled, spec: dict) -> dict | None:
    """status.lastCheckpoint: the newest complete checkpoint rank 0 reported."""
    ckpt = (polled.doc or {}).get("lastCheckpoint")
    if not ckpt or ckpt.get("step") is None:
        return None
    # where the trainer keeps them (TrainerConfig.checkpoint_uri)
    root = (spec.get("checkpoint") or {}).get("uri") or (
        spec["output"]["uri"].rstrip("/") + "/checkpoints")
    return {"step": ckpt["step"], "time": ckpt.get("time"),
            "uri": f"{root.rstrip('/')}/step-{ckpt['step']}"}


def _round(value, digits: int):
    return None if value is None else round(float(value), digits)


def _age(now: str, then: str | None) -> float | None:
    if not then:
        return None
    return (parse_time(now) - parse_time(then)).total_seconds()


@dataclass(frozen=True)
class Allowances:
    """Seconds without a sign of life or progress before an attempt counts as stalled."""

    stall: float       # training: heartbeat and step advance
    loading: float     # starting, loading-model, tokenizing (and before the first answer)
    evaluation: float  # evaluating, exporting


def allowances(spec: dict, config) -> Allowances:
    """spec.stallTimeoutSeconds (else the operator config's) for training; the config's own
    allowances for loading and evaluation, never below the stall timeout."""
    stall = spec.get("stallTimeoutSeconds") or config.stallTimeoutSeconds
    return Allowances(stall=stall, loading=max(stall, config.loadingTimeoutSeconds),
                      evaluation=max(stall, config.evaluationTimeoutSeconds))


STAGE_ALLOWANCE = {"starting": "loading", "loading-model": "loading", "tokenizing": "loading",
                   "training": "stall", "evaluating": "evaluation", "exporting": "evaluation"}


def _ts(value: str | None) -> float | None:
    t = parse_time(value)
    return None if t is None else t.timestamp()


def ranks_heard(doc: dict, t_doc: float, limit: int = 8) -> str:
    """`rank 1 step 5 (312s ago, in <frame>), rank 0 step 5 (2s ago, in <frame>)`: the
    stalest first."""
    heard = []
    for r in doc.get("ranks") or []:
        hb = _ts(r.get("heartbeatTime"))
        heard.append((float("inf") if hb is None else t_doc - hb, r))
    heard.sort(key=lambda x: -x[0])
    parts = [f"rank {r['rank']} never heard" if age == float("inf")
             else f"rank {r['rank']} step {r.get('step')} ({int(age)}s ago"
             + (f", in {r['where'][:120]})" if r.get("where") else ")")
             for age, r in heard[:limit]]
    more = len(heard) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def stalled(polled: Polled | None, running_since: str | None, now: str,
            allow: Allowances) -> tuple[str, str] | None:
    """(reason, message) when the running attempt shows no life (NoHeartbeat) or no progress
    (NoProgress) for longer than allowed; None while it is fine. Ages inside rank 0's document
    are measured on the trainer's clock, plus the time since the operator last heard it."""
    t_now = _ts(now)
    if polled is None:  # not tried yet (e.g. the operator just started): no judgement
        return None
    if polled.doc is None:
        started = max(_ts(running_since) or 0.0, _ts(polled.first_polled_at) or 0.0)
        if started and t_now - started > allow.loading:
            return ("NoHeartbeat", f"no progress from rank 0 in {int(t_now - started)}s since "
                    f"its pods started: {polled.error or 'no answer'}")
        return None
    doc = polled.doc
    silent = t_now - _ts(polled.fetched_at)
    t_doc = _ts(doc.get("heartbeatTime")) or _ts(polled.fetched_at)
    stage = doc.get("stage")
    where = f"stage {stage}, step {doc.get('step')}/{doc.get('totalSteps')}"
    ranks = ranks_heard(doc, t_doc)
    if silent > allow.stall:
        return ("NoHeartbeat", f"rank 0 has not answered for {int(silent)}s ({where}; "
                f"{polled.error or 'no answer'}); ranks last heard: {ranks}")
    started = _ts(doc.get("startTime")) or t_doc
    for r in doc.get("ranks") or []:
        hb = _ts(r.get("heartbeatTime"))
        if (t_doc - started > allow.loading) if hb is None else (t_doc - hb > allow.stall):
            return ("NoHeartbeat", f"rank {r['rank']} has gone silent ({where}); ranks last "
                    f"heard: {ranks}")
    limit = getattr(allow, STAGE_ALLOWANCE.get(stage, "stall"))
    since = _ts(doc.get("stepTime") if stage == TRAINING else doc.get("stageTime"))
    age = (t_doc - since if since is not None else 0.0) + silent
    if age <= limit:
        return None
    what = (f"no step for {int(age)}s" if stage == TRAINING
            else f"in {stage} for {int(age)}s (allowed {int(limit)}s)")
    return ("NoProgress", f"{what} ({where}); ranks last heard: {ranks}")
