"""An attempt's records, pure: closing it in status.attempts with its GPU-hours and cost, the
failing pod's words, and the preflight pod's result (flywheel_trainer.contract) as status."""

from __future__ import annotations

from flywheel_trainer.contract import parse_preflight

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


def record_attempt(status: dict, attempt: int, job: JobSummary | None, pods: list[PodSummary],
                   phase: str,
                   reason: str, message: str, spec: dict, now: str, config: OperatorConfig,
                   gpu_hours: float | None = None, started: str | None = None) -> None:
    """Close an attempt in status.attempts and re-sum gpuHours and estimatedCost."""
    records = [a for a in status.get("attempts", []) if a["attempt"] != attempt]
    gpus = spec["resources"]["gpusPerNode"]
    started = min((p.started_at for p in pods if p.started_at), default=started)
    if gpu_hours is None:
        gpu_hours = pods_gpu_hours(pods, gpus, now)
    records.append({"attempt": attempt, "job": job.name if job else None, "phase": phase,
                    "startTime": started, "completionTime": now, "reason": reason,
                    "message": message[:1024], "gpuHours": gpu_hours})
    status["attempts"] = sorted(({k: v for k, v in a.items() if v is not None}
                                 for a in records), key=lambda a: a["attempt"])
    add_gpu_hours(status, 0.0, spec, config)


def add_gpu_hours(status: dict, running: float, spec: dict, config: OperatorConfig) -> None:
    """gpuHours = the closed attempts' + `running` (the current attempt's so far), and its
    estimatedCost: GPU-hours accumulate live while an attempt trains."""
    status["gpuHours"] = round(running + sum(a.get("gpuHours", 0.0)
                                             for a in status.get("attempts", [])), 6)
    try:
        pool = config.pool(spec["resources"].get("nodePool"))
        cost = estimate_cost(status["gpuHours"], pool.gpuHourPrice)
    except KeyError:
        cost = None
    if cost is not None:
        status["estimatedCost"] = round(cost, 4)


def preflight_result(pods: list[PodSummary], job: JobSummary) -> dict | None:
    """The trainer's preflight result (contract.PreflightResult) from the pod's termination
    message, if it finished."""
    done = [p for p in pods if p.done]
    if not done and not (job.complete or job.failed is not None):
        return None
    for pod in done:
        if (result := parse_preflight(pod.message)) is not None:
            return result.model_dump()
    why = describe_failure(done, job) if done else (job.failed or "no result")
    return {"ok": False, "problems": [f"the preflight Job gave no result: {why}"], "errors": []}


def preflight_status(result: dict, spec: dict, config: OperatorConfig) -> dict:
    train = result.get("train") or {}
    missing = result.get("missingCategories") or {}
    problems = list(result.get("errors") or [])[:5] + list(result.get("problems") or [])
    status = {"examples": train.get("examples"), "invalidExamples": result.get("invalidLines"),
              "tokens": result.get("totalTokens"), "steps": result.get("optimizerSteps"),
              "parameters": (result.get("memory") or {}).get("params"),
              "categories": train.get("categories") or {},
              "missingCategories": sorted(missing), "problems": problems[:10]}
    try:
        pool = config.pool(spec["resources"].get("nodePool"))
    except KeyError:
        pool = None
    hours = pool and result.get("totalTokens") and estimate_gpu_hours(
        result["totalTokens"], pool.tokensPerSecondPerGpu)
    if pool and hours:
        status["estimatedGpuHours"] = round(hours, 4)
        status["estimatedCost"] = estimate_cost(hours, pool.gpuHourPrice)
    return {k: v for k, v in status.items() if v is not None}
