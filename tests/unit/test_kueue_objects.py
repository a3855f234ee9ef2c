"""The local cluster's Kueue objects (hack/kueue/objects.py), without a cluster."""

from __future__ import annotations

import yaml

from hack import cluster
from hack.kueue import objects


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def quotas(cq: dict) -> dict[str, str]:
    (group,) = cq["spec"]["resourceGroups"]
    (flavor,) = group["flavors"]
    return {r["name"]: r["nominalQuota"] for r in flavor["resources"]}


def test_each_pool_has_a_flavor_and_a_cluster_queue_whose_quota_is_the_pool(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_H200_NODES", "3")
    monkeypatch.setenv("FLYWHEEL_LOCAL_NODES", "2")
    docs = objects.admin(cluster.pool_nodes())
    flavors, cqs = by_kind(docs, "ResourceFlavor"), by_kind(docs, "ClusterQueue")
    assert flavors["h200"]["spec"]["nodeLabels"] == {"flywheel.dev/pool": "h200"}
    assert flavors["local"]["spec"]["nodeLabels"] == {"flywheel.dev/executor": "local"}
    assert quotas(cqs["h200"]) == {"nvidia.com/gpu": "24", "cpu": "576", "memory": "6000Gi"}
    assert quotas(cqs["local"]) == {"nvidia.com/gpu": "4", "cpu": "32", "memory": "128Gi"}
    for name, cq in cqs.items():
        assert cq["spec"]["resourceGroups"][0]["flavors"][0]["name"] == name
        assert cq["spec"]["preemption"]["withinClusterQueue"] == "LowerPriority"
    priorities = by_kind(docs, "WorkloadPriorityClass")
    assert priorities["high"]["value"] > priorities["low"]["value"]


def test_a_pool_without_nodes_gets_no_quota(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_LOCAL_NODES", "0")
    cqs = by_kind(objects.admin(cluster.pool_nodes()), "ClusterQueue")
    assert quotas(cqs["local"])["nvidia.com/gpu"] == "0"


def test_local_queues_land_in_the_namespace_and_point_at_existing_cluster_queues():
    cqs = by_kind(objects.admin(cluster.pool_nodes()), "ClusterQueue")
    queues = objects.local_queues("team-x")
    assert {q["metadata"]["name"]: q["spec"]["clusterQueue"] for q in queues} == {
        "h200": "h200", "local": "local"}
    assert all(q["metadata"]["namespace"] == "team-x" for q in queues)
    assert all(q["spec"]["clusterQueue"] in cqs for q in queues)


def test_configuration_is_out_of_cluster_with_all_or_nothing_admission(tmp_path):
    config = objects.config(tmp_path / "certs", 17443, "127.0.0.1:17281")
    assert config["leaderElection"] == {"leaderElect": False}
    assert config["webhook"] == {"host": "127.0.0.1", "port": 17443,
                                 "certDir": str(tmp_path / "certs")}
    assert config["waitForPodsReady"]["blockAdmission"] is True
    assert config["integrations"] == {"frameworks": ["batch/job"]}
    assert config["manageJobsWithoutQueueName"] is False


def test_crds_convert_through_the_webhook_url(tmp_path):
    bases = tmp_path / "config" / "components" / "crd" / "bases"
    bases.mkdir(parents=True)
    for plural in ("workloads", "resourceflavors"):
        (bases / f"kueue.x-k8s.io_{plural}.yaml").write_text(yaml.safe_dump({
            "kind": "CustomResourceDefinition", "metadata": {"name": f"{plural}.kueue.x-k8s.io"},
            "spec": {"names": {"plural": plural}}}))
    crds = {c["spec"]["names"]["plural"]: c
            for c in objects.crds(tmp_path, "Q0E=", "https://127.0.0.1:17443")}
    assert crds["workloads"]["spec"]["conversion"]["webhook"]["clientConfig"] == {
        "url": "https://127.0.0.1:17443/convert", "caBundle": "Q0E="}
    assert "conversion" not in crds["resourceflavors"]["spec"]
