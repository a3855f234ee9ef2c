"""Runs under Kueue, without a cluster: queued, admitted, suspended, preempted, refused."""

from __future__ import annotations

from flywheel_operator.api import Run, status_document
from flywheel_operator.config import OperatorConfig
from flywheel_operator.lifecycle import decide
from flywheel_operator.objects import job_summary, workload_summary
from flywheel_operator.render import attempt_objects

from .conftest_data import with_status
from .test_lifecycle import NOW, T0, cond, pod, run

KUEUE = OperatorConfig.model_validate({"kueue": {"enabled": True}})
T_ADMIT, T_EVICT = "2026-11-26T10:00:00Z", "2026-11-26T11:00:00Z"


def queued_run(status: dict | None = None, queue: str | None = "h200",
               priority: str | None = None, **kw) -> Run:
    kueue = {"queueName": queue, "priorityClassName": priority}
    return run(status, **kw, **{k: v for k, v in kueue.items() if v is not None},
               baseModel="hf://Qwen/Qwen3-0.6B", modelName="m",
               dataset={"train": "s3://d/train.jsonl"}, output={"uri": "s3://m/r/"})


def qjob(attempt: int, suspend: bool = True, complete: bool = False) -> dict:
    labels = {"flywheel.dev/attempt": str(attempt), "kueue.x-k8s.io/queue-name": "h200"}
    return job_summary({"metadata": {"name": f"r-a{attempt}", "labels": labels},
                        "spec": {"suspend": suspend}, "status": {"conditions": [
                            {"type": "Complete", "status": "True"}] if complete else []}})


def workload(attempt: int, admitted: bool = False, evicted: str | None = None,
             active: bool = True) -> dict:
    conditions = [{"type": "QuotaReserved", "status": "True" if admitted else "False",
                   "reason": "QuotaReserved" if admitted else "Pending",
                   "message": "" if admitted else "couldn't assign flavors to pod set main: "
                   "insufficient unused quota for nvidia.com/gpu in flavor h200, 16 more needed",
                   "lastTransitionTime": T_ADMIT}]
    if admitted:
        conditions.append({"type": "Admitted", "status": "True", "reason": "Admitted",
                           "message": "", "lastTransitionTime": T_ADMIT})
    if evicted:
        conditions.append({"type": "Evicted", "status": "True", "reason": evicted,
                           "message": "Preempted to accommodate a workload (UID: x) due to "
                           "prioritization in the ClusterQueue", "lastTransitionTime": T_EVICT})
    return workload_summary({
        "metadata": {"name": f"job-r-a{attempt}-abcde",
                     "ownerReferences": [{"kind": "Job", "name": f"r-a{attempt}"}]},
        "spec": {"active": active, "queueName": "h200"},
        "status": {"conditions": conditions, "admission": {
            "clusterQueue": "h200",
            "podSetAssignments": [{"name": "main", "flavors": {"nvidia.com/gpu": "h200"}}],
        } if admitted else None}})


def test_a_queued_run_creates_its_job_suspended_with_the_queue_and_priority_labels():
    r = queued_run(priority="high")
    plan = decide(r, [], [], NOW, KUEUE)
    assert plan.create_attempt == 1 and plan.status.phase == "Queued"
    assert status_document(plan.status)["queue"] == {"name": "h200"}
    job = attempt_objects(with_status(r, plan.status), 1, KUEUE)[-1]
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h200"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    # Kueue's labels are the Job's, not its pods'; the pool's scheduling stays as it was.
    pod_template = job["spec"]["template"]
    assert "kueue.x-k8s.io/queue-name" not in pod_template["metadata"]["labels"]
    assert pod_template["spec"]["nodeSelector"] == {"flywheel.dev/pool": "h200"}


def test_without_a_queue_the_job_is_as_before_even_with_kueue_on():
    r = queued_run(queue=None)
    plan = decide(r, [], [], NOW, KUEUE)
    assert plan.status.phase == "Pending" and "queue" not in status_document(plan.status)
    job = attempt_objects(with_status(r, plan.status), 1, KUEUE)[-1]
    assert "suspend" not in job["spec"]
    assert not any(k.startswith("kueue.x-k8s.io") for k in job["metadata"]["labels"])


def test_namespace_default_queue_applies_to_runs_that_name_none():
    config = OperatorConfig.model_validate(
        {"kueue": {"enabled": True, "defaultQueue": "shared", "namespaceQueues": {"ns": "h200"}}})
    assert config.kueue.queue("ns", None) == "h200"
    assert config.kueue.queue("other", None) == "shared"
    assert config.kueue.queue("ns", "mine") == "mine"
    assert OperatorConfig().kueue.queue("ns", "mine") is None


def test_pending_workload_says_queued_with_kueues_reason_and_position():
    status = {"phase": "Queued", "attempt": 1, "queue": {"name": "h200"}}
    plan = decide(queued_run(status), [qjob(1)], [], NOW, KUEUE, [workload(1)], position=2)
    assert plan.status.phase == "Queued"
    assert status_document(plan.status)["queue"] == {"name": "h200", "workload": "job-r-a1-abcde",
                                                     "position": 2}
    queued = cond(plan.status, "Queued")
    assert queued.status == "True" and queued.reason == "Pending"
    assert queued.message.startswith("position 2 in h200: couldn't assign flavors")
    assert cond(plan.status, "Admitted").status == "False"
    assert plan.suspend_job is None and plan.activate is None  # the Job is Kueue's


