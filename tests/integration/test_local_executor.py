"""The local executor gives each pod its own address: several pods serve the same named
container port at once, reached at status.podIP + containerPort as on a real cluster."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.cluster

PORT = 9400
# The trainer's own progress server, in the stage given by argv[1], then idle.
SERVE = ("import sys, time; from flywheel_trainer import progress; progress.start(0, 1); "
         "progress.stage(sys.argv[1]); time.sleep(600)")


def progress_pod(name: str, stage: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"flywheel.dev/pool": "local"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            "containers": [{
                "name": "trainer", "image": "flywheel-trainer",
                "command": ["python", "-c", SERVE, stage],
                "env": [{"name": "FLYWHEEL_PROGRESS_PORT", "value": str(PORT)}],
                "ports": [{"name": "progress", "containerPort": PORT}],
            }],
        },
    }


def progress_of(pod: dict) -> dict | None:
    """What the operator does: the pod's IP and its `progress` container port."""
    ip = pod["status"].get("podIP")
    port = next(p["containerPort"] for c in pod["spec"]["containers"]
                for p in c.get("ports") or [] if p.get("name") == "progress")
    if not ip:
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/progress", timeout=2) as r:
            return json.load(r)
    except OSError:
        return None


def test_pods_serve_the_same_port_on_their_own_addresses(cluster, namespace):
    cluster.apply([progress_pod("a", "tokenizing"), progress_pod("b", "evaluating")], namespace)

    def served():
        pods = {p["metadata"]["name"]: p for p in cluster.get("pods", "-n", namespace)["items"]}
        docs = {n: progress_of(p) for n, p in pods.items()}
        return (pods, docs) if len(docs) == 2 and all(docs.values()) else None

    pods, docs = wait_until(served, timeout=90, interval=1, message="both pods serve progress")
    assert docs["a"]["stage"] == "tokenizing" and docs["b"]["stage"] == "evaluating"
    ips = {n: p["status"]["podIP"] for n, p in pods.items()}
    assert ips["a"] != ips["b"]
    assert all(p["status"]["podIPs"] == [{"ip": ips[n]}] for n, p in pods.items())


def test_a_missing_secret_is_the_kubelets_create_container_config_error(cluster, namespace):
    pod = progress_pod("needs-secret", "training")
    pod["spec"]["containers"][0]["env"].append(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}})
    cluster.apply(pod, namespace)

    def waiting():
        status = cluster.get("pod", "needs-secret", "-n", namespace)["status"]
        states = [cs["state"].get("waiting") for cs in status.get("containerStatuses") or []]
        return status["phase"] == "Pending" and states and states[0]

    state = wait_until(waiting, timeout=60, message="the container waits")
    assert state == {"reason": "CreateContainerConfigError",
                     "message": 'secret "absent" not found'}
    # like the kubelet, it tries again: once the Secret exists, the pod runs
    cluster.kubectl("create", "secret", "generic", "absent", "--from-literal=token=t",
                    "-n", namespace)
    wait_until(lambda: cluster.get("pod", "needs-secret", "-n", namespace)["status"]["phase"]
               == "Running", timeout=60, message="runs once the Secret exists")
