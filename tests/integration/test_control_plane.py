"""The local control plane is real: its controllers, scheduler, RBAC and kwok stages work."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT, Cluster, wait_until

pytestmark = pytest.mark.cluster

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def pod(name: str, gpus: int = 0, tolerate: bool = False, annotations: dict | None = None):
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "containers": [{"name": "main", "image": "busybox", "resources": resources}],
            "tolerations": [GPU_TOLERATION] if tolerate else [],
        },
    }


def phase(cluster: Cluster, ns: str, name: str) -> str:
    return cluster.get("pod", name, "-n", ns).get("status", {}).get("phase", "")


def pod_scheduled_condition(cluster: Cluster, ns: str, name: str) -> dict | None:
    conditions = cluster.get("pod", name, "-n", ns).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "PodScheduled"), None)


def test_h200_pool_nodes_are_ready_with_eight_gpus(cluster):
    nodes = cluster.get("nodes", "-l", "flywheel.dev/pool=h200")["items"]
    assert len(nodes) == 4
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in (
            node["spec"]["taints"]
        )
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
    assert len(cluster.get("nodes", "-l", "flywheel.dev/pool=cpu")["items"]) == 2


def test_server_reports_a_real_version(cluster):
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert version["gitVersion"].startswith("v1.37.")
    assert (version["major"], version["minor"]) == ("1", "37")


def test_anonymous_requests_are_refused(cluster):
    ctx = ssl.create_default_context(cafile=str(ROOT / ".cache/cluster/pki/ca.crt"))
    # The server answers an authenticated client...
    assert json.loads(cluster.kubectl("get", "--raw", "/api").stdout)["kind"] == "APIVersions"
    url = cluster.kubectl("config", "view", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/api/v1/namespaces/default/pods", context=ctx, timeout=5)
    assert err.value.code in (401, 403)


def test_job_controller_creates_pods(cluster, namespace):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello"},
        "spec": {
            "completions": 3, "parallelism": 3, "completionMode": "Indexed",
            "template": {"spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"flywheel.dev/pool": "cpu"},
                "containers": [{"name": "main", "image": "busybox"}],
            }},
        },
    }
    cluster.apply(job, namespace)

    def running_pods():
        pods = cluster.get("pods", "-n", namespace, "-l", "job-name=hello")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running if len(running) == 3 else None

    pods = wait_until(running_pods, message="3 Running job pods")
    assert {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
            for p in pods} == {"0", "1", "2"}
    assert all(p["spec"]["nodeName"].startswith("cpu-") for p in pods)


def test_gpu_pods_land_on_h200_only_when_they_tolerate_the_taint(cluster, namespace):
    cluster.apply([pod("tolerating", gpus=8, tolerate=True), pod("intolerant", gpus=1),
                   pod("plain")], namespace)
    wait_until(lambda: phase(cluster, namespace, "tolerating") == "Running")
    assert cluster.get("pod", "tolerating", "-n", namespace)["spec"]["nodeName"].startswith(
        "h200-"
    )
    wait_until(lambda: phase(cluster, namespace, "plain") == "Running")
    assert cluster.get("pod", "plain", "-n", namespace)["spec"]["nodeName"].startswith("cpu-")

    cond = wait_until(lambda: pod_scheduled_condition(cluster, namespace, "intolerant"))
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    assert "untolerated taint" in cond["message"]
    assert phase(cluster, namespace, "intolerant") == "Pending"


def test_gpu_capacity_is_enforced(cluster, namespace):
    cluster.apply(pod("greedy", gpus=9, tolerate=True), namespace)
    cond = wait_until(lambda: pod_scheduled_condition(cluster, namespace, "greedy"))
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert phase(cluster, namespace, "greedy") == "Pending"


def test_deleting_an_owner_garbage_collects_its_children(cluster, namespace):
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner = cluster.get("configmap", "owner", "-n", namespace)
    child = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "child", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner["metadata"]["uid"]}]},
    }
    cluster.apply(child, namespace)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)

    def child_gone():
        res = cluster.kubectl("get", "configmap", "child", "-n", namespace, check=False)
        return res.returncode != 0 and "NotFound" in res.stderr

    wait_until(child_gone, message="garbage collector deletes the child")


def test_rbac_denies_a_service_account_without_a_role(cluster, namespace):
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = cluster.kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()
    res = cluster.kubectl_as(token, "get", "pods", "-n", namespace)
    assert res.returncode != 0
    assert "forbidden" in res.stderr.lower()
    assert f"system:serviceaccount:{namespace}:nobody" in res.stderr

    # The same token works once a Role grants it (so the denial above is RBAC, not auth).
    cluster.kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods",
                    "-n", namespace)
    cluster.kubectl("create", "rolebinding", "nobody-reads", "--role=pod-reader",
                    f"--serviceaccount={namespace}:nobody", "-n", namespace)
    wait_until(lambda: cluster.kubectl_as(token, "get", "pods", "-n", namespace).returncode == 0)


def test_simulate_exit_drives_pods_to_succeeded_and_failed(cluster, namespace):
    cluster.apply([
        pod("ok", annotations={"flywheel.dev/simulate-exit": "0"}),
        pod("boom", annotations={"flywheel.dev/simulate-exit": "3",
                                 "flywheel.dev/simulate-message": '{"error": "disk full"}'}),
        pod("forever"),
    ], namespace)
    wait_until(lambda: phase(cluster, namespace, "ok") == "Succeeded")
    wait_until(lambda: phase(cluster, namespace, "boom") == "Failed")

    ok = cluster.get("pod", "ok", "-n", namespace)["status"]["containerStatuses"][0]
    assert ok["state"]["terminated"]["exitCode"] == 0
    boom = cluster.get("pod", "boom", "-n", namespace)["status"]["containerStatuses"][0]
    terminated = boom["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["message"] == '{"error": "disk full"}'
    assert phase(cluster, namespace, "forever") == "Running"
