"""The local executor runs a serving pod as a kubelet does: init containers first, each to
exit 0, sharing the pod's emptyDir with the server; a failed one restarted with back-off, the
pod Pending (`Init:CrashLoopBackOff`) and its termination message on the pod; the server Ready
only once its readiness probe answers."""

from __future__ import annotations

import socket
import sys
import urllib.request

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.cluster

#: The main container: a static file server on the pod's address, from its workingDir.
SERVER = [sys.executable, "-m", "http.server", "--bind", "$(POD_IP)", "$(PORT)"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_pod(name: str, init_script: str, port: int) -> dict:
    volume = [{"name": "models", "mountPath": "/models"}]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"flywheel.dev/pool": "local"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            "initContainers": [{
                "name": "fetch", "image": "flywheel-trainer",
                "command": [sys.executable, "-c", init_script, "/models/current"],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": volume}],
            "containers": [{
                "name": "server", "image": "server", "command": SERVER,
                "workingDir": "/models/current",
                "env": [{"name": "PORT", "value": str(port)},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {
                            "fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": port}],
                "readinessProbe": {"httpGet": {"path": "/weights.txt", "port": "http"}},
                "volumeMounts": volume}],
            "volumes": [{"name": "models", "emptyDir": {}}],
        },
    }


def test_init_container_fills_the_volume_and_the_server_is_ready_once_it_answers(
        cluster, namespace):
    port = free_port()
    # Slow to write: the server starts only after the init container has exited 0.
    fetch = ("import os, sys, time; time.sleep(2); os.makedirs(sys.argv[1]); "
             "open(os.path.join(sys.argv[1], 'weights.txt'), 'w').write('v1')")
    cluster.apply(serving_pod("server", fetch, port), namespace)

    def ready():
        pod = cluster.get("pod", "server", "-n", namespace)
        conds = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
        return pod if conds.get("Ready") == "True" else None

    pod = wait_until(ready, timeout=90, interval=0.5, message="the server pod is Ready")
    init = pod["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["reason"] == "Completed", init
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{port}/weights.txt",
                                timeout=5) as r:
        assert r.read() == b"v1"  # what the init container wrote, served from workingDir


def test_a_failing_init_container_is_restarted_and_the_server_never_starts(cluster, namespace):
    refuse = ("import sys; sys.stderr.write('model.safetensors: the first file that differs"
              "\\n'); sys.exit(1)")
    cluster.apply(serving_pod("refused", refuse, free_port()), namespace)

    def backing_off():
        status = cluster.get("pod", "refused", "-n", namespace)["status"]
        init = (status.get("initContainerStatuses") or [{}])[0]
        waiting = (init.get("state") or {}).get("waiting") or {}
        return (status, init) if waiting.get("reason") == "CrashLoopBackOff" else None

    status, init = wait_until(backing_off, timeout=60, interval=0.5,
                              message="the init container backs off")
    assert status["phase"] == "Pending"
    assert init["restartCount"] >= 1
    last = init["lastState"]["terminated"]
    assert last["exitCode"] == 1
    assert "model.safetensors: the first file that differs" in last["message"]
    main = status["containerStatuses"][0]
    assert main["state"]["waiting"]["reason"] == "PodInitializing" and not main["ready"]
    shown = cluster.kubectl("get", "pod", "refused", "-n", namespace, "--no-headers").stdout
    assert "Init:CrashLoopBackOff" in shown, shown
