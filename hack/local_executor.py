"""The local executor: a kubelet for the `local` node pool that really runs pods as processes.

Pods scheduled to nodes labelled `flywheel.dev/executor=local` are executed on this machine:
the container's own command, args and env (with `$(VAR)` expansion, fieldRef, secretKeyRef
and configMapKeyRef resolved like the kubelet does), with ConfigMap volumes and emptyDirs
materialised as local folders and every mount path in command, args and env pointed at them.
The only other substitution is name resolution: the pod's stable DNS names (hostname +
subdomain, as rank 0's rendezvous address) resolve to loopback via /etc/hosts entries that
the executor adds and removes. Running, the exit code and the termination message are
reported through the Pod status, as a kubelet would. Deleting a pod kills its process group.

Development and tests only; started by `hack/cluster.py up` with the other components.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kubernetes
from flywheel_operator import kube
from flywheel_operator.vocab import EXECUTOR_LABEL, format_time
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "executor"
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# flywheel-local-executor"
NODE_LABEL = f"{EXECUTOR_LABEL}=local"

_hosts_lock = threading.Lock()


def now() -> str:
    return format_time()


def log(msg: str) -> None:
    print(f"{now()} executor: {msg}", flush=True)


class Executor:
    def __init__(self) -> None:
        self.core = kubernetes.client.CoreV1Api(kube.client())
        self.procs: dict[str, subprocess.Popen | None] = {}  # pod uid -> process (None: starting)
        self.lock = threading.Lock()

    # --- Kubernetes I/O: the operator's own REST helpers (flywheel_operator.kube) ---
    def patch_status(self, pod: dict, status: dict) -> None:
        md = pod["metadata"]
        kube.patch("v1", "Pod", md["namespace"], md["name"], {"status": status}, "status")

    def resolve_env(self, pod: dict, container: dict) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            if "configMapRef" in src:
                cm = kube.request("GET", kube.object_path(
                    "v1", "ConfigMap", ns, src["configMapRef"]["name"]))
                env.update(cm.get("data") or {})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
                continue
            ref = var.get("valueFrom") or {}
            if "fieldRef" in ref:
                env[var["name"]] = field_ref(pod, ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref:
                env[var["name"]] = self.key_ref("secrets", ns, ref["secretKeyRef"], secret=True)
            elif "configMapKeyRef" in ref:
                env[var["name"]] = self.key_ref("configmaps", ns, ref["configMapKeyRef"])
        return {k: v for k, v in env.items() if v is not None}

    def key_ref(self, plural: str, ns: str, ref: dict, secret: bool = False) -> str | None:
        try:  # secrets: the executor's own read (the operator never reads secrets)
            obj = kube.request("GET", f"{kube.collection_path('v1', plural, ns)}/{ref['name']}")
        except (kube.NotFound, ApiException):
            if ref.get("optional"):
                return None
            raise
        if secret:
            import base64

            raw = (obj.get("data") or {}).get(ref["key"])
            return base64.b64decode(raw).decode() if raw is not None else None
        return (obj.get("data") or {}).get(ref["key"])

    # --- pod lifecycle ---
    def start(self, pod: dict) -> None:
        md, spec = pod["metadata"], pod["spec"]
        uid = md["uid"]
        workdir = WORK / md["namespace"] / md["name"]
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        container = spec["containers"][0]
        volumes = self.materialise_volumes(pod, workdir)
        mounts = {m["mountPath"]: volumes[m["name"]]
                  for m in container.get("volumeMounts") or [] if m["name"] in volumes}
        term_path = container.get("terminationMessagePath", "/dev/termination-log")
        term_file = workdir / "termination-log"
        mounts[term_path] = term_file
        env = self.resolve_env(pod, container)
        env = {k: remap(v, mounts) for k, v in env.items()}
        argv = [remap(expand(a, env), mounts)
                for a in (container.get("command") or []) + (container.get("args") or [])]
        # Every pod here shares the host's loopback: a port a previous attempt's rank 0 still
        # holds (it is being torn down) would be in use. On a real node it is a fresh netns.
        port = next((int(m.group(1)) for a in argv
                     if (m := re.fullmatch(r"--master[-_]port=(\d+)", a))), None)
        if port and any(re.fullmatch(r"--node[-_]rank=0", a) for a in argv):
            wait_port_free(port)
        hostnames = dns_names(pod)
        self.add_hosts(uid, hostnames)
        full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "HOSTNAME": spec.get("hostname", md["name"]), **env}
        log(f"start {md['namespace']}/{md['name']}: {' '.join(argv)}")
        with open(workdir / "output.log", "wb") as out:
            proc = subprocess.Popen(argv, env=full_env, cwd=workdir, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        with self.lock:
            if uid not in self.procs:  # deleted while starting
                os.killpg(proc.pid, signal.SIGKILL)
                return
            self.procs[uid] = proc
        started = now()
        self.patch_status(pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}], "startTime": started,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("Initialized", "Ready", "ContainersReady")],
            "containerStatuses": [{"name": container["name"], "image": container["image"],
                                   "ready": True, "restartCount": 0, "started": True,
                                   "state": {"running": {"startedAt": started}}}],
        })
        threading.Thread(target=self.wait, args=(pod, proc, term_file, started),
                         daemon=True).start()

    def wait(self, pod: dict, proc: subprocess.Popen, term_file: Path, started: str) -> None:
        code = proc.wait()
        self.remove_hosts(pod["metadata"]["uid"])
        message = term_file.read_bytes()[:4096].decode(errors="replace") if (
            term_file.exists()) else ""
        if code < 0:  # killed by a signal: report it the way a container runtime does
            code = 128 - code
        log(f"exit {pod['metadata']['namespace']}/{pod['metadata']['name']}: {code}")
        finished = now()
        container = pod["spec"]["containers"][0]
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": started, "finishedAt": finished}
        if message:
            terminated["message"] = message
        self.patch_status(pod, {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": t, "status": "False", "lastTransitionTime": finished}
                           for t in ("Ready", "ContainersReady")],
            "containerStatuses": [{"name": container["name"], "image": container["image"],
                                   "ready": False, "restartCount": 0, "started": False,
                                   "state": {"terminated": terminated}}],
        })

    def stop(self, pod: dict) -> None:
        """The pod is being deleted: stop its processes, then let the deletion finish."""
        md = pod["metadata"]
        with self.lock:
            proc = self.procs.pop(md["uid"], None)
        if proc and proc.poll() is None:
            grace = (pod["spec"].get("terminationGracePeriodSeconds") or 30)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=min(grace, 10))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.remove_hosts(md["uid"])
        try:
            kube.request("DELETE", kube.object_path("v1", "Pod", md["namespace"], md["name"]),
                         {"gracePeriodSeconds": 0, "preconditions": {"uid": md["uid"]}})
        except kube.NotFound:
            pass
        except ApiException as err:
            if err.status != 409:  # 409: the uid precondition failed, it is another pod now
                raise

    def materialise_volumes(self, pod: dict, workdir: Path) -> dict[str, Path]:
        ns = pod["metadata"]["namespace"]
        paths = {}
        for vol in pod["spec"].get("volumes") or []:
            path = workdir / "volumes" / vol["name"]
            path.mkdir(parents=True)
            if "configMap" in vol:
                cm = kube.request("GET", kube.object_path(
                    "v1", "ConfigMap", ns, vol["configMap"]["name"]))
                data = cm.get("data") or {}
                items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    target = path / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
            paths[vol["name"]] = path
        return paths

    # --- /etc/hosts: the pod's stable DNS names resolve to loopback ---
    def add_hosts(self, uid: str, names: list[str]) -> None:
        with _hosts_lock:
            lines = HOSTS.read_text().splitlines()
            lines.append(f"127.0.0.1 {' '.join(names)} {HOSTS_MARK} {uid}")
            HOSTS.write_text("\n".join(lines) + "\n")

    def remove_hosts(self, uid: str | None = None) -> None:
        with _hosts_lock:
            lines = HOSTS.read_text().splitlines()
            keep = [ln for ln in lines if HOSTS_MARK not in ln
                    or (uid is not None and not ln.endswith(f"{HOSTS_MARK} {uid}"))]
            if keep != lines:
                HOSTS.write_text("\n".join(keep) + "\n")

    # --- the loop ---
    def run(self) -> None:
        self.remove_hosts()
        nodes = [n.metadata.name for n in self.core.list_node(label_selector=NODE_LABEL).items]
        log(f"executing pods on nodes {nodes}")
        while True:
            watch = kubernetes.watch.Watch()
            try:
                for event in watch.stream(self.core.list_pod_for_all_namespaces,
                                          timeout_seconds=300, _preload_content=False):
                    pod = event["raw_object"]
                    if pod["spec"].get("nodeName") not in nodes:
                        continue
                    self.handle(event["type"], pod)
            except Exception as err:  # a dropped watch: log and re-list
                log(f"watch error: {err!r}")
                time.sleep(1)

    def handle(self, type_: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if type_ == "DELETED":
            with self.lock:
                proc = self.procs.pop(uid, None)
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            return
        if pod["metadata"].get("deletionTimestamp"):
            threading.Thread(target=self.stop, args=(pod,), daemon=True).start()
            return
        with self.lock:
            if pod["status"].get("phase", "Pending") != "Pending" or uid in self.procs:
                return
            self.procs[uid] = None
        threading.Thread(target=self.start_logged, args=(pod,), daemon=True).start()

    def start_logged(self, pod: dict) -> None:
        try:
            self.start(pod)
        except Exception as err:  # report it on the pod, as a kubelet would
            log(f"cannot start {pod['metadata']['name']}: {err!r}")
            self.patch_status(pod, {"phase": "Failed", "reason": "ExecutorError",
                                    "message": str(err)[:1024]})


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known vars are replaced, `$$(VAR)` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  value)


def remap(value: str, mounts: dict[str, Path]) -> str:
    """Point container paths under a mount at the mount's local folder."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if mount_path in ("/dev/shm",):
            continue
        value = value.replace(mount_path, str(mounts[mount_path]))
    return value


def field_ref(pod: dict, path: str) -> str:
    md = pod["metadata"]
    match = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
    if match:
        return (md.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {"metadata.name": md["name"], "metadata.namespace": md["namespace"],
              "metadata.uid": md["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
    return simple.get(path, "")


def wait_port_free(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.5)


def dns_names(pod: dict) -> list[str]:
    md, spec = pod["metadata"], pod["spec"]
    hostname = spec.get("hostname") or md["name"]
    names = [hostname]
    if spec.get("subdomain"):
        base = f"{hostname}.{spec['subdomain']}.{md['namespace']}.svc"
        names += [base, f"{base}.cluster.local"]
    return names


if __name__ == "__main__":
    if len(sys.argv) > 1:
        os.environ["KUBECONFIG"] = sys.argv[1]
    Executor().run()
