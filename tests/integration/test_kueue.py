"""Kueue in the local control plane: gang admission against the GPU pools' quotas.

The Jobs here are shaped like the operator's (Indexed, created suspended with the
`kueue.x-k8s.io/queue-name` label, one pod per node, the GPU toleration); Kueue admits all of
a Job's pods or none, in queue order, with the pool's ResourceFlavor.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, Cluster, wait_until

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture
def queued(cluster: Cluster, namespace: str) -> str:
    """A fresh namespace with the local cluster's LocalQueues (`h200`, `local`)."""
    cluster.kubectl("apply", "--server-side", "-n", namespace,
                    "-f", str(ROOT / "hack" / "kueue" / "local-queues.yaml"))
    return namespace


def h200_nodes(cluster: Cluster) -> int:
    return len(cluster.get("nodes", "-l", "flywheel.dev/pool=h200")["items"])


def gang_job(name: str, nodes: int, gpus: int = 8, queue: str | None = "h200") -> dict:
    labels = {QUEUE_LABEL: queue} if queue else {}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
            "backoffLimit": 0, "suspend": queue is not None,
            "template": {
                "metadata": {"labels": {"gang": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"flywheel.dev/pool": "h200"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"}],
                    "containers": [{"name": "trainer", "image": "trainer:fake",
                                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
                },
            },
        },
    }


def pods_of(cluster: Cluster, ns: str, name: str) -> list[dict]:
    return [p for p in cluster.get("pods", "-n", ns, "-l", f"gang={name}")["items"]
            if not p["metadata"].get("deletionTimestamp")]


def running(cluster: Cluster, ns: str, name: str) -> list[dict]:
    return [p for p in pods_of(cluster, ns, name) if p["status"].get("phase") == "Running"]


def workload_of(cluster: Cluster, ns: str, job: str) -> dict | None:
    uid = cluster.get("job", job, "-n", ns)["metadata"]["uid"]
    for wl in cluster.get("workloads.kueue.x-k8s.io", "-n", ns)["items"]:
        if any(o["uid"] == uid for o in wl["metadata"].get("ownerReferences", [])):
            return wl
    return None


def condition(obj: dict | None, kind: str) -> dict:
    conds = (obj or {}).get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == kind), {})


def finish(cluster: Cluster, ns: str, pods: list[dict]) -> None:
    for pod in pods:
        cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", ns, "--overwrite",
                        "flywheel.dev/simulate-exit=0")


def test_second_whole_pool_job_waits_with_no_pods_then_runs(cluster, queued):
    ns, nodes = queued, h200_nodes(cluster)
    cluster.apply(gang_job("first", nodes), ns)
    wait_until(lambda: len(running(cluster, ns, "first")) == nodes, timeout=90,
               message="first job admitted and all its pods Running")
    cluster.apply(gang_job("second", nodes), ns)
    wl = wait_until(lambda: (w := workload_of(cluster, ns, "second"))
                    and condition(w, "QuotaReserved").get("status") == "False" and w,
                    message="the second job's Workload is pending")
    assert "insufficient unused quota" in condition(wl, "QuotaReserved")["message"]
    first = workload_of(cluster, ns, "first")
    assert condition(first, "Admitted")["status"] == "True"
    assert first["status"]["admission"]["podSetAssignments"][0]["flavors"] == {
        "nvidia.com/gpu": "h200"}
    # Queued means nothing of it exists on the nodes, not pods waiting Pending.
    assert cluster.get("job", "second", "-n", ns)["spec"]["suspend"] is True
    assert pods_of(cluster, ns, "second") == []

    finish(cluster, ns, running(cluster, ns, "first"))
    wait_until(lambda: len(running(cluster, ns, "second")) == nodes, timeout=90,
               message="second job admitted after the first finished")
    assert condition(workload_of(cluster, ns, "first"), "Finished")["status"] == "True"
    finish(cluster, ns, running(cluster, ns, "second"))
    cluster.kubectl("wait", "--for=condition=Complete", "job/second", "-n", ns,
                    "--timeout=60s")


def test_burst_larger_than_the_pool_never_half_places_a_gang(cluster, queued):
    """Five 2-node jobs on the 4-node pool: at most two run, the rest have no pods at all."""
    ns, nodes = queued, h200_nodes(cluster)
    names = [f"burst-{i}" for i in range(nodes + 1)]
    cluster.apply([gang_job(n, 2) for n in names], ns)
    done: set[str] = set()
    while len(done) < len(names):
        def admitted() -> list[str]:
            return [n for n in names if n not in done
                    and len(running(cluster, ns, n)) == 2]
        batch = wait_until(admitted, timeout=90, message="a gang running")
        for name in names:
            pods = pods_of(cluster, ns, name)
            suspended = cluster.get("job", name, "-n", ns)["spec"].get("suspend")
            # Never a part of a gang: a job not admitted has no pods at all.
            assert suspended is not True or not pods, (name, len(pods))
        assert len(batch) <= nodes // 2
        for name in batch:
            finish(cluster, ns, running(cluster, ns, name))
            cluster.kubectl("wait", "--for=condition=Complete", f"job/{name}", "-n", ns,
                            "--timeout=60s")
            done.add(name)
    # The scheduler never had to leave a pod of these jobs waiting for room.
    events = cluster.get("events", "-n", ns, "--field-selector", "reason=FailedScheduling")
    assert events["items"] == [], json.dumps(events["items"][:1])


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
    assert out.count("serverside-applied (server dry run)") == 8, out