def test_admitted_workload_reports_the_flavor_then_follows_the_pods():
    status = {"phase": "Queued", "attempt": 1, "queue": {"name": "h200"}}
    plan = decide(queued_run(status), [qjob(1, suspend=False)], [pod(1, 0), pod(1, 1)], NOW,
                  KUEUE, [workload(1, admitted=True)])
    assert plan.status.phase == "Running"
    assert plan.status.queue.flavors == ["h200"]
    assert plan.status.queue.clusterQueue == "h200"
    assert plan.status.queue.admittedAt == T_ADMIT
    admitted = cond(plan.status, "Admitted")
    assert admitted.status == "True" and "flavor h200" in admitted.message
    assert cond(plan.status, "Queued").status == "False"
    assert ("Normal", "Admitted", "attempt 1: admitted by ClusterQueue h200 with flavor h200") \
        in plan.events
    assert plan.suspend_job is None


def test_preemption_ends_the_attempt_without_spending_the_restart_budget():
    status = {"phase": "Running", "attempt": 1, "queue": {"name": "h200", "admittedAt": T_ADMIT}}
    r = queued_run(status, restarts=0)
    plan = decide(r, [qjob(1, suspend=True)], [], NOW, KUEUE,
                  [workload(1, evicted="Preempted")])
    assert plan.status.phase == "Queued" and plan.status.attempt == 2
    assert plan.create_attempt == 2 and plan.delete_attempts == [1]
    (record,) = plan.status.attempts
    assert record.phase == "Preempted" and record.reason == "Preempted"
    assert record.gpuHours == 16.0  # 2 nodes x 8 GPUs held for the hour to the eviction
    assert record.startTime == T_ADMIT and record.completionTime == T_EVICT
    assert plan.status.gpuHours == 16.0
    assert "resuming from the last complete checkpoint" in plan.status.message
    assert plan.events[0][:2] == ("Warning", "Preempted")
    # maxRestarts is 0, yet a failure of attempt 2 would still be its first failure.
    failed = decide(with_status(r, plan.status), [qjob(2, suspend=False)],
                    [pod(2, 0, "Failed", 1, "boom"), pod(2, 1)], NOW, KUEUE)
    assert failed.status.phase == "Failed"
    assert [a.phase for a in failed.status.attempts] == ["Preempted", "Failed"]


def test_preempted_pods_count_their_own_running_time():
    status = {"phase": "Running", "attempt": 1, "queue": {"name": "h200", "admittedAt": T_ADMIT}}
    plan = decide(queued_run(status), [qjob(1)], [pod(1, 0), pod(1, 1)], NOW, KUEUE,
                  [workload(1, evicted="PodsReadyTimeout")])
    (record,) = plan.status.attempts
    assert record.reason == "PodsReadyTimeout" and record.startTime == T0
    assert record.gpuHours == 16.0  # 2 pods x 8 GPUs from T0 to the eviction (1 h)


def test_suspend_goes_through_the_workload_never_the_job():
    status = {"phase": "Running", "attempt": 1, "queue": {"name": "h200"}}
    plan = decide(queued_run(status, suspend=True), [qjob(1, suspend=False)], [], NOW, KUEUE,
                  [workload(1, admitted=True)])
    assert plan.activate == ("job-r-a1-abcde", False) and plan.suspend_job is None
    assert plan.status.phase == "Suspended"
    # Kueue deactivated it: no preemption, no new attempt; resuming reactivates it.
    suspended = decide(queued_run(plan.status, suspend=True), [qjob(1)], [], NOW, KUEUE,
                       [workload(1, evicted="Deactivated", active=False)])
    assert suspended.create_attempt is None and suspended.activate is None
    resumed = decide(queued_run(suspended.status), [qjob(1)], [], NOW, KUEUE,
                     [workload(1, active=False)])
    assert resumed.activate == ("job-r-a1-abcde", True)
    assert resumed.status.phase == "Queued"


def test_a_suspended_queued_run_gets_no_job_until_resumed():
    plan = decide(queued_run(suspend=True), [], [], NOW, KUEUE)
    assert plan.create_attempt is None and plan.status.phase == "Suspended"
    assert decide(queued_run(plan.status), [], [], NOW, KUEUE).create_attempt == 1


def test_queue_settings_the_config_cannot_honour_fail_the_run_with_the_field():
    plan = decide(queued_run(), [], [], NOW, OperatorConfig())
    assert plan.status.phase == "Failed" and plan.create_attempt is None
    assert "spec.queueName" in plan.status.message and "kueue.enabled" in plan.status.message
    plan = decide(queued_run(queue=None, priority="high"), [], [], NOW, KUEUE)
    assert plan.status.phase == "Failed"
    assert plan.status.message.startswith("spec.priorityClassName needs a Kueue queue")
