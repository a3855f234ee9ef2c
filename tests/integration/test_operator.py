"""The operator against the real control plane: FineTuneRun -> Indexed Job on the H200 pool.

Pods on the fake pools stay Running until annotated `flywheel.dev/simulate-exit`.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from tests.conftest import Cluster, admission_refusal, wait_until

pytestmark = pytest.mark.cluster


def manifest(name: str, nodes: int = 2, gpus: int = 8, restarts: int = 3, **spec) -> dict:
    return {
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": "FineTuneRun",
        "metadata": {"name": name, "labels": {"team": "flow"},
                     "annotations": {"owner": "flow-team"}},
        "spec": {
            "baseModel": "hf://Qwen/Qwen3-32B",
            "modelName": "flow-agent",
            "dataset": {"train": "s3://data/flow/train.jsonl",
                        "eval": "s3://data/flow/eval.jsonl"},
            "resources": {"nodes": nodes, "gpusPerNode": gpus, "nodePool": "h200"},
            "hyperparameters": {"globalBatchSize": nodes * gpus * 2},
            "output": {"uri": "s3://models/flow-agent/"},
            "tracking": {"comet": {"workspace": "acme", "project": "flow-agent",
                                   "apiKeySecretRef": {"name": "comet", "key": "api-key"}}},
            "maxRestarts": restarts,
            "preflight": {"enabled": False},
            **spec,
        },
    }


def summary(version_seed: str, eval_loss: float, email_acc: float) -> str:
    return json.dumps({
        "artifact": {"uri": f"s3://models/flow-agent/{version_seed}/",
                     "digest": "sha256:" + hashlib.sha256(version_seed.encode()).hexdigest(),
                     "format": "huggingface-safetensors"},
        "metrics": {"train_loss": 1.0, "eval_loss": eval_loss,
                    "tool_call_accuracy": 0.9, "tool_call_accuracy/email": email_acc},
        "steps": 10, "tokens": 1000,
        "throughput": {"tokensPerSecond": 100.0, "mfu": 0.4},
        "tracking": {"url": None, "experimentKey": "a" * 32},
    })


def run_status(cluster: Cluster, ns: str, name: str) -> dict:
    return cluster.get("ftr", name, "-n", ns).get("status") or {}


def wait_phase(cluster: Cluster, ns: str, name: str, phase: str, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (s := run_status(cluster, ns, name)).get("phase") == phase and s,
        timeout=timeout, message=f"{name} reaches {phase}",
    )


def attempt_pods(cluster: Cluster, ns: str, name: str, attempt: int) -> list[dict]:
    selector = f"flywheel.dev/run={name},flywheel.dev/attempt={attempt}"
    return cluster.get("pods", "-n", ns, "-l", selector)["items"]


def finish_pods(cluster: Cluster, ns: str, pods: list[dict], code: int, message: str = ""):
    """Exit the pods with `code`; exit 0 without a message writes a valid trainer summary."""
    if code == 0 and not message:
        message = summary("s", 1.0, 0.9)
    for pod in pods:
        args = ["annotate", "pod", pod["metadata"]["name"], "-n", ns, "--overwrite",
                f"flywheel.dev/simulate-exit={code}"]
        if message:
            args.append(f"flywheel.dev/simulate-message={message}")
        cluster.kubectl(*args)


def running_pods(cluster: Cluster, ns: str, name: str, attempt: int, count: int) -> list[dict]:
    return wait_until(
        lambda: (pods := attempt_pods(cluster, ns, name, attempt))
        and len([p for p in pods if p["status"].get("phase") == "Running"]) == count and pods,
        message=f"{count} running pods of {name} attempt {attempt}",
    )


def jobs_of(cluster: Cluster, ns: str, name: str) -> list[dict]:
    return cluster.get("jobs", "-n", ns, "-l", f"flywheel.dev/run={name}")["items"]


def test_happy_path_runs_on_h200_and_succeeds(cluster, operator, namespace):
    cluster.apply(manifest("happy", nodes=2, gpus=8), namespace)
    pods = running_pods(cluster, namespace, "happy", 1, 2)

    (job,) = jobs_of(cluster, namespace, "happy")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneRun"
    service = cluster.get("service", job["spec"]["template"]["spec"]["subdomain"],
                          "-n", namespace)
    assert service["spec"]["clusterIP"] == "None"

    nodes = {n["metadata"]["name"]: n for n in cluster.get("nodes")["items"]}
    for pod in pods:
        node = nodes[pod["spec"]["nodeName"]]
        assert node["metadata"]["labels"]["flywheel.dev/pool"] == "h200"
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert pod["metadata"]["labels"]["flywheel.dev/attempt"] == "1"
        env = {e["name"]: e for e in container["env"]}
        assert env["COMET_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "comet", "key": "api-key"}
        assert "value" not in env["COMET_API_KEY"]
        assert env["COMET_WORKSPACE"]["value"] == "acme"
        assert len(env["FLYWHEEL_EXPERIMENT_KEY"]["value"]) == 32
        command = " ".join(container.get("command", []) + container.get("args", []))
        assert "flywheel_trainer.launch" in command and "--nnodes=2" in command
        assert "--nproc-per-node=8" in command
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    status = wait_phase(cluster, namespace, "happy", "Running")
    assert status["attempt"] == 1

    finish_pods(cluster, namespace, pods, 0)
    cluster.kubectl("wait", "--for=condition=Succeeded", "ftr/happy", "-n", namespace,
                    "--timeout=60s")
    status = run_status(cluster, namespace, "happy")
    assert status["phase"] == "Succeeded" and status["completionTime"]

    # The operator never wrote spec, labels or annotations: GitOps sees no drift.
    run = cluster.get("ftr", "happy", "-n", namespace)
    assert run["metadata"]["generation"] == 1
    assert run["metadata"]["labels"] == {"team": "flow"}
    assert run["metadata"]["annotations"] == {"owner": "flow-team"}
    assert "finalizers" not in run["metadata"]

    # Deleting the run leaves nothing behind: the garbage collector takes every child.
    cluster.kubectl("delete", "ftr", "happy", "-n", namespace, "--timeout=30s")
    selector = "flywheel.dev/run=happy"
    wait_until(lambda: not any(cluster.get(kind, "-n", namespace, "-l", selector)["items"]
                               for kind in ("jobs", "services", "networkpolicies", "pods")),
               message="children garbage-collected")


def test_failed_pod_restarts_as_attempt_two_then_succeeds(cluster, operator, namespace):
    cluster.apply(manifest("flaky", nodes=2, gpus=4), namespace)
    pods = running_pods(cluster, namespace, "flaky", 1, 2)
    time.sleep(2)  # let attempt 1 hold its GPUs for a measurable while
    finish_pods(cluster, namespace, pods[:1], 137, "NCCL watchdog timeout")

    pods2 = running_pods(cluster, namespace, "flaky", 2, 2)
    status = run_status(cluster, namespace, "flaky")
    assert status["attempt"] == 2
    wait_until(lambda: [j["metadata"]["name"] for j in jobs_of(cluster, namespace, "flaky")]
               == ["flaky-a2"], message="attempt 1 torn down")
    # each pod of the attempt carries the trainer's config (written as a file by the kubelet)
    for pod in pods2:
        config = json.loads(pod["metadata"]["annotations"]["flywheel.dev/trainer-config"])
        assert config["baseModel"] == "hf://Qwen/Qwen3-32B" and config["attempt"] == 2

    finish_pods(cluster, namespace, pods2, 0)
    status = wait_phase(cluster, namespace, "flaky", "Succeeded")
    assert status["attempt"] == 2
    # GPU-hours accumulate over both attempts (2 pods x 4 GPUs each).
    attempts = status["attempts"]
    assert [(a["attempt"], a["phase"]) for a in attempts] == [(1, "Failed"), (2, "Succeeded")]
    assert status["gpuHours"] == pytest.approx(sum(a["gpuHours"] for a in attempts))
    assert status["gpuHours"] > 0 and "estimatedCost" in status
    events = cluster.get("events", "-n", namespace,
                         "--field-selector", "involvedObject.name=flaky")["items"]
    assert any(e["reason"] == "AttemptFailed" and "NCCL watchdog timeout" in e["message"]
               for e in events)


def test_exhausting_the_restart_budget_fails_the_run(cluster, operator, namespace):
    cluster.apply(manifest("doomed", nodes=1, gpus=1, restarts=1), namespace)
    for attempt in (1, 2):
        pods = running_pods(cluster, namespace, "doomed", attempt, 1)
        finish_pods(cluster, namespace, pods, 1, "CUDA out of memory")
    status = wait_phase(cluster, namespace, "doomed", "Failed")
    assert status["attempt"] == 2
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "RestartBudgetExhausted"
    assert "CUDA out of memory" in failed["message"]
    wait_until(lambda: not jobs_of(cluster, namespace, "doomed"), message="jobs torn down")
    # A failed run never blocks deletion.
    cluster.kubectl("delete", "ftr", "doomed", "-n", namespace, "--timeout=30s")


def test_suspend_stops_pods_and_resume_restarts_them(cluster, operator, namespace):
    cluster.apply(manifest("pausable", nodes=2, gpus=2), namespace)
    running_pods(cluster, namespace, "pausable", 1, 2)
    cluster.kubectl("patch", "ftr", "pausable", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"suspend": true}}')
    wait_phase(cluster, namespace, "pausable", "Suspended")
    wait_until(lambda: not attempt_pods(cluster, namespace, "pausable", 1),
               message="pods stopped")
    assert run_status(cluster, namespace, "pausable")["attempt"] == 1

    cluster.kubectl("patch", "ftr", "pausable", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"suspend": false}}')
    running_pods(cluster, namespace, "pausable", 1, 2)
    wait_phase(cluster, namespace, "pausable", "Running")


def test_unschedulable_run_says_why(cluster, operator, namespace):
    # One node more than the H200 pool has, 8 GPUs each.
    pool = len(cluster.get("nodes", "-l", "flywheel.dev/pool=h200")["items"])
    cluster.apply(manifest("toobig", nodes=pool + 1, gpus=8), namespace)

    def scheduled_false():
        conditions = run_status(cluster, namespace, "toobig").get("conditions", [])
        return next((c for c in conditions if c["type"] == "Scheduled"
                     and c["status"] == "False"), None)

    cond = wait_until(scheduled_false, message="Scheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in cond["message"]
    assert run_status(cluster, namespace, "toobig")["phase"] == "Pending"


def test_sigkill_mid_reconcile_never_duplicates_jobs(cluster, operator, namespace):
    names = [f"burst-{i}" for i in range(6)]
    cluster.apply([manifest(n, nodes=1, gpus=1) for n in names], namespace)
    # Kill the operator repeatedly while it creates attempts and reacts to failures.
    for round_ in range(3):
        time.sleep(0.3 * round_)
        operator.kill()
        operator.start()
    for name in names:
        running_pods(cluster, namespace, name, 1, 1)
    for name in names[:3]:
        finish_pods(cluster, namespace, attempt_pods(cluster, namespace, name, 1), 1, "boom")
    operator.kill()
    operator.start()
    for name in names[:3]:
        running_pods(cluster, namespace, name, 2, 1)
    operator.kill()
    operator.start()
    time.sleep(2)

    for name in names:
        jobs = jobs_of(cluster, namespace, name)
        attempts = [j["metadata"]["labels"]["flywheel.dev/attempt"] for j in jobs
                    if not j["metadata"].get("deletionTimestamp")]
        assert len(attempts) == len(set(attempts)) == 1, (name, attempts)
        # One attempt's objects, the earlier attempt's deleted (a one-node run has no Service).
        assert not cluster.get("services", "-n", namespace, "-l",
                               f"flywheel.dev/run={name}")["items"]
        expected = 2 if name in names[:3] else 1
        assert run_status(cluster, namespace, name)["attempt"] == expected


def test_a_first_job_the_cluster_refuses_leaves_the_runs_status_and_starts_once_allowed(
        cluster, operator, namespace):
    """A one-node run's first Job goes before its status; when admission refuses that Job
    (here a ValidatingAdmissionPolicy on this namespace, as an admin's rule would), the run
    still shows its attempt being created, and the Job starts once the refusal is lifted."""
    refusal = admission_refusal(
        f"fwt-no-jobs-{namespace}", namespace,
        [{"apiGroups": ["batch"], "apiVersions": ["*"], "operations": ["CREATE"],
          "resources": ["jobs"]}], "false", "refused: no Jobs in this test")
    probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe"},
             "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                 {"name": "c", "image": "busybox"}]}}}}

    def refused() -> bool:
        return "refused" in cluster.kubectl("create", "--dry-run=server", "-n", namespace,
                                            "-f", "-", input=json.dumps(probe),
                                            check=False).stderr

    try:
        cluster.apply(refusal)
        wait_until(refused, timeout=30, message="the refusal in force")
        cluster.apply(manifest("refused", nodes=1, gpus=1), namespace)
        status = wait_until(lambda: (s := run_status(cluster, namespace, "refused"))
                            .get("attempt") == 1 and s, message="the attempt in the status")
        assert status["phase"] == "Pending" and not jobs_of(cluster, namespace, "refused")
    finally:
        for obj in reversed(refusal):
            cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"],
                            "--ignore-not-found")
    running_pods(cluster, namespace, "refused", 1, 1)  # retried with backoff, then started
    assert len(jobs_of(cluster, namespace, "refused")) == 1
