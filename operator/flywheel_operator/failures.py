"""What ended an attempt, as pure functions over the pods' and the Job's summaries.

Failure reasons (status.attempts[].reason, Events, the Failed condition) and what follows:

- `NodeLost`, `Evicted`, `Preempted`: the pod's DisruptionTarget condition (or the Job's
  podFailurePolicy rule for it); `PodDeleted`: a rank of a running gang deleted (`kubectl
  delete pod`, with or without `--force`) or replaced by the Job controller (`lost_member`).
  A new attempt that spends `spec.maxDisruptions`, not `maxRestarts`.
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

from flywheel_trainer.contract import EXIT_DATA_ERROR

from .api import GangStatus
from .objects import JobSummary, PodSummary
from .vocab import parse_time

RETRY, DISRUPTION, FATAL = "retry", "disruption", "fatal"

#: DisruptionTarget reasons (Kubernetes) -> our attempt reason.
DISRUPTIONS = {"PreemptionByScheduler": "Preempted", "PreemptionByKubeScheduler": "Preempted",
               "DeletionByTaintManager": "NodeLost", "DeletionByPodGC": "NodeLost",
               "EvictionByEvictionAPI": "Evicted", "TerminationByKubelet": "Evicted"}
#: Attempt reasons that spend maxDisruptions (PodDeleted: a rank deleted or replaced).
DISRUPTED = frozenset([*DISRUPTIONS.values(), "PodDeleted"])
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


def classify(pods: list[PodSummary], job: JobSummary | None) -> Failure:
    """Why a failed attempt failed, from its pods' slim summaries and its Job's."""
    for pod in pods:
        if pod.disruption:
            reason, message = pod.disruption.reason, pod.disruption.message
            return Failure(DISRUPTIONS.get(reason, "Evicted"), DISRUPTION,
                           f"pod {pod.name} on node {pod.node}: {reason}: {message}")
    by_policy = job is not None and job.failed_reason == "PodFailurePolicy"
    if by_policy and "DisruptionTarget" in (job.failed or ""):
        return Failure("NodeLost", DISRUPTION, job.failed or "")
    # A pod that failed while being deleted was killed by its deletion (`kubectl delete pod`:
    # SIGTERM, exit 143): a lost rank, unless another pod failed on its own.
    failed = [p for p in pods if p.phase == "Failed" and not p.deleting]
    for pod in failed:
        if pod.exit_code == EXIT_DATA_ERROR:
            return Failure("DataError", FATAL, f"pod {pod.name}: {_words(pod.message)}"[:1024])
    for pod in failed:
        if pod.reason == "OOMKilled":
            return Failure("OOMKilled", RETRY, f"pod {pod.name} on node {pod.node} "
                           f"ran out of memory (OOMKilled, exit code {pod.exit_code})")
    for reason, pattern in PATTERNS:
        for pod in failed:
            words = _words(pod.message)
            if pattern.search(words):
                return Failure(reason, RETRY, f"pod {pod.name}: {words}"[:1024])
    if by_policy and "exit code 2" in (job.failed or ""):
        return Failure("DataError", FATAL, job.failed or "")
    if failed:
        pod = failed[0]
        detail = _words(pod.message) or pod.reason or "Error"
        return Failure("AttemptFailed", RETRY,
                       f"pod {pod.name} exited with code {pod.exit_code}: {detail}"[:1024])
    if deleted := lost_member(pods, None, 0):
        return deleted
    return Failure("AttemptFailed", RETRY,
                   (job.failed if job else None) or "the attempt's Job failed")


def lost_member(pods: list[PodSummary], gang: GangStatus | None, attempt: int
                ) -> Failure | None:
    """A rank of a running gang is going or gone: a pod being deleted or evicted, or, once
    every pod ran (`gang`: the attempt's pod names then), one missing or replaced by the Job
    controller. A torchrun gang cannot take a restarted rank back, so the attempt ends as a
    disruption (it spends maxDisruptions, not maxRestarts)."""
    for pod in pods:
        if pod.deleting:
            if pod.disruption:
                reason = DISRUPTIONS.get(pod.disruption.reason, "Evicted")
                why = f"{pod.disruption.reason}: {pod.disruption.message}"
            else:
                reason, why = "PodDeleted", "it was deleted"
            return Failure(reason, DISRUPTION, f"pod {pod.name} on node {pod.node} is going "
                           f"({why}); a torchrun gang cannot take a restarted rank back"[:1024])
    if gang and gang.attempt == attempt:
        names = {p.name for p in pods}
        gone = sorted(set(gang.pods) - names)
        if gone:
            new = sorted(names - set(gang.pods))
            return Failure("PodDeleted", DISRUPTION, f"pod {gone[0]} of attempt {attempt} is "
                           "gone" + (f" (replaced by {new[0]})" if new else "")
                           + "; a torchrun gang cannot take a restarted rank back")
    return None


def start_failure(pods: list[PodSummary], now: str, grace_seconds: float
                  ) -> tuple[Failure | None, float | None]:
    """A container stuck in ImagePullBackOff & co. for longer than the grace period; else
    None and, while one is stuck within its grace, the seconds until it is up."""
    t = parse_time(now)
    left = None
    for pod in pods:
        waiting = pod.waiting
        if not waiting or waiting.reason not in START_FAILURES:
            continue
        since = parse_time(pod.scheduled_at)
        remaining = 0.0 if since is None else grace_seconds - (t - since).total_seconds()
        if remaining <= 0:
            return Failure(waiting.reason, FATAL,
                           f"pod {pod.name}: {waiting.reason}: {waiting.message}"[:1024]), None
        left = remaining if left is None else min(left, remaining)
    return None, left
