"""FineTuneRuns through the real Kueue of the local cluster (hack/kueue/): a queued run has no
pods until Kueue admits all of them, a burst never half-places a gang, a higher priority
preempts and the preempted run comes back as a new attempt, suspend goes through Kueue, and a
run without a queue is scheduled directly as before.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.conftest import ROOT, Cluster, Operator, wait_until
from tests.integration.test_operator import (
    attempt_pods,
    finish_pods,
    jobs_of,
    manifest,
    run_status,
    running_pods,
    wait_phase,
)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def kueue_operator(operator: Operator, tmp_path_factory):
    """The session's operator with the Kueue integration on, for this module only."""
    config = yaml.safe_load((ROOT / "hack" / "operator-local.yaml").read_text())
    path = tmp_path_factory.mktemp("kueue") / "operator.yaml"
    path.write_text(yaml.safe_dump({**config, "kueue": {"enabled": True}}))
    operator.stop()
    kop = Operator(operator.kubeconfig, ROOT / ".cache" / "test-operator-kueue.log", path)
    kop.start()
    yield kop
    kop.stop()
    operator.start()


@pytest.fixture
def queued(cluster: Cluster, kueue_operator, namespace: str) -> str:
    """A fresh namespace with the local cluster's LocalQueues (`h200`, `local`), once the
    H200 pool is free: Kueue's quota is the whole pool, so pods other tests left there (their
    namespaces still being deleted) would take room Kueue counts as free."""
    def pool_free() -> bool:
        pods = cluster.get("pods", "-A")["items"]
        return not any((p["spec"].get("nodeName") or "").startswith("h200-") for p in pods)

    wait_until(pool_free, timeout=120, interval=1, message="the H200 pool has no pods left")
    cluster.kubectl("apply", "--server-side", "-n", namespace,
                    "-f", str(ROOT / "hack" / "kueue" / "local-queues.yaml"))
    return namespace


def h200_nodes(cluster: Cluster) -> int:
    return len(cluster.get("nodes", "-l", "flywheel.dev/pool=h200")["items"])


