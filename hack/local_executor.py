"""The local executor: a kubelet for the `local` node pool that really runs pods as processes.

Pods scheduled to nodes labelled `flywheel.dev/executor=local` are executed on this machine:
the container's own command, args and env (with `$(VAR)` expansion, fieldRef, secretKeyRef
and configMapKeyRef resolved like the kubelet does), with ConfigMap volumes and emptyDirs
materialised as local folders (a PersistentVolumeClaim as .cache/pvc/<namespace>/<claim>, so
runs in a namespace share their claims) and every mount path in command, args and env
pointed at them. The only other substitution is the network: each pod gets its own loopback
address (127.10.x.y) as `status.podIP`, and its stable DNS names (hostname + subdomain, as
rank 0's rendezvous address) resolve to it via /etc/hosts entries that the executor adds and
removes. Servers in the pod that bind `$FLYWHEEL_BIND_HOST` (the trainer's progress endpoint)
listen on the pod's own address, so several pods serve the same container port at once, and a
client reaches them at podIP:containerPort exactly as on a real cluster. Running, the exit
code and the termination message are reported through the Pod status, as a kubelet would.
Deleting a pod kills its process group.

Test hook: `.cache/executor/env/<namespace>.json` ({"NAME": "value"}), when it exists, adds
environment variables to every pod of that namespace (e.g. the trainer's
FLYWHEEL_DEBUG_STOP_AT_STEP for the hang test).

Development and tests only; started by `hack/cluster.py up` with the other components.
"""

from __future__ import annotations

