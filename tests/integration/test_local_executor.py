"""The local executor gives each pod its own address: several pods serve the same named
container port at once, reached at status.podIP + containerPort as on a real cluster. Like a
kubelet, it keeps each pod's status until the apiserver accepts it and resyncs after an
outage; and a pod evicted or deleted ends Failed (an eviction's DisruptionTarget kept) before
it goes, on the local pool as on kwok's fake pools, so the Job controller sees it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import urllib3

from hack.local_executor_status import StatusManager
from tests.conftest import ROOT, wait_until

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


def waiting(cluster, namespace: str, name: str) -> dict | None:
    """The pod's container waiting state while it is Pending (None otherwise)."""
    status = cluster.get("pod", name, "-n", namespace)["status"]
    states = [cs["state"].get("waiting") for cs in status.get("containerStatuses") or []]
    return states[0] if status["phase"] == "Pending" and states else None


def test_a_missing_secret_is_the_kubelets_create_container_config_error(cluster, namespace):
    pod = progress_pod("needs-secret", "training")
    pod["spec"]["containers"][0]["env"].append(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}})
    cluster.apply(pod, namespace)
    state = wait_until(lambda: waiting(cluster, namespace, "needs-secret"), timeout=60,
                       message="the container waits")
    assert state == {"reason": "CreateContainerConfigError",
                     "message": 'secret "absent" not found'}
    # like the kubelet, it tries again: once the Secret exists, the pod runs
    cluster.kubectl("create", "secret", "generic", "absent", "--from-literal=token=t",
                    "-n", namespace)
    wait_until(lambda: cluster.get("pod", "needs-secret", "-n", namespace)["status"]["phase"]
               == "Running", timeout=60, message="runs once the Secret exists")


def test_a_missing_config_map_volume_waits_in_container_creating(cluster, namespace):
    # A pod may reach its node before its ConfigMap exists (or after it was deleted): as a
    # kubelet, the executor keeps it ContainerCreating and mounts it once it exists.
    pod = progress_pod("needs-config", "training")
    pod["spec"]["volumes"] = [{"name": "config", "configMap": {"name": "later"}}]
    cluster.apply(pod, namespace)
    state = wait_until(lambda: waiting(cluster, namespace, "needs-config"), timeout=60,
                       message="the container waits for its volume")
    assert state == {"reason": "ContainerCreating", "message":
                     'MountVolume.SetUp failed for volume "config" : configmap "later" not found'}
    cluster.kubectl("create", "configmap", "later", "--from-literal=a=b", "-n", namespace)
    wait_until(lambda: cluster.get("pod", "needs-config", "-n", namespace)["status"]["phase"]
               == "Running", timeout=60, message="runs once the ConfigMap exists")


# --- the status manager: each pod's status kept and written until the apiserver accepts it ---


class FlakyApi:
    """Stands in for the apiserver: the first `failures` requests fail as an unreachable one
    does; the rest are accepted and recorded."""

    def __init__(self, failures: int = 0) -> None:
        self.failures, self.calls, self.accepted = failures, 0, []
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, body=None, content_type: str = "") -> dict:
        with self.lock:
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise urllib3.exceptions.MaxRetryError(None, path, "connection refused")
            self.accepted.append((method, path, body))
        return {}


POD = {"metadata": {"uid": "uid-1", "namespace": "ns", "name": "p"}}


def test_a_status_is_written_until_the_apiserver_accepts_it():
    api = FlakyApi(failures=3)
    status = StatusManager(log=lambda _: None, request=api).start()
    status.set(POD, {"phase": "Running", "podIP": "127.10.1.2"})
    wait_until(lambda: api.calls >= 1, message="a first, refused, write")
    status.set(POD, {"phase": "Succeeded"})  # the pod ends while the apiserver is away
    wait_until(status.idle, timeout=30, message="written at last")
    assert api.calls >= 4
    method, path, body = api.accepted[-1]
    assert (method, path) == ("PATCH", "/api/v1/namespaces/ns/pods/p/status")
    # the last status, on top of what was set before; the uid as a precondition
    assert body == {"metadata": {"uid": "uid-1"},
                    "status": {"phase": "Succeeded", "podIP": "127.10.1.2"}}