def cond(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def condition(obj: dict, kind: str) -> dict:
    return cond(obj.get("status") or {}, kind)


def test_second_whole_pool_run_is_queued_without_pods_until_the_first_finishes(
        cluster, queued):
    ns, nodes = queued, h200_nodes(cluster)
    cluster.apply(manifest("first", nodes=nodes, queueName="h200"), ns)
    first = running_pods(cluster, ns, "first", 1, nodes)
    status = wait_phase(cluster, ns, "first", "Running")
    assert status["queue"]["flavors"] == ["h200"] and status["queue"]["clusterQueue"] == "h200"
    assert "flavor h200" in cond(status, "Admitted")["message"]
    cluster.apply(manifest("second", nodes=nodes, queueName="h200"), ns)
    # Kueue's own reason arrives with its first admission attempt on the Workload.
    status = wait_until(lambda: (s := run_status(cluster, ns, "second")).get("phase") == "Queued"
                        and "insufficient unused quota" in cond(s, "Queued").get("message", "")
                        and s, message="second run queued by Kueue, with Kueue's reason")
    assert status["queue"]["name"] == "h200" and status["queue"]["workload"]
    (job,) = jobs_of(cluster, ns, "second")
    assert job["spec"]["suspend"] is True and attempt_pods(cluster, ns, "second", 1) == []
    listed = cluster.kubectl("get", "ftr", "-n", ns).stdout
    assert "QUEUE" in listed and "Queued" in listed

    finish_pods(cluster, ns, first, 0)
    wait_phase(cluster, ns, "first", "Succeeded")
    second = running_pods(cluster, ns, "second", 1, nodes)
    status = wait_phase(cluster, ns, "second", "Running")
    assert cond(status, "Admitted")["status"] == "True"
    assert status["attempt"] == 1 and "attempts" not in status
    finish_pods(cluster, ns, second, 0)
    wait_phase(cluster, ns, "second", "Succeeded")


def test_a_burst_larger_than_the_pool_never_half_places_a_run(cluster, queued):
    ns, nodes = queued, h200_nodes(cluster)
    names = [f"burst-{i}" for i in range(nodes + 1)]  # 2 nodes each: twice the pool and more
    cluster.apply([manifest(n, nodes=2, queueName="h200") for n in names], ns)
    done: set[str] = set()
    while len(done) < len(names):
        def running() -> list[str]:
            return [n for n in names if n not in done
                    and run_status(cluster, ns, n).get("phase") == "Running"]
        batch = wait_until(running, timeout=120, message="a run running")
        assert len(batch) <= nodes // 2
        # All of a run's pods or none: a run whose Workload Kueue has not admitted has no pod
        # at all. (Pods first, then the Workloads: an admission in between only makes the
        # check looser, never wrong; the run's status follows admission a moment later.)
        pods = {name: attempt_pods(cluster, ns, name, 1) for name in names}
        admitted = {ref["name"] for w in cluster.get("workloads", "-n", ns)["items"]
                    if (w.get("status") or {}).get("admission")
                    for ref in w["metadata"].get("ownerReferences") or []}
        for name in set(names) - done:
            if f"{name}-a1" not in admitted:
                assert pods[name] == [], name
        for name in batch:
            finish_pods(cluster, ns, attempt_pods(cluster, ns, name, 1), 0)
            wait_phase(cluster, ns, name, "Succeeded")
            done.add(name)
    events = cluster.get("events", "-n", ns, "--field-selector", "reason=FailedScheduling")
    assert events["items"] == [], json.dumps(events["items"][:1])


def test_high_priority_preempts_and_the_low_run_resumes_as_a_new_attempt(cluster, queued):
    ns, nodes = queued, h200_nodes(cluster)
    cluster.apply(manifest("low", nodes=nodes, restarts=0, queueName="h200",
                           priorityClassName="low"), ns)
    running_pods(cluster, ns, "low", 1, nodes)
    wait_phase(cluster, ns, "low", "Running")
    time.sleep(2)  # so that the preempted attempt has held its GPUs for a measurable time
    cluster.apply(manifest("high", nodes=nodes, queueName="h200",
                           priorityClassName="high"), ns)
    status = wait_until(lambda: (s := run_status(cluster, ns, "low")).get("attempts") and s,
                        timeout=90, message="low's attempt 1 preempted")
    (record,) = status["attempts"]
    assert record["phase"] == "Preempted" and record["reason"] == "Preempted"
    assert record["gpuHours"] > 0 and status["gpuHours"] == record["gpuHours"]
    assert status["phase"] == "Queued" and status["attempt"] == 2
    high = running_pods(cluster, ns, "high", 1, nodes)
    wait_until(lambda: [j["metadata"]["name"] for j in jobs_of(cluster, ns, "low")] == ["low-a2"],
               message="attempt 1's Job replaced by attempt 2's")
    assert attempt_pods(cluster, ns, "low", 2) == []
    finish_pods(cluster, ns, high, 0)
    wait_phase(cluster, ns, "high", "Succeeded")
    low = running_pods(cluster, ns, "low", 2, nodes)  # maxRestarts 0, yet it goes on
    finish_pods(cluster, ns, low, 0)
    status = wait_phase(cluster, ns, "low", "Succeeded")
    assert [a["phase"] for a in status["attempts"]] == ["Preempted", "Succeeded"]


def test_suspend_releases_the_quota_through_kueue_and_resume_requeues(cluster, queued):
    ns, nodes = queued, h200_nodes(cluster)
    cluster.apply(manifest("pausing", nodes=nodes, queueName="h200"), ns)
    running_pods(cluster, ns, "pausing", 1, nodes)
    cluster.kubectl("patch", "ftr", "pausing", "-n", ns, "--type=merge",
                    "-p", '{"spec": {"suspend": true}}')
    wait_phase(cluster, ns, "pausing", "Suspended")
    wait_until(lambda: attempt_pods(cluster, ns, "pausing", 1) == [], message="pods stopped")
    (wl,) = cluster.get("workloads.kueue.x-k8s.io", "-n", ns)["items"]
    assert wl["spec"]["active"] is False
    cluster.kubectl("patch", "ftr", "pausing", "-n", ns, "--type=merge",
                    "-p", '{"spec": {"suspend": false}}')
    pods = running_pods(cluster, ns, "pausing", 1, nodes)
    status = wait_phase(cluster, ns, "pausing", "Running")
    assert status["attempt"] == 1 and "attempts" not in status, status  # a pause is not an attempt
    finish_pods(cluster, ns, pods, 0)
    wait_phase(cluster, ns, "pausing", "Succeeded")


def test_a_run_without_a_queue_runs_directly_as_before(cluster, queued):
    cluster.apply(manifest("direct", nodes=2), queued)
    pods = running_pods(cluster, queued, "direct", 1, 2)
    (job,) = jobs_of(cluster, queued, "direct")
    assert not job["spec"].get("suspend")
    assert not any(k.startswith("kueue.x-k8s.io") for k in job["metadata"]["labels"])
    assert cluster.get("workloads.kueue.x-k8s.io", "-n", queued)["items"] == []
    status = wait_phase(cluster, queued, "direct", "Running")
    assert "queue" not in status and not cond(status, "Queued")
    finish_pods(cluster, queued, pods, 0)
    wait_phase(cluster, queued, "direct", "Succeeded")


def test_local_queues_and_examples_apply_against_the_real_crds(cluster):
    """The admin objects are admitted by Kueue's CRDs and its ClusterQueues are active."""
    for cq in ("h200", "local"):
        wait_until(lambda cq=cq: condition(cluster.get("clusterqueue", cq), "Active")
                   .get("status") == "True", message=f"ClusterQueue {cq} active")
    quota = cluster.get("clusterqueue", "h200")["spec"]["resourceGroups"][0]["flavors"][0]
    gpus = {r["name"]: r["nominalQuota"] for r in quota["resources"]}["nvidia.com/gpu"]
    assert int(gpus) == 8 * h200_nodes(cluster)  # the quota is the pool
    # examples/kueue-queues.yaml passes the API server's validation (dry run: its queues
    # would share the pool with the local ones).
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": team}}
                   for team in ("team-a", "team-b")])
    out = cluster.kubectl("apply", "--dry-run=server", "--server-side",
                          "-f", str(ROOT / "examples" / "kueue-queues.yaml")).stdout
    assert out.count("serverside-applied (server dry run)") == 7, out