import json
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
PVC = ROOT / ".cache" / "pvc"  # claim C of namespace N is the folder .cache/pvc/N/C
#: Storage credentials reach a pod only through its own spec (Secret refs), as on a real node.
HOST_ONLY_ENV = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS")
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
        self.ips: dict[str, str] = {}  # pod uid -> its loopback address
        self.next_ip = 0

    # --- Kubernetes I/O: the operator's own REST helpers (flywheel_operator.kube) ---
    def patch_status(self, pod: dict, status: dict) -> None:
        md = pod["metadata"]
        kube.patch("v1", "Pod", md["namespace"], md["name"], {"status": status}, "status")

    def resolve_env(self, pod: dict, container: dict) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        pod_ip = self.ips.get(pod["metadata"]["uid"], "127.0.0.1")
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            if "configMapRef" in src:
                ref = src["configMapRef"]
                try:
                    cm = kube.request("GET", kube.object_path("v1", "ConfigMap", ns, ref["name"]))
                except kube.NotFound:
                    if ref.get("optional"):
                        continue
                    raise ContainerConfigError(f'configmap "{ref["name"]}" not found') from None
                env.update(cm.get("data") or {})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
                continue
            ref = var.get("valueFrom") or {}
            if "fieldRef" in ref:
                env[var["name"]] = field_ref(pod, ref["fieldRef"]["fieldPath"], pod_ip)
            elif "secretKeyRef" in ref:
                env[var["name"]] = self.key_ref("secrets", ns, ref["secretKeyRef"], secret=True)
            elif "configMapKeyRef" in ref:
                env[var["name"]] = self.key_ref("configmaps", ns, ref["configMapKeyRef"])
        return {k: v for k, v in env.items() if v is not None}

    def key_ref(self, plural: str, ns: str, ref: dict, secret: bool = False) -> str | None:
        """A Secret's or ConfigMap's key; a missing one is the kubelet's
        CreateContainerConfigError, in the kubelet's words (unless the ref is optional)."""
        kind = "Secret" if secret else "ConfigMap"
        try:  # secrets: the executor's own read (the operator never reads secrets)
            obj = kube.request("GET", f"{kube.collection_path('v1', plural, ns)}/{ref['name']}")
        except kube.NotFound:
            if ref.get("optional"):
                return None
            raise ContainerConfigError(f'{kind.lower()} "{ref["name"]}" not found') from None
        raw = (obj.get("data") or {}).get(ref["key"])
        if raw is None:
            if ref.get("optional"):
                return None
            raise ContainerConfigError(f"couldn't find key {ref['key']} in {kind} "
                                       f"{ns}/{ref['name']}")
        if secret:
            import base64

            return base64.b64decode(raw).decode()
        return raw

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
        for mount_path, path in list(mounts.items()):
            if path.parent.parent == PVC:  # claims mounted side by side: their root too
                mounts.setdefault(str(Path(mount_path).parent), path.parent)
        term_path = container.get("terminationMessagePath", "/dev/termination-log")
        term_file = workdir / "termination-log"
        mounts[term_path] = term_file
        pod_ip = self.allocate_ip(uid)
        env = self.resolve_env(pod, container)
        env = {k: remap(v, mounts) for k, v in env.items()}
        extra = WORK / "env" / f"{md['namespace']}.json"  # the test hook (module docstring)
        if extra.exists():
            env.update(json.loads(extra.read_text()))
        argv = [remap(expand(a, env), mounts)
                for a in (container.get("command") or []) + (container.get("args") or [])]
        # Every pod here shares the host's loopback: a port a previous attempt's rank 0 still
        # holds (it is being torn down) would be in use. On a real node it is a fresh netns.
        port = next((int(m.group(1)) for a in argv
                     if (m := re.fullmatch(r"--master[-_]port=(\d+)", a))), None)
        if port and any(re.fullmatch(r"--node[-_]rank=0", a) for a in argv):
            wait_port_free(port)
        hostnames = dns_names(pod)
        self.add_hosts(uid, hostnames, pod_ip)
        host_env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY_ENV)}
        full_env = {**host_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "HOSTNAME": spec.get("hostname", md["name"]), "FLYWHEEL_BIND_HOST": pod_ip,
                    **env}
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
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}], "startTime": started,
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
        self.release_ip(pod["metadata"]["uid"])
        message = term_file.read_bytes()[:4096].decode(errors="replace") if (
            term_file.exists()) else ""
        policy = pod["spec"]["containers"][0].get("terminationMessagePolicy")
        if not message.strip() and code != 0 and policy == "FallbackToLogsOnError":
            message = log_tail(term_file.parent / "output.log")  # the kubelet's fallback
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
        self.release_ip(md["uid"])
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
            if "persistentVolumeClaim" in vol:
                path = PVC / ns / vol["persistentVolumeClaim"]["claimName"]
                path.mkdir(parents=True, exist_ok=True)
                paths[vol["name"]] = path
                continue
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

    def waiting(self, pod: dict, reason: str, message: str, retry_s: float = 10) -> None:
        """Pending with the container waiting for `reason`, as a kubelet reports it; tried
        again after `retry_s` unless the pod has gone."""
        uid = pod["metadata"]["uid"]
        with self.lock:
            if self.procs.get(uid, 0) is not None:  # deleted (popped) or started meanwhile
                return
        log(f"waiting {pod['metadata']['name']}: {reason}: {message}")
        container = pod["spec"]["containers"][0]
        self.patch_status(pod, {"phase": "Pending", "containerStatuses": [{
            "name": container["name"], "image": container["image"], "ready": False,
            "restartCount": 0, "started": False,
            "state": {"waiting": {"reason": reason, "message": message}}}]})

        def retry() -> None:
            with self.lock:
                if uid not in self.procs:
                    return
            try:
                current = kube.request("GET", kube.object_path(
                    "v1", "Pod", pod["metadata"]["namespace"], pod["metadata"]["name"]))
            except kube.NotFound:
                return
            if current["metadata"]["uid"] == uid and not current["metadata"].get(
                    "deletionTimestamp"):
                self.start_logged(current)

        timer = threading.Timer(retry_s, retry)
        timer.daemon = True
        timer.start()

    # --- pod addresses: one loopback address per pod, its DNS names in /etc/hosts ---
    def allocate_ip(self, uid: str) -> str:
        """A loopback address no live pod holds; rotating, so a freed one is not reused soon."""
        with self.lock:
            if uid in self.ips:
                return self.ips[uid]
            taken = set(self.ips.values())
            while True:
                self.next_ip = self.next_ip % (250 * 250) + 1
                ip = f"127.10.{self.next_ip // 250 + 1}.{self.next_ip % 250 + 1}"
                if ip not in taken:
                    self.ips[uid] = ip
                    return ip

    def release_ip(self, uid: str) -> None:
        with self.lock:
            self.ips.pop(uid, None)

    def add_hosts(self, uid: str, names: list[str], ip: str = "127.0.0.1") -> None:
        with _hosts_lock:
            lines = HOSTS.read_text().splitlines()
            lines.append(f"{ip} {' '.join(names)} {HOSTS_MARK} {uid}")
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
            self.release_ip(uid)
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
        except ContainerConfigError as err:  # the kubelet's wait-and-retry, in its words
            self.release_ip(pod["metadata"]["uid"])
            self.waiting(pod, "CreateContainerConfigError", str(err))
        except Exception as err:  # report it on the pod, as a kubelet would
            log(f"cannot start {pod['metadata']['name']}: {err!r}")
            self.release_ip(pod["metadata"]["uid"])
            self.patch_status(pod, {"phase": "Failed", "reason": "ExecutorError",
                                    "message": str(err)[:1024]})


class ContainerConfigError(Exception):
    """A Secret or ConfigMap the container's env needs is missing."""


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known vars are replaced, `$$(VAR)` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  value)


def remap(value: str, mounts: dict[str, Path]) -> str:
    """Point container paths under a mount at the mount's local folder (one pass, longest
    mount path first, so a replaced path is never rewritten again)."""
    paths = [p for p in sorted(mounts, key=len, reverse=True) if p != "/dev/shm"]
    if not paths:
        return value
    return re.sub("|".join(map(re.escape, paths)), lambda m: str(mounts[m.group(0)]), value)


def field_ref(pod: dict, path: str, pod_ip: str = "127.0.0.1") -> str:
    md = pod["metadata"]
    match = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
    if match:
        return (md.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {"metadata.name": md["name"], "metadata.namespace": md["namespace"],
              "metadata.uid": md["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
              "status.podIP": pod_ip, "status.hostIP": "127.0.0.1"}
    return simple.get(path, "")


def log_tail(path: Path, max_bytes: int = 2048, max_lines: int = 80) -> str:
    """The end of a container log, as the kubelet's FallbackToLogsOnError takes it."""
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        lines = f.read().decode(errors="replace").splitlines()
    return "\n".join(lines[-max_lines:])


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