def test_a_deleted_pod_is_removed_only_once_its_terminal_status_is_in():
    api = FlakyApi()
    status = StatusManager(log=lambda _: None, request=api).start()
    status.set(POD, {"phase": "Running"})
    status.delete_when_terminal(POD)
    wait_until(status.idle, message="Running written")
    assert [m for m, _, _ in api.accepted] == ["PATCH"]  # still running: not removed
    status.set(POD, {"phase": "Failed"})
    wait_until(status.idle, message="Failed written, then the pod removed")
    assert [(m, b) for m, _, b in api.accepted[1:]] == [
        ("PATCH", {"metadata": {"uid": "uid-1"}, "status": {"phase": "Failed"}}),
        ("DELETE", {"gracePeriodSeconds": 0, "preconditions": {"uid": "uid-1"}})]
    status.set(POD, {"phase": "Running"})  # never out of a terminal phase
    assert status.desired("uid-1")["phase"] == "Failed"


def test_a_resync_writes_again_what_the_apiserver_does_not_show():
    api = FlakyApi()
    status = StatusManager(log=lambda _: None, request=api).start()
    running = {"phase": "Running", "podIP": "127.10.1.2", "containerStatuses": [
        {"name": "main", "state": {"running": {"startedAt": "t"}, "terminated": None}}]}
    status.set(POD, running)
    wait_until(status.idle, message="written")
    assert not status.resync({**POD, "status": running})
    lost = {**running, "containerStatuses": [{"name": "main", "state": {"waiting": {}}}]}
    assert status.resync({**POD, "status": lost})
    wait_until(status.idle, message="written again")
    assert len(api.accepted) == 2 and api.accepted[1][2]["status"] == running


# --- an executor of its own, its apiserver connection cut and restored by the test ---


