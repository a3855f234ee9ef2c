"""An attempt's records, pure: closing it in status.attempts with its GPU-hours and cost, the
failing pod's words, and the preflight pod's result (flywheel_trainer.contract) as status."""

from __future__ import annotations

from flywheel_trainer.contract import PreflightResult, parse_preflight

from .api import AttemptStatus, FineTuneRunSpec, FineTuneRunStatus, PreflightStatus
from .config import OperatorConfig
from .objects import JobSummary, PodSummary
from .vocab import estimate_cost, estimate_gpu_hours, pods_gpu_hours


def describe_failure(pods: list[PodSummary], job: JobSummary | None) -> str:
    """The failing pod's own words: its termination message, or exit code and reason."""
    failed = [p for p in pods if p.phase == "Failed"]
    if failed:
        pod = failed[0]
        detail = (pod.message or "").strip() or pod.reason or "Error"
        return f"pod {pod.name} exited with code {pod.exit_code}: {detail}"[:1024]
    return (job.failed if job else None) or "the attempt's Job failed"


def record_attempt(status: FineTuneRunStatus, attempt: int, job: JobSummary | None,
                   pods: list[PodSummary], phase: str, reason: str, message: str,
                   spec: FineTuneRunSpec, now: str, config: OperatorConfig,
                   gpu_hours: float | None = None, started: str | None = None) -> None:
    """Close an attempt in status.attempts and re-sum gpuHours and estimatedCost."""
    records = [a for a in status.attempts if a.attempt != attempt]
    started = min((p.started_at for p in pods if p.started_at), default=started)
    if gpu_hours is None:
        gpu_hours = pods_gpu_hours(pods, spec.resources.gpusPerNode, now)
    records.append(AttemptStatus(
        attempt=attempt, job=job.name if job else None, phase=phase,  # type: ignore[arg-type]
        startTime=started, completionTime=now, reason=reason, message=message[:1024],
        gpuHours=gpu_hours))
    status.attempts = sorted(records, key=lambda a: a.attempt)
    add_gpu_hours(status, 0.0, spec, config)


def add_gpu_hours(status: FineTuneRunStatus, running: float, spec: FineTuneRunSpec,
                  config: OperatorConfig) -> None:
    """gpuHours = the closed attempts' + `running` (the current attempt's so far), and its
    estimatedCost: GPU-hours accumulate live while an attempt trains."""
    status.gpuHours = round(running + sum(a.gpuHours or 0.0 for a in status.attempts), 6)
    try:
        pool = config.pool(spec.resources.nodePool)
        cost = estimate_cost(status.gpuHours, pool.gpuHourPrice)
    except KeyError:
        cost = None
    if cost is not None:
        status.estimatedCost = round(cost, 4)


def pods_behind(job: JobSummary, pods: list[PodSummary]) -> bool:
    """The Job's verdict (Complete or Failed) is ahead of its pods as this operator has seen
    them: Jobs and pods come by separate watches, and a busy operator can read the Job's
    last update before its pods'. Those hold what the verdict needs (rank 0's summary, the
    preflight result, the exit code and message of the pod that failed), so it waits for
    them while a pod it has still runs untouched. A pod seen Failed is news enough, and a
    podFailurePolicy verdict names its pod and condition itself; pods being deleted or gone
    have nothing more to say. (A soak failed runs that had succeeded as InvalidSummary.)"""
    if not (job.complete or job.failed is not None) or job.failed_reason == "PodFailurePolicy":
        return False
    if any(p.phase == "Failed" for p in pods):
        return False
    return any(not p.done and not p.deleting for p in pods)


def preflight_result(pods: list[PodSummary], job: JobSummary) -> PreflightResult | None:
    """The trainer's preflight result (contract.PreflightResult) from the pod's termination
    message, if it finished."""
    done = [p for p in pods if p.done]
    if not done and not (job.complete or job.failed is not None):
        return None
    if pods_behind(job, pods):
        return None
    for pod in done:
        if (result := parse_preflight(pod.message)) is not None:
            return result
    why = describe_failure(done, job) if done else (job.failed or "no result")
    return PreflightResult(ok=False, problems=[f"the preflight Job gave no result: {why}"])


def preflight_status(result: PreflightResult, spec: FineTuneRunSpec,
                     config: OperatorConfig) -> PreflightStatus:
    """The result's figures as status.preflight (outcome, job and times are the caller's)."""
    train = result.train
    figures = PreflightStatus(
        examples=train and train.examples, invalidExamples=result.invalidLines,
        tokens=result.totalTokens, steps=result.optimizerSteps,
        parameters=(result.memory or {}).get("params"),
        categories=train.categories if train else {},
        missingCategories=sorted(result.missingCategories),
        problems=(result.errors[:5] + result.problems)[:10])
    try:
        pool = config.pool(spec.resources.nodePool)
    except KeyError:
        return figures
    hours = result.totalTokens and estimate_gpu_hours(result.totalTokens,
                                                      pool.tokensPerSecondPerGpu)
    if hours:
        figures.estimatedGpuHours = round(hours, 4)
        figures.estimatedCost = estimate_cost(hours, pool.gpuHourPrice)
    return figures
