"""End to end: Kueue preempts a real training run for a higher-priority one, and the preempted
run resumes from its last complete checkpoint to the same weights as an uninterrupted run.

Both runs train for real (torchrun on CPU via the local executor) through one ClusterQueue
on the local pool whose quota fits one run at a time. The low-priority run lives in a
namespace where the executor's test hook makes attempt 1 stop stepping after its first
checkpoint (step 4), so the high-priority run always arrives mid-run; the high-priority run,
the same training in another namespace, is the uninterrupted reference.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from tests.conftest import ROOT, Cluster, wait_until
from tests.e2e.test_local_training import TRAIN_TIMEOUT, assets, run_dir, start_run, wait_done
from tests.integration.test_kueue import kueue_operator
from tests.integration.test_operator import attempt_pods, run_status

pytestmark = pytest.mark.cluster
__all__ = ["assets", "kueue_operator"]  # fixtures this module uses

QUEUE = "one-run"  # the LocalQueue of both namespaces


def one_run_queue(cluster_queue: str) -> list[dict]:
    """A ClusterQueue on the local pool's flavor whose quota is one run (2 nodes x 1 GPU),
    preempting lower priorities within itself, as a platform team would configure a pool."""
    return [{
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
        "metadata": {"name": cluster_queue},
        "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
                 "preemption": {"withinClusterQueue": "LowerPriority"},
                 "resourceGroups": [{
                     "coveredResources": ["nvidia.com/gpu", "cpu", "memory"],
                     "flavors": [{"name": "local", "resources": [
                         {"name": "nvidia.com/gpu", "nominalQuota": 2},
                         {"name": "cpu", "nominalQuota": 32},
                         {"name": "memory", "nominalQuota": "128Gi"}]}]}]}}]


@contextmanager
def queue_namespace(cluster: Cluster, name: str, cluster_queue: str, hook: str | None = None):
    """A namespace with the LocalQueue `one-run`; `hook`: the executor's env for its pods."""
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name,
                    "--timeout=30s")
    cluster.apply({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                   "metadata": {"name": QUEUE, "namespace": name},
                   "spec": {"clusterQueue": cluster_queue}})
    # Runs go in once Kueue has seen the queue and its ClusterQueue (after the apiserver
    # outage test, its informers may still be catching up).
    cluster.kubectl("wait", "--for=condition=Active", f"localqueue/{QUEUE}", "-n", name,
                    "--timeout=180s", timeout=200)
    env = ROOT / ".cache" / "executor" / "env" / f"{name}.json"
    if hook:
        env.parent.mkdir(parents=True, exist_ok=True)
        env.write_text(hook)
    try:
        yield name
    finally:
        env.unlink(missing_ok=True)
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_high_priority_run_preempts_and_the_low_run_resumes_to_the_same_weights(
        cluster, kueue_operator, assets, tmp_path_factory):
    tag = os.getpid()
    cq = f"e2e-one-run-{tag}"
    cluster.apply(one_run_queue(cq))
    # Attempt 1 of the low run stops stepping after step 4, right after its first checkpoint
    # (heartbeats go on: it is not stalled), so it is mid-run when the high run arrives.
    stop = '{"FLYWHEEL_DEBUG_STOP_AT_STEP": "4", "FLYWHEEL_DEBUG_STOP_ATTEMPT": "1"}'
    try:
        with queue_namespace(cluster, f"e2e-low-{tag}", cq, stop) as low_ns, \
                queue_namespace(cluster, f"e2e-high-{tag}", cq) as high_ns:
            out = tmp_path_factory.mktemp("out")
            # maxRestarts 0: a preemption must not spend the restart budget.
            start_run(cluster, low_ns, "low", assets, out / "low", queueName=QUEUE,
                      priorityClassName="low", maxRestarts=0)
            # (each run keeps its checkpoints in its own directory under its output)
            wait_until(lambda: list((out / "low").glob("*/checkpoints/step-*/.complete")),
                       timeout=TRAIN_TIMEOUT, interval=0.5, message="low's first checkpoint")
            assert run_status(cluster, low_ns, "low")["phase"] == "Running"

            start_run(cluster, high_ns, "high", assets, out / "high", queueName=QUEUE,
                      priorityClassName="high")
            low = wait_until(lambda: (s := run_status(cluster, low_ns, "low")).get("attempts")
                             and s, timeout=TRAIN_TIMEOUT, message="low's attempt 1 preempted")
            (record,) = low["attempts"]
            assert record["phase"] == "Preempted" and record["gpuHours"] > 0, record
            assert low["phase"] == "Queued" and low["attempt"] == 2

            # One run at a time: while the high run trains, the low run's preempted pods have
            # stopped (Kueue frees the quota once they are terminating) and its next attempt
            # has no pod at all.
            wait_until(lambda: run_status(cluster, high_ns, "high").get("phase") == "Running",
                       timeout=TRAIN_TIMEOUT, message="high running")
            wait_until(lambda: not [p for p in attempt_pods(cluster, low_ns, "low", 1)
                                    if p["status"].get("phase") in ("Pending", "Running")],
                       timeout=30, message="low's preempted pods stopped")
            assert attempt_pods(cluster, low_ns, "low", 2) == []
            assert run_status(cluster, low_ns, "low")["phase"] == "Queued"

            high = wait_done(cluster, high_ns, "high")
            assert high["phase"] == "Succeeded", high.get("message")
            assert high["attempt"] == 1
            low = wait_done(cluster, low_ns, "low")
            assert low["phase"] == "Succeeded", low.get("message")
            assert [a["phase"] for a in low["attempts"]] == ["Preempted", "Succeeded"]
            assert low["attempt"] == 2

            logs = sorted((ROOT / ".cache" / "executor" / low_ns).glob("low-a2-0-*/output.log"))
            assert logs and "resumed from checkpoint step 4" in logs[-1].read_text().lower()
            # The same weights as the uninterrupted high run (the model cards differ: run
            # names, attempts); the registered digest is that of the files at the output.
            weights = (run_dir(low) / "model.safetensors").read_bytes()
            assert weights == (run_dir(high) / "model.safetensors").read_bytes()
            mv = cluster.get("mv", low["modelVersion"], "-n", low_ns)
            assert mv["spec"]["artifact"]["uri"] == low["outputUri"]
            assert low["outputUri"].startswith(f"file://{out / 'low'}/")
    finally:
        cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)
