"""The lifecycle with what the operator watches: progress into status, stalls, failure
reasons and their budgets (pure: decide() on slim summaries, no cluster)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

from flywheel_operator.api import Run, status_document
from flywheel_operator.lifecycle import decide
from flywheel_operator.objects import job_summary, pod_summary
from flywheel_operator.observe import Polled

from .conftest_data import make_run

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
T0 = "2026-11-29T11:00:00Z"


def run(status=None, restarts=3, disruptions=10, stall=None) -> Run:
    return make_run("r", "ns", {"phase": "Running", "attempt": 1, **(status or {})}, "u1",
                    resources={"nodes": 2, "gpusPerNode": 8, "nodePool": "h200"},
                    maxRestarts=restarts, maxDisruptions=disruptions,
                    preflight={"enabled": False}, output={"uri": "s3://b/out"},
                    **({"stallTimeoutSeconds": stall} if stall else {}))


def job(attempt=1, failed=None, reason=None):
    conditions = [{"type": "Failed", "status": "True", "message": failed,
                   "reason": reason}] if failed else []
    return job_summary({"metadata": {"name": f"r-a{attempt}", "labels": {
        "flywheel.dev/attempt": str(attempt)}}, "spec": {}, "status": {"conditions": conditions}})


def pod(index, attempt=1, phase="Running", terminated=None, waiting=None, conditions=()):
    state = ({"terminated": {"startedAt": T0, "finishedAt": "2026-11-29T11:30:00Z",
                             **terminated}} if terminated else
             {"waiting": waiting} if waiting else {"running": {"startedAt": T0}})
    return pod_summary({
        "metadata": {"name": f"r-a{attempt}-{index}", "labels": {
            "flywheel.dev/attempt": str(attempt)}, "annotations": {
            "batch.kubernetes.io/job-completion-index": str(index)}},
        "spec": {"nodeName": f"h200-{index}", "containers": [
            {"name": "trainer", "ports": [{"name": "progress", "containerPort": 9400}]}]},
        "status": {"phase": phase, "podIP": f"10.0.0.{index + 1}",
                   "conditions": [{"type": "PodScheduled", "status": "True",
                                   "lastTransitionTime": T0}, *conditions],
                   "containerStatuses": [{"name": "trainer", "state": state}]}})


def cond(status, type_):
    return next(c for c in status.conditions if c.type == type_)


def doc(step_time="2026-11-29T11:59:50Z", **kw):
    return {"stage": "training", "stageTime": "2026-11-29T11:05:00Z", "step": 30,
            "totalSteps": 120, "epoch": 1, "loss": 1.5, "tokensPerSecond": 5000.0, "mfu": 0.4,
            "etaSeconds": 5400.0, "startTime": T0, "stepTime": step_time,
            "heartbeatTime": "2026-11-29T11:59:58Z",
            "lastCheckpoint": {"step": 25, "time": "2026-11-29T11:50:00Z"},
            "ranks": [{"rank": r, "stage": "training", "step": 30,
                       "heartbeatTime": "2026-11-29T11:59:57Z"} for r in range(16)], **kw}


def polled(d, attempt=1, at="2026-11-29T11:59:59Z"):
    return Polled(attempt=attempt, doc=d, fetched_at=at, polled_at=at, first_polled_at=T0)


def test_pod_summary_carries_what_observe_reads():
    p = pod(0, conditions=[{"type": "DisruptionTarget", "status": "True",
                            "reason": "DeletionByPodGC", "message": "node gone"}])
    assert (p.disruption.reason, p.disruption.message) == ("DeletionByPodGC", "node gone")
    assert (p.ip, p.progress_port, p.scheduled_at) == ("10.0.0.1", 9400, T0)


def test_progress_checkpoint_and_gpu_hours_while_training():
    plan = decide(run(), [job()], [pod(0), pod(1)], NOW, polled=polled(doc()))
    s = status_document(plan.status)  # as written
    assert s["phase"] == "Running" and plan.create_attempt is None
    assert s["progress"] == {"stage": "training", "step": 30, "totalSteps": 120,
                             "percent": "25%", "epoch": 1, "loss": 1.5,
                             "tokensPerSecond": 5000.0, "mfu": 0.4,
                             "eta": "2026-11-29T13:29:59Z",
                             "heartbeatTime": "2026-11-29T11:59:58Z"}
    assert s["lastCheckpoint"] == {"step": 25, "time": "2026-11-29T11:50:00Z",
                                   # the run's own checkpoint directory
                                   "uri": "s3://b/out/r-u1/checkpoints/step-25"}
    # 2 pods x 8 GPUs x (11:00 .. the poll at 11:59:59), live, before the attempt ends
    assert abs(s["gpuHours"] - 16 * 3599 / 3600) < 1e-3 and s["estimatedCost"] > 0
    # before rank 0 first answers (it is loading the model), a poll adds nothing to write
    unanswered = dataclasses.replace(polled(doc()), doc=None, fetched_at=None, error="refused")
    quiet = decide(run(), [job()], [pod(0), pod(1)], NOW, polled=unanswered)
    assert status_document(quiet.status) == status_document(
        decide(run(), [job()], [pod(0), pod(1)], NOW).status)
    # another attempt's poll is ignored
    other = decide(run(), [job()], [pod(0), pod(1)], NOW, polled=polled(doc(), attempt=2))
    assert "progress" not in status_document(other.status)


def test_a_stall_is_a_condition_an_event_and_a_new_attempt():
    stuck = polled(doc(step_time="2026-11-29T11:20:00Z"))
    plan = decide(run(stall=600), [job()], [pod(0), pod(1)], NOW, polled=stuck)
    s = status_document(plan.status)
    stalled = cond(plan.status, "Stalled")
    assert stalled.status == "True" and stalled.reason == "NoProgress"
    assert stalled.message.startswith("no step for 2399s (stage training, step 30/120)")
    assert "ranks last heard: rank 0 step 30 (1s ago)" in stalled.message
    assert plan.create_attempt == 2 and plan.delete_attempts == [1]
    assert s["attempts"][0]["reason"] == "Stalled"
    assert [e[1] for e in plan.events] == ["Stalled", "AttemptFailed"]
    # the next attempt trains: Stalled goes False
    after = decide(run({**s, "phase": "Pending"}, stall=600), [job(2)],
                   [pod(0, 2), pod(1, 2)], NOW, polled=polled(doc(), attempt=2))
    assert cond(after.status, "Stalled").status == "False"


def test_a_lost_node_does_not_spend_the_restart_budget():
    gone = pod(1, phase="Failed", terminated={"exitCode": 137, "reason": "Error"},
               conditions=[{"type": "DisruptionTarget", "status": "True",
                            "reason": "DeletionByPodGC", "message": "PodGC: node h200-1 gone"}])
    plan = decide(run(restarts=0), [job()], [pod(0), gone], NOW)
    assert plan.create_attempt == 2 and plan.status.phase == "Pending"
    assert plan.status.attempts[0].reason == "NodeLost"
    assert plan.events[-1][1] == "AttemptDisrupted" and "disruption 1 of 10" in plan.events[-1][2]
    # ... the Job's podFailurePolicy verdict alone says the same
    verdict = job(failed="Pod ns/r-a1-1 has condition DisruptionTarget matching FailJob rule "
                  "at index 0", reason="PodFailurePolicy")
    assert decide(run(restarts=0), [verdict], [pod(0)], NOW).create_attempt == 2
    # its own budget: maxDisruptions
    spent = decide(run({"attempts": [{"attempt": 1, "reason": "NodeLost", "phase": "Failed"}],
                        "attempt": 2}, restarts=0, disruptions=1),
                   [job(2)], [pod(0, 2), dataclasses.replace(gone, attempt=2)], NOW)
    assert spent.status.phase == "Failed"
    assert cond(spent.status, "Failed").reason == "DisruptionBudgetExhausted"


def test_data_error_fails_at_once_in_the_trainers_words():
    bad = pod(0, phase="Failed", terminated={"exitCode": 2, "reason": "Error", "message":
                                             json.dumps({"error": "DataError: t.jsonl:7: bad"})})
    plan = decide(run(restarts=3), [job()], [bad, pod(1)], NOW)
    assert plan.create_attempt is None and plan.status.phase == "Failed"
    failed = cond(plan.status, "Failed")
    assert failed.reason == "DataError"
    assert "not retried" in failed.message and "DataError: t.jsonl:7: bad" in failed.message


def test_oom_killed_is_named_and_retried():
    oom = pod(1, phase="Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    plan = decide(run(), [job()], [pod(0), oom], NOW)
    assert plan.create_attempt == 2
    assert plan.status.attempts[0].reason == "OOMKilled"
    assert "ran out of memory" in plan.status.attempts[0].message


def test_a_missing_secret_fails_the_run_after_the_grace_period():
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "comet" not found'}
    early = decide(run({"phase": "Pending"}), [job()],
                   [pod(0, phase="Pending", waiting=waiting)],
                   datetime(2026, 11, 29, 11, 1, tzinfo=UTC))
    assert early.status.phase == "Pending" and early.create_attempt is None
    assert early.recheck_after == 60.0  # decide again when the grace (120 s) is up
    plan = decide(run({"phase": "Pending"}), [job()], [pod(0, phase="Pending", waiting=waiting)],
                  NOW)
    failed = cond(plan.status, "Failed")
    assert plan.status.phase == "Failed" and plan.create_attempt is None
    assert failed.reason == "CreateContainerConfigError"
    assert 'secret "comet" not found' in failed.message
