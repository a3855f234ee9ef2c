"""Pure decisions about a training run: progress into status, stalls, failure reasons."""

from __future__ import annotations

import json

import pytest
from flywheel_operator import failures, observe
from flywheel_operator.api import GangStatus, Progress, status_document
from flywheel_operator.failures import DISRUPTION, FATAL, RETRY
from flywheel_operator.objects import JobSummary, PodSummary, Why
from flywheel_operator.observe import Allowances, Polled


def pod(name="r-a1-0", phase="Failed", disruption=None, waiting=None, **kw) -> PodSummary:
    base = {"node": "h200-0", "exit_code": 1, "reason": "Error", "message": ""}
    return PodSummary(name=name, phase=phase, disruption=disruption and Why(*disruption),
                      waiting=waiting and Why(*waiting), **{**base, **kw})


@pytest.mark.parametrize(("pods", "job", "reason", "kind", "words"), [
    ([pod(reason="OOMKilled", exit_code=137)], None, "OOMKilled", RETRY, "ran out of memory"),
    ([pod(exit_code=2, message=json.dumps({"error": "DataError: train.jsonl:3: invalid JSON"}))],
     None, "DataError", FATAL, "DataError: train.jsonl:3: invalid JSON"),
    ([pod(message="torch.distributed.DistBackendError: NCCL error in: ... unhandled system "
          "error")], None, "CommunicationError", RETRY, "NCCL error"),
    ([pod(message="RuntimeError: CUDA error: an illegal memory access was encountered")], None,
     "CUDAError", RETRY, "illegal memory access"),
    ([pod(message="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")],
     None, "CUDAOutOfMemory", RETRY, "Tried to allocate"),
    ([pod(disruption=("DeletionByPodGC", "PodGC: node no longer exists"))], None, "NodeLost",
     DISRUPTION, "node no longer exists"),
    ([pod(disruption=("PreemptionByScheduler", "Kueue preempted it"))], None, "Preempted",
     DISRUPTION, "Kueue preempted it"),
    ([pod(disruption=("EvictionByEvictionAPI", "Eviction API: evicting"))], None, "Evicted",
     DISRUPTION, "Eviction API"),
    ([], JobSummary("r-a1", failed="Pod t/r-a1-1 has condition DisruptionTarget matching "
                    "FailJob rule at index 0", failed_reason="PodFailurePolicy"), "NodeLost",
     DISRUPTION,
     "DisruptionTarget"),
    ([pod(exit_code=1, message="ValueError: boom")], None, "AttemptFailed", RETRY,
     "exited with code 1: ValueError: boom"),
])
def test_classify(pods, job, reason, kind, words):
    failure = failures.classify(pods, job)
    assert (failure.reason, failure.kind) == (reason, kind)
    assert words in failure.message


def test_disruption_wins_over_the_exit_it_caused():
    pods = [pod("r-a1-0", message="DistBackendError: NCCL connection reset"),
            pod("r-a1-1", disruption=("DeletionByTaintManager", "node not ready"))]
    assert failures.classify(pods, None).reason == "NodeLost"


def test_start_failures_wait_for_the_grace_period():
    stuck = pod(phase="Pending", waiting=("CreateContainerConfigError",
                                          'secret "comet" not found'),
                scheduled_at="2026-11-29T12:00:00Z")
    assert failures.start_failure([stuck], "2026-11-29T12:00:30Z", 60) == (None, 30.0)
    failure, _ = failures.start_failure([stuck], "2026-11-29T12:01:00Z", 60)
    assert failure.reason == "CreateContainerConfigError" and failure.kind == FATAL
    assert failure.message == 'pod r-a1-0: CreateContainerConfigError: secret "comet" not found'
    pulling = pod(phase="Pending", waiting=("ContainerCreating", ""),
                  scheduled_at="2026-11-29T11:00:00Z")
    assert failures.start_failure([pulling], "2026-11-29T12:01:00Z", 60) == (None, None)


def doc(**kw) -> dict:
    base = {"stage": "training", "stageTime": "2026-11-29T12:00:00Z", "step": 40,
            "totalSteps": 100, "epoch": 1, "loss": 1.23456, "tokensPerSecond": 1234.56,
            "mfu": 0.41234, "etaSeconds": 600.0, "startTime": "2026-11-29T11:55:00Z",
            "stepTime": "2026-11-29T12:10:00Z", "heartbeatTime": "2026-11-29T12:10:05Z",
            "lastCheckpoint": {"step": 40, "time": "2026-11-29T12:09:00Z"},
            "ranks": [{"rank": 0, "stage": "training", "step": 40,
                       "heartbeatTime": "2026-11-29T12:10:05Z",
                       "where": "wait (distributed_c10d.py:9) <- forward_backward (train.py:7)"},
                      {"rank": 1, "stage": "training", "step": 40,
                       "heartbeatTime": "2026-11-29T12:10:03Z"}]}
    return {**base, **kw}


def polled(d=None, at="2026-11-29T12:10:06Z", **kw) -> Polled:
    return Polled(attempt=1, doc=d, fetched_at=at if d else None, polled_at=at, **kw)


ALLOW = Allowances(stall=300, loading=1800, evaluation=3600)


def test_progress_status_and_last_checkpoint():
    p = polled(doc())
    assert status_document(observe.progress_status(p, None)) == {
        "stage": "training", "step": 40, "totalSteps": 100, "percent": "40%", "epoch": 1,
        "loss": 1.2346, "tokensPerSecond": 1234.6, "mfu": 0.4123,
        "eta": "2026-11-29T12:20:06Z", "heartbeatTime": "2026-11-29T12:10:05Z"}
    assert status_document(observe.last_checkpoint(p, "s3://b/ckpt/")) == {
        "step": 40, "time": "2026-11-29T12:09:00Z", "uri": "s3://b/ckpt/step-40"}
    # a failed poll keeps what was known
    known = Progress(step=3)
    assert observe.progress_status(polled(None, error="timed out"), known) == known


