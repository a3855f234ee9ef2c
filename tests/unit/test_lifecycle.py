"""The FineTuneRun lifecycle decisions, without a cluster."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest
from flywheel_operator.api import (
    Condition,
    FineTuneRunStatus,
    Run,
    status_document,
    status_patch,
)
from flywheel_operator.lifecycle import decide, registered
from flywheel_operator.objects import job_summary, pod_summary

from .conftest_data import make_body, make_run

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
T0, T1 = "2026-11-26T10:00:00Z", "2026-11-26T11:30:00Z"
DIGEST = "sha256:" + "ab" * 32
#: What rank 0 writes to its termination message when training succeeded.
SUMMARY = json.dumps({"artifact": {"uri": "s3://m/r/", "digest": DIGEST},
                      "metrics": {"eval_loss": 1.25}, "steps": 12, "tokens": 3_600_000,
                      "throughput": {"tokensPerSecond": 1234.56},
                      "tracking": {"url": "https://www.comet.com/acme/p/k"}})


def run(status=None, nodes: int = 2, suspend: bool = False, restarts: int = 3,
        preflight: bool = False, **spec) -> Run:
    return make_run("r", "ns", status, "u1",
                    resources={"nodes": nodes, "gpusPerNode": 8, "nodePool": "h200"},
                    suspend=suspend, maxRestarts=restarts, preflight={"enabled": preflight},
                    **spec)


def job(attempt: int, complete=False, failed=None, suspend=False) -> dict:
    conditions = []
    if complete:
        conditions.append({"type": "Complete", "status": "True"})
    if failed:
        conditions.append({"type": "Failed", "status": "True", "message": failed})
    return job_summary({
        "metadata": {"name": f"r-a{attempt}", "labels": {"flywheel.dev/attempt": str(attempt)}},
        "spec": {"suspend": suspend}, "status": {"conditions": conditions},
    })


def pod(attempt: int, index: int, phase="Running", exit_code=None, message=None,
        unschedulable=None) -> dict:
    status: dict = {"phase": phase, "conditions": []}
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False",
                                     "reason": "Unschedulable", "message": unschedulable})
    if phase == "Running":
        status["containerStatuses"] = [{"state": {"running": {"startedAt": T0}}}]
    if phase in ("Succeeded", "Failed"):
        status["containerStatuses"] = [{"state": {"terminated": {
            "exitCode": exit_code or 0, "reason": "Error", "message": message,
            "startedAt": T0, "finishedAt": T1}}}]
    return pod_summary({
        "metadata": {"name": f"r-a{attempt}-{index}",
                     "labels": {"flywheel.dev/attempt": str(attempt)}},
        "spec": {"nodeName": None if unschedulable else f"h200-{index}"},
        "status": status,
    })


def cond(status: FineTuneRunStatus, type_: str) -> Condition:
    return next(c for c in status.conditions if c.type == type_)


def test_new_run_creates_attempt_one_and_is_pending():
    plan = decide(run(), [], [], NOW)
    assert plan.create_attempt == 1
    assert plan.status.phase == "Pending" and plan.status.attempt == 1
    assert plan.status.startTime == "2026-11-26T12:00:00Z"
    assert plan.status.observedGeneration == 1


def test_all_pods_running_means_running():
    plan = decide(run({"phase": "Pending", "attempt": 1}), [job(1)], [pod(1, 0), pod(1, 1)], NOW)
    assert plan.create_attempt is None
    assert plan.status.phase == "Running"
    assert cond(plan.status, "Running").status == "True"
    assert cond(plan.status, "Scheduled").status == "True"


def test_deciding_twice_on_the_same_state_is_a_no_op():
    first = decide(run({"phase": "Pending", "attempt": 1}), [job(1)], [pod(1, 0), pod(1, 1)], NOW)
    later = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
    second = decide(run(first.status), [job(1)], [pod(1, 0), pod(1, 1)], later)
    assert status_document(second.status) == status_document(first.status)
    assert second.status == first.status
    assert not second.events and second.create_attempt is None


def test_complete_job_means_succeeded_with_condition():
    plan = decide(run({"phase": "Running", "attempt": 1}), [job(1, complete=True)],
                  [pod(1, 0, "Succeeded", message=SUMMARY), pod(1, 1, "Succeeded")], NOW)
    assert plan.status.phase == "Succeeded"
    assert cond(plan.status, "Succeeded").status == "True"
    assert plan.status.completionTime == "2026-11-26T12:00:00Z"


def test_failed_pod_starts_next_attempt_before_tearing_down():
    plan = decide(run({"phase": "Running", "attempt": 1}), [job(1)],
                  [pod(1, 0, "Failed", 137, "NCCL timeout"), pod(1, 1)], NOW)
    assert plan.status.attempt == 2
    assert plan.create_attempt == 2
    assert plan.delete_attempts == [1]
    assert "NCCL timeout" in plan.status.message
    assert plan.events[0][1] == "AttemptFailed"


def test_a_failed_job_waits_for_its_pods_news_before_recording_why():
    """The Job's Failed can be seen before the pod that failed it (the watches are separate):
    the attempt's record and its classification wait for the pod's exit code and message."""
    status = {"phase": "Running", "attempt": 1}
    failed_job = job(1, failed="Job has reached the specified backoff limit")
    behind = decide(run(status), [failed_job], [pod(1, 0), pod(1, 1)], NOW)
    assert behind.status.phase == "Running" and behind.create_attempt is None
    assert not behind.status.attempts and behind.recheck_after is not None
    caught_up = decide(run(status), [failed_job],
                       [pod(1, 0, "Failed", 1, "RuntimeError: NCCL timeout"), pod(1, 1)], NOW)
    assert caught_up.create_attempt == 2 and "NCCL timeout" in caught_up.status.message
    # pods the Job controller is deleting (a deadline, FailJob) have nothing more to say
    deleting = [dataclasses.replace(p, deleting=True) for p in (pod(1, 0), pod(1, 1))]
    torn = decide(run(status), [failed_job], deleting, NOW)
    assert torn.create_attempt == 2


def test_crash_after_status_write_resumes_the_recorded_attempt():
    # Status says attempt 2 but only attempt 1's (failed) Job exists: create 2, drop 1.
    plan = decide(run({"phase": "Pending", "attempt": 2}), [job(1, failed="BackoffLimit")],
                  [pod(1, 0, "Failed", 1)], NOW)
    assert plan.create_attempt == 2 and plan.delete_attempts == [1]
    assert plan.status.attempt == 2


def test_newest_job_wins_over_stale_status():
    plan = decide(run({"phase": "Pending", "attempt": 1}), [job(1, failed="x"), job(2)],
                  [pod(2, 0), pod(2, 1)], NOW)
    assert plan.status.attempt == 2
    assert plan.create_attempt is None
    assert plan.delete_attempts == [1]
    assert plan.status.phase == "Running"


def test_restart_budget_exhausted_fails_with_pod_message():
    plan = decide(run({"phase": "Running", "attempt": 2}, restarts=1), [job(2)],
                  [pod(2, 0, "Failed", 3, '{"error": "CUDA OOM"}')], NOW)
    assert plan.status.phase == "Failed"
    assert plan.create_attempt is None
    assert plan.delete_attempts == [2]
    failed = cond(plan.status, "Failed")
    assert failed.reason == "RestartBudgetExhausted" and "CUDA OOM" in failed.message


def test_terminal_runs_stay_terminal():
    plan = decide(run({"phase": "Failed", "attempt": 4}), [], [], NOW)
    assert plan.create_attempt is None and plan.status.phase == "Failed"


def test_suspend_and_resume_toggle_the_job():
    suspended = decide(run({"phase": "Running", "attempt": 1}, suspend=True), [job(1)],
                       [pod(1, 0), pod(1, 1)], NOW)
    assert suspended.suspend_job == ("r-a1", True)
    assert suspended.status.phase == "Suspended"
    assert cond(suspended.status, "Suspended").status == "True"

    resumed = decide(run(suspended.status), [job(1, suspend=True)], [], NOW)
    assert resumed.suspend_job == ("r-a1", False)
    assert resumed.status.phase == "Pending"
    assert cond(resumed.status, "Suspended").status == "False"


def test_unschedulable_pods_surface_the_scheduler_message():
    msg = "0/6 nodes are available: 4 Insufficient nvidia.com/gpu."
    plan = decide(run({"phase": "Pending", "attempt": 1}), [job(1)],
                  [pod(1, 0, "Pending", unschedulable=msg), pod(1, 1)], NOW)
    scheduled = cond(plan.status, "Scheduled")
    assert scheduled.status == "False" and scheduled.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in scheduled.message
    assert plan.status.phase == "Pending"
    assert plan.events[0][:2] == ("Warning", "Unschedulable")


def preflight_job(complete=False, failed=None) -> dict:
    summary = job_summary({
        "metadata": {"name": "r-preflight", "labels": {"flywheel.dev/component": "preflight"}},
        "spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]
                               if complete else []}})
    return dataclasses.replace(summary, failed=failed)


def preflight_pod(result: dict | None) -> dict:
    body = {"metadata": {"name": "r-preflight-x", "labels": {
        "flywheel.dev/component": "preflight"}}, "spec": {"nodeName": "local-0"},
        "status": {"phase": "Running"}}
    if result is not None:
        body["status"] = {"phase": "Succeeded" if result["ok"] else "Failed",
                          "containerStatuses": [{"state": {"terminated": {
                              "exitCode": 0 if result["ok"] else 1, "startedAt": T0,
                              "finishedAt": T1, "message": json.dumps(result)}}}]}
    return pod_summary(body)


GOOD = {"ok": True, "problems": [], "errors": [], "invalidLines": 0,
        "train": {"examples": 96, "categories": {"email": 48, "crm": 48}},
        "missingCategories": {}, "totalTokens": 3_600_000, "optimizerSteps": 12}


def test_preflight_runs_before_any_gpu_job():
    plan = decide(run(preflight=True), [], [], NOW)
    assert plan.create_preflight and plan.create_attempt is None
    assert plan.status.preflight.phase == "Running"

    waiting = decide(run(plan.status, preflight=True), [preflight_job()], [preflight_pod(None)],
                     NOW)
    assert waiting.create_attempt is None and not waiting.create_preflight


def test_passed_preflight_records_figures_and_starts_attempt_one():
    plan = decide(run({"phase": "Pending", "preflight": {"phase": "Running"}}, preflight=True),
                  [preflight_job(complete=True)], [preflight_pod(GOOD)], NOW)
    assert plan.create_attempt == 1
    pre = plan.status.preflight
    assert pre.phase == "Succeeded" and pre.steps == 12 and pre.tokens == 3_600_000
    assert pre.categories == {"email": 48, "crm": 48}
    # 3.6M tokens at the h200 preset's tokens/s/GPU, priced per GPU-hour.
    assert pre.estimatedGpuHours > 0 and pre.estimatedCost > 0


def test_a_complete_preflight_job_waits_for_its_pods_result_still_on_its_way():
    """As for a training Job: the preflight Job's Complete can be seen before its pod's last
    update, which carries the result. The run waits for it instead of failing."""
    status = {"phase": "Pending", "preflight": {"phase": "Running"}}
    behind = decide(run(status, preflight=True), [preflight_job(complete=True)],
                    [preflight_pod(None)], NOW)
    assert behind.status.phase == "Pending" and behind.create_attempt is None
    assert behind.status.preflight.phase == "Running"
    caught_up = decide(run(status, preflight=True), [preflight_job(complete=True)],
                       [preflight_pod(GOOD)], NOW)
    assert caught_up.create_attempt == 1


def test_failed_preflight_fails_the_run_naming_line_and_category():
    bad = {"ok": False, "errors": ["s3://d/train.jsonl:7: messages[2].tool_calls[0]: "
                                   "arguments are not valid JSON"],
           "problems": ["1 invalid line(s)", "categories below minExamplesPerCategory=8: "
                        "email-config (0)"],
           "invalidLines": 1, "train": {"examples": 95, "categories": {"edit": 95}},
           "missingCategories": {"email-config": 0}, "totalTokens": 1, "optimizerSteps": 1}
    plan = decide(run({"phase": "Pending", "preflight": {"phase": "Running"}}, preflight=True),
                  [preflight_job(failed="BackoffLimitExceeded")], [preflight_pod(bad)], NOW)
    assert plan.create_attempt is None
    assert plan.status.phase == "Failed"
    failed = cond(plan.status, "Failed")
    assert failed.reason == "PreflightFailed"
    assert "train.jsonl:7" in failed.message and "email-config (0)" in failed.message
    assert plan.status.preflight.missingCategories == ["email-config"]


def test_gpu_hours_accumulate_across_attempts():
    first = decide(run({"phase": "Running", "attempt": 1}), [job(1)],
                   [pod(1, 0, "Failed", 1), pod(1, 1, "Failed", 1)], NOW)
    # Two pods x 1.5 h x 8 GPUs.
    assert first.status.gpuHours == 24.0
    second = decide(run(first.status), [job(2, complete=True)],
                    [pod(2, 0, "Succeeded", message=SUMMARY), pod(2, 1, "Succeeded")], NOW)
    assert [a.attempt for a in second.status.attempts] == [1, 2]
    assert second.status.gpuHours == 48.0
    assert second.status.estimatedCost > 0


def test_success_asks_to_register_rank_0s_model_and_records_its_figures():
    plan = decide(run({"phase": "Running", "attempt": 1}), [job(1, complete=True)],
                  [pod(1, 0, "Succeeded", message=SUMMARY), pod(1, 1, "Succeeded")], NOW)
    assert plan.register is not None and plan.register.artifact.digest == DIGEST
    assert status_document(plan.status.progress) == {"stage": "done", "step": 12, "totalSteps": 12,
                                       "percent": "100%",
                                       "tokens": 3_600_000, "tokensPerSecond": 1234.6}
    assert plan.status.trackingUrl == "https://www.comet.com/acme/p/k"
    assert [e[1] for e in plan.events] == ["Succeeded"]
    mv = {"metadata": {"name": "m-v3"}, "spec": {"artifact": {"digest": DIGEST}}}
    registered(plan, mv)
    assert plan.status.modelVersion == "m-v3"
    assert plan.events[-1][:2] == ("Normal", "Registered") and "m-v3" in plan.events[-1][2]


def test_missing_or_bad_summary_fails_the_run_and_registers_nothing():
    for message in (None, "{", json.dumps({"error": "CUDA error: out of memory"})):
        plan = decide(run({"phase": "Running", "attempt": 1}), [job(1, complete=True)],
                      [pod(1, 0, "Succeeded", message=message), pod(1, 1, "Succeeded")], NOW)
        assert plan.register is None
        assert plan.status.phase == "Failed"
        assert cond(plan.status, "Succeeded").reason == "InvalidSummary"
        assert cond(plan.status, "Failed").status == "True"
        assert [e[:2] for e in plan.events] == [("Warning", "InvalidSummary")]
        assert plan.status.attempts[-1].gpuHours > 0  # the GPUs were still used


def test_a_complete_job_waits_for_rank_0s_summary_still_on_its_way():
    """Jobs and pods come by separate watches: a busy operator can see the Job Complete
    while rank 0's pod, as it has it, still runs. The run waits for the pod's own update
    (the summary is in it) instead of failing as InvalidSummary."""
    status = {"phase": "Running", "attempt": 1}
    behind = decide(run(status), [job(1, complete=True)],
                    [pod(1, 0, "Running"), pod(1, 1, "Succeeded")], NOW)
    assert behind.status.phase == "Running" and behind.register is None
    assert not behind.events and behind.recheck_after is not None
    caught_up = decide(run(status), [job(1, complete=True)],
                       [pod(1, 0, "Succeeded", message=SUMMARY), pod(1, 1, "Succeeded")], NOW)
    assert caught_up.status.phase == "Succeeded" and caught_up.register is not None
    # a rank 0 gone altogether has no summary to wait for
    gone = decide(run(status), [job(1, complete=True)], [pod(1, 1, "Succeeded")], NOW)
    assert gone.status.phase == "Failed"
    assert cond(gone.status, "Succeeded").reason == "InvalidSummary"


def test_a_registered_run_is_not_registered_again():
    plan = decide(run({"phase": "Running", "attempt": 1, "modelVersion": "m-v3"}),
                  [job(1, complete=True)],
                  [pod(1, 0, "Succeeded", message=SUMMARY), pod(1, 1, "Succeeded")], NOW)
    assert plan.status.phase == "Succeeded" and plan.register is None


def test_a_misspelt_status_key_fails_where_the_run_enters():
    with pytest.raises(ValueError, match="attemps"):
        Run.parse({**make_body("r", "ns"),
                   "status": {"phase": "Pending", "attempt": 1, "attemps": []}})


def test_a_status_document_round_trips_exactly():
    """What the operator wrote reads back as the same document: no key added (no empty list
    or map the status did not have, no null), none lost, empty maps and lists it set kept."""
    first = decide(run(preflight=True), [], [], NOW)
    passed = decide(run(first.status, preflight=True), [preflight_job(complete=True)],
                    [preflight_pod(GOOD)], NOW)
    running = decide(run(passed.status), [job(1)], [pod(1, 0), pod(1, 1)], NOW)
    failed = decide(run(running.status), [job(1)], [pod(1, 0, "Failed", 1), pod(1, 1)], NOW)
    for plan in (first, passed, running, failed):
        doc = status_document(plan.status)
        assert status_document(FineTuneRunStatus.model_validate(doc)) == doc
        assert None not in doc.values()
    assert "attempts" not in status_document(running.status)  # no default [] appears
    assert [a["attempt"] for a in status_document(failed.status)["attempts"]] == [1]
    assert set(status_document(first.status)) == {
        "phase", "message", "attempt", "observedGeneration", "startTime", "preflight",
        "outputUri", "checkpointUri"}
    assert status_document(first.status)["preflight"] == {"phase": "Running",
                                                          "startTime": "2026-11-26T12:00:00Z"}
    assert status_document(running.status)["gang"] == {"attempt": 1,
                                                       "pods": ["r-a1-0", "r-a1-1"]}
    empty = {"ok": False, "problems": ["no data"], "errors": [], "train": {"examples": 0}}
    none = decide(run(first.status, preflight=True), [preflight_job(complete=True)],
                  [preflight_pod(empty)], NOW)
    pre = status_document(none.status)["preflight"]
    assert pre["categories"] == {} and pre["missingCategories"] == []  # set empty: written


def test_a_field_the_plan_drops_is_removed_by_the_patch():
    running = decide(run({"phase": "Pending", "attempt": 1}), [job(1)], [pod(1, 0), pod(1, 1)],
                     NOW)
    suspended = decide(run(running.status, suspend=True), [job(1)], [pod(1, 0), pod(1, 1)], NOW)
    old, new = status_document(running.status), status_document(suspended.status)
    assert "gang" in old and "gang" not in new
    patch = status_patch(old, new)
    assert patch == {**new, "gang": None}  # JSON merge patch: null removes the field
    assert status_patch(new, new) == new