class Cuttable(threading.Thread):
    """A TCP proxy to the apiserver: `cut()` drops every connection and refuses new ones (as a
    dead apiserver does), `restore()` lets them through again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.upstream, self.up, self.conns = upstream, True, set()
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.start()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                if not self.up:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)  # watches are quiet for minutes
                self.conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self.drop(s)

    def drop(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
        with self.lock:
            self.conns.discard(s)

    def cut(self) -> None:
        with self.lock:
            self.up = False
            conns = list(self.conns)
        for s in conns:
            self.drop(s)

    def restore(self) -> None:
        with self.lock:
            self.up = True


@dataclass
class OwnExecutor:
    node: str
    proxy: Cuttable
    log: Path

    def said(self, text: str) -> bool:  # in its log
        return text in self.log.read_text()


@pytest.fixture(scope="module")
def own_executor(cluster, tmp_path_factory):
    """hack/local_executor.py for a node of its own (no other executor runs its pods),
    reaching the apiserver through a Cuttable proxy."""
    tag = f"t-{uuid.uuid4().hex[:8]}"
    node = f"executor-{tag}"
    cluster.apply({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node, "labels": {"flywheel.dev/executor": tag}}})
    config = json.loads(Path(cluster.kubeconfig).read_text())
    server = urllib.parse.urlsplit(config["clusters"][0]["cluster"]["server"])
    proxy = Cuttable((server.hostname, server.port))
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    work = tmp_path_factory.mktemp("executor")
    (work / "kubeconfig").write_text(json.dumps(config))
    own = OwnExecutor(node, proxy, work / "executor.log")
    with open(own.log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "hack" / "local_executor.py"), str(work / "kubeconfig"),
             f"flywheel.dev/executor={tag}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        wait_until(lambda: own.said(f"executing pods on nodes ['{node}']")
                   or proc.poll() is not None, timeout=60, message="the executor runs")
        assert proc.poll() is None, own.log.read_text()
        yield own
    finally:
        proxy.restore()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)


# Writes its pid, runs until a file `release` appears in its working folder, exits argv[1].
HELD = ("import os, pathlib, sys, time; pathlib.Path('pid').write_text(str(os.getpid()))\n"
        "while not pathlib.Path('release').exists(): time.sleep(0.1)\n"
        "sys.exit(int(sys.argv[1]))")


def held_pod(name: str, node: str, code: int = 0) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "nodeName": node, "restartPolicy": "Never", "tolerations": [{"operator": "Exists"}],
        "containers": [{"name": "main", "image": "none",
                        "command": ["python", "-c", HELD, str(code)]}]}}


def workdir(namespace: str, name: str) -> Path:
    return ROOT / ".cache" / "executor" / namespace / name


def phase(cluster, namespace: str, name: str) -> str:
    return cluster.get("pod", name, "-n", namespace)["status"].get("phase")


def test_an_exit_during_an_apiserver_outage_is_reported_once_it_is_back(
        cluster, namespace, own_executor):
    cluster.apply(held_pod("quits", own_executor.node), namespace)
    wait_until(lambda: phase(cluster, namespace, "quits") == "Running", timeout=60,
               message="the pod runs")
    ip = cluster.get("pod", "quits", "-n", namespace)["status"]["podIP"]
    own_executor.proxy.cut()
    (workdir(namespace, "quits") / "release").touch()
    wait_until(lambda: own_executor.said(f"write {namespace}/quits failed"), timeout=60,
               message="the executor tries to report the exit")
    assert phase(cluster, namespace, "quits") == "Running"  # the apiserver has not heard
    own_executor.proxy.restore()
    wait_until(lambda: phase(cluster, namespace, "quits") == "Succeeded", timeout=60,
               message="the exit is reported once the apiserver is reachable")
    status = cluster.get("pod", "quits", "-n", namespace)["status"]
    assert status["podIP"] == ip
    (container,) = status["containerStatuses"]
    assert container["state"]["terminated"]["exitCode"] == 0
    assert set(container["state"]) == {"terminated"}


def test_a_pod_deleted_during_an_apiserver_outage_is_killed_once_it_is_back(
        cluster, namespace, own_executor):
    cluster.apply(held_pod("held", own_executor.node), namespace)
    wait_until(lambda: phase(cluster, namespace, "held") == "Running", timeout=60,
               message="the pod runs")
    pid = int((workdir(namespace, "held") / "pid").read_text())
    own_executor.proxy.cut()
    cluster.kubectl("delete", "pod", "held", "-n", namespace, "--grace-period=0", "--force")
    assert alive(pid)  # the executor cannot know yet
    own_executor.proxy.restore()
    wait_until(lambda: not alive(pid), timeout=60,
               message="the executor lists again after reconnecting and kills the process")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- evicted and deleted pods end Failed before they go, on every pool ---

# The operator's rule for its attempts' Jobs: a disrupted pod fails the Job at once.
DISRUPTION_POLICY = {"rules": [{"action": "FailJob", "onPodConditions": [
    {"type": "DisruptionTarget", "status": "True"}]}]}
SLEEP = "import time; time.sleep(600)"


def one_pod_job(name: str, pool: str) -> dict:
    """An attempt's shape: Indexed, backoffLimit 0, the operator's podFailurePolicy."""
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
        "completions": 1, "parallelism": 1, "completionMode": "Indexed", "backoffLimit": 0,
        "podFailurePolicy": DISRUPTION_POLICY,
        "template": {"spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
            "nodeSelector": {"flywheel.dev/pool": pool},
            "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "main", "image": "none",
                            "command": ["python", "-c", SLEEP]}]}}}}


class PodHistory(threading.Thread):
    """Every state of the pods of a namespace, in order (a watch from a listing)."""

    def __init__(self, cluster, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace = cluster.api_client(), namespace
        self.seen: list[tuple[str, dict]] = []  # (event type, pod)
        self.listed = threading.Event()
        self.start()
        self.listed.wait(30)

    def request(self, path: str, **query):
        _, url, headers, _, _ = self.api.param_serialize(
            "GET", path, query_params=list(query.items()), auth_settings=["BearerToken"])
        return self.api.call_api("GET", url, header_params=headers,
                                 _request_timeout=(5, 600))

    def run(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        path = f"/api/v1/namespaces/{self.namespace}/pods"
        listing = self.request(path)
        listing.read()
        version = json.loads(listing.data)["metadata"]["resourceVersion"]
        self.listed.set()
        watch = self.request(path, watch="true", resourceVersion=version)
        for line in iter_resp_lines(watch.response):
            if line:
                event = json.loads(line)
                self.seen.append((event["type"], event["object"]))

    def of(self, name: str) -> list[tuple[str, dict]]:
        return [(t, p) for t, p in self.seen if p["metadata"]["name"] == name]

    def names(self) -> set[str]:
        return {p["metadata"]["name"] for _, p in self.seen}


def running_pod(history: PodHistory) -> str:
    return wait_until(lambda: next((p["metadata"]["name"] for _, p in history.seen
                                    if p["status"].get("phase") == "Running"), None),
                      timeout=90, interval=0.5, message="the Job's pod runs")


def evict(cluster, namespace: str, name: str) -> None:
    """What `kubectl drain` does to each pod of the node: the Eviction API."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace}}
    cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction",
                    "-f", "-", input=json.dumps(body))