def test_a_healthy_run_is_not_stalled():
    assert observe.stalled(polled(doc()), "2026-11-29T11:55:00Z", "2026-11-29T12:10:30Z",
                           ALLOW) is None


def test_no_step_advance_is_a_stall_naming_stage_step_and_ranks():
    p = polled(doc(stepTime="2026-11-29T12:00:00Z"))
    reason, message = observe.stalled(p, None, "2026-11-29T12:10:30Z", ALLOW)
    assert reason == "NoProgress"
    assert message.startswith("no step for 629s (stage training, step 40/100)")
    assert ("rank 1 step 40 (2s ago), rank 0 step 40 (0s ago, in wait (distributed_c10d.py:9) "
            "<- forward_backward (train.py:7))") in message


def test_a_rank_that_goes_silent_is_named():
    ranks = [{"rank": 0, "step": 40, "heartbeatTime": "2026-11-29T12:10:05Z"},
             {"rank": 1, "step": 39, "heartbeatTime": "2026-11-29T12:01:00Z"}]
    reason, message = observe.stalled(polled(doc(ranks=ranks)), None, "2026-11-29T12:10:10Z",
                                      ALLOW)
    assert reason == "NoHeartbeat" and message.startswith("rank 1 has gone silent")
    assert "rank 1 step 39 (545s ago)" in message


def test_rank_0_unreachable_for_too_long():
    p = Polled(attempt=1, doc=doc(), fetched_at="2026-11-29T12:10:06Z",
               polled_at="2026-11-29T12:20:00Z", error="URLError: timed out")
    reason, message = observe.stalled(p, None, "2026-11-29T12:20:00Z", ALLOW)
    assert reason == "NoHeartbeat" and "has not answered for 594s" in message
    assert "URLError: timed out" in message


def test_loading_and_evaluation_have_their_own_allowances():
    loading = doc(stage="loading-model", stageTime="2026-11-29T11:55:00Z")
    assert observe.stalled(polled(loading), None, "2026-11-29T12:10:06Z", ALLOW) is None
    evaluating = doc(stage="evaluating", stageTime="2026-11-29T11:10:00Z")
    reason, message = observe.stalled(polled(evaluating), None, "2026-11-29T12:10:06Z", ALLOW)
    assert reason == "NoProgress" and message.startswith("in evaluating for 3605s (allowed 3600s")


def test_no_answer_since_the_pods_started():
    # never tried (the operator just started): no judgement, however old the pods
    assert observe.stalled(None, "2026-11-29T00:00:00Z", "2026-11-29T12:20:00Z", ALLOW) is None
    refused = Polled(attempt=1, doc=None, fetched_at=None, polled_at="2026-11-29T12:00:01Z",
                     error="ConnectionRefusedError", first_polled_at="2026-11-29T11:00:00Z")
    assert observe.stalled(refused, "2026-11-29T11:45:00Z", "2026-11-29T12:00:01Z",
                           ALLOW) is None  # the pods started 15 min ago
    reason, message = observe.stalled(refused, "2026-11-29T10:00:00Z", "2026-11-29T12:00:01Z",
                                      ALLOW)
    assert reason == "NoHeartbeat"
    assert message == ("no progress from rank 0 in 3601s since its pods started: "
                       "ConnectionRefusedError")


def test_a_gang_member_deleted_or_replaced_is_a_disruption():
    gang = GangStatus(attempt=1, pods=["r-a1-0-x", "r-a1-1-y"])
    running = [pod("r-a1-0-x", phase="Running"), pod("r-a1-1-y", phase="Running")]
    assert failures.lost_member(running, gang, 1) is None
    # kubectl delete pod (graceful): the pod is going
    going = [running[0], PodSummary("r-a1-1-y", phase="Running", deleting=True, node="h200-1")]
    lost = failures.lost_member(going, gang, 1)
    assert (lost.reason, lost.kind) == ("PodDeleted", DISRUPTION)
    assert "r-a1-1-y" in lost.message
    # drained: the eviction's DisruptionTarget names it
    evicted = [running[0], PodSummary("r-a1-1-y", phase="Running", deleting=True,
                                      disruption=Why("EvictionByEvictionAPI", "Eviction API"))]
    assert failures.lost_member(evicted, gang, 1).reason == "Evicted"
    # delete --force: gone at once, and the Job controller made a new pod for its index
    replaced = [running[0], pod("r-a1-1-z", phase="Pending")]
    lost = failures.lost_member(replaced, gang, 1)
    assert lost.reason == "PodDeleted" and "replaced by r-a1-1-z" in lost.message
    assert "PodDeleted" in failures.DISRUPTED
    # another attempt's record says nothing about this one
    assert failures.lost_member(replaced, gang, 2) is None


def test_a_rank_killed_by_its_deletion_is_a_disruption_and_a_real_failure_wins():
    # kubectl delete pod: SIGTERM, the container exits 143 before the operator looks
    killed = PodSummary("r-a1-1-y", phase="Failed", deleting=True, node="h200-1",
                        exit_code=143)
    failure = failures.classify([pod("r-a1-0-x", phase="Running"), killed], None)
    assert (failure.reason, failure.kind) == ("PodDeleted", DISRUPTION)
    assert "r-a1-1-y" in failure.message
    # a rank that failed on its own: the Job controller then deletes the others (143)
    crashed = pod("r-a1-0-x", phase="Failed", exit_code=1)
    assert failures.classify([crashed, killed], None).reason == "AttemptFailed"