def job_failed(cluster, namespace: str, name: str) -> dict | None:
    conditions = cluster.get("job", name, "-n", namespace).get("status", {}).get("conditions")
    return next((c for c in conditions or [] if c["type"] == "Failed" and c["status"] == "True"),
                None)


@pytest.mark.parametrize("pool", ["local", "h200", "cpu"])
@pytest.mark.parametrize("how", ["evict", "delete", "force-delete"])
def test_an_evicted_or_deleted_pod_ends_failed_before_it_goes(cluster, namespace, pool, how):
    history = PodHistory(cluster, namespace)
    cluster.apply(one_pod_job("gang", pool), namespace)
    pod = running_pod(history)
    if how == "evict":
        evict(cluster, namespace, pod)
    else:
        cluster.kubectl("delete", "pod", pod, "-n", namespace, "--wait=false",
                        *(["--grace-period=0", "--force"] if how == "force-delete" else []))
    wait_until(lambda: any(t == "DELETED" for t, _ in history.of(pod)), timeout=60,
               message="the pod goes")
    states = history.of(pod)
    failed = [p for t, p in states if p["status"].get("phase") == "Failed"]
    assert failed, [(t, p["status"].get("phase")) for t, p in states]
    last = failed[-1]
    assert last["metadata"].get("deletionTimestamp")
    (container,) = last["status"]["containerStatuses"]
    assert container["state"]["terminated"]["exitCode"] != 0
    disruption = [c for c in last["status"].get("conditions") or []
                  if c["type"] == "DisruptionTarget"]
    if how == "evict":  # the apiserver's condition, kept through the kubelet's status writes
        assert [(c["status"], c["reason"]) for c in disruption] == [
            ("True", "EvictionByEvictionAPI")]
    else:
        assert not disruption
    # Failed, the Job controller counts it: the Job fails (the disruption rule, or the
    # backoff limit of 0) and no replacement pod is made for the index.
    reason = wait_until(lambda: (job_failed(cluster, namespace, "gang") or {}).get("reason"),
                        timeout=60, message="the Job fails")
    assert reason == ("PodFailurePolicy" if how == "evict" else "BackoffLimitExceeded")
    assert history.names() == {pod}
