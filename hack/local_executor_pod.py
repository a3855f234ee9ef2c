"""What a pod's spec means on this machine, for the local executor (hack/local_executor.py):
each container as a process to start (`prepare`: its environment resolved as the kubelet
resolves it, `$(VAR)`, fieldRef, secretKeyRef, configMapKeyRef; its volumes (ConfigMap,
downward API, emptyDir) as local folders, a PersistentVolumeClaim as
.cache/pvc/<namespace>/<claim>, and container paths pointed at them; its workingDir where
that is under a volume; its readiness probe), its DNS names."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel_operator import kube

ROOT = Path(__file__).resolve().parent.parent
PVC = ROOT / ".cache" / "pvc"  # claim C of namespace N is the folder .cache/pvc/N/C
WORK = ROOT / ".cache" / "executor"  # pod P of namespace N runs in .cache/executor/N/P


class ContainerConfigError(Exception):
    """A Secret or ConfigMap the container's env needs is missing."""


class VolumeNotReady(Exception):
    """A ConfigMap a volume needs is missing: the pod stays ContainerCreating and the mount is
    tried again, as a kubelet does (someone deleted it, or it is created late)."""


@dataclass
class Process:
    """One container of a pod, ready to run here as a process."""

    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path  # stdout and stderr
    term_file: Path  # what the container writes to its terminationMessagePath
    fallback_to_logs: bool  # terminationMessagePolicy: FallbackToLogsOnError
    probe: tuple[int, str] | None  # readinessProbe.httpGet as (port, path)


def prepare(pod: dict, container: dict, volumes: dict[str, Path], workdir: Path,
            pod_ip: str, init: bool = False) -> Process:
    """`container` of `pod` as a process: every path under one of its volume mounts (in
    command, args, env and workingDir) pointed at the volume's local folder. The main
    container logs to `output.log` in the pod's folder; an init container to `<name>.log`."""
    mounts = {m["mountPath"]: volumes[m["name"]]
              for m in container.get("volumeMounts") or [] if m["name"] in volumes}
    for mount_path, path in list(mounts.items()):
        if path.parent.parent == PVC:  # claims mounted side by side: their root too
            mounts.setdefault(str(Path(mount_path).parent), path.parent)
    stem = container["name"] if init else "output"
    term_file = workdir / ("termination-log" if not init else f"{stem}.termination-log")
    mounts[container.get("terminationMessagePath", "/dev/termination-log")] = term_file
    env = {k: remap(v, mounts) for k, v in resolve_env(pod, container, pod_ip).items()}
    extra = WORK / "env" / f"{pod['metadata']['namespace']}.json"  # the executor's test hook
    if extra.exists():
        env.update(json.loads(extra.read_text()))
    argv = [remap(expand(a, env), mounts)
            for a in (container.get("command") or []) + (container.get("args") or [])]
    # The image's own filesystem does not exist here: a workingDir counts under a volume only
    # (created when the container starts, if need be, as container runtimes do).
    wd = container.get("workingDir") or ""
    return Process(
        name=container["name"], image=container["image"], argv=argv, env=env,
        cwd=Path(remap(wd, mounts)) if remap(wd, mounts) != wd else workdir,
        log=workdir / f"{stem}.log",
        term_file=term_file,
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
        probe=http_probe(container))


def http_probe(container: dict) -> tuple[int, str] | None:
    """The container's readinessProbe.httpGet as (port, path); a named port resolved."""
    get = (container.get("readinessProbe") or {}).get("httpGet")
    if not get:
        return None
    port = get["port"]
    if isinstance(port, str) and not port.isdigit():
        port = next(p["containerPort"] for p in container.get("ports") or []
                    if p.get("name") == port)
    return int(port), get.get("path", "/")


def config_maps(ns: str) -> str:
    return kube.collection_path("v1", "configmaps", ns)


def resolve_env(pod: dict, container: dict, pod_ip: str) -> dict[str, str]:
    """The container's environment, as the kubelet resolves it."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            ref = src["configMapRef"]
            try:
                cm = kube.request("GET", f"{config_maps(ns)}/{ref['name']}")
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
            env[var["name"]] = key_ref("secrets", ns, ref["secretKeyRef"], secret=True)
        elif "configMapKeyRef" in ref:
            env[var["name"]] = key_ref("configmaps", ns, ref["configMapKeyRef"])
    return {k: v for k, v in env.items() if v is not None}

def key_ref(plural: str, ns: str, ref: dict, secret: bool = False) -> str | None:
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


def materialise_volumes(pod: dict, workdir: Path) -> dict[str, Path]:
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
            name = vol["configMap"]["name"]
            try:
                cm = kube.request("GET", f"{config_maps(ns)}/{name}")
            except kube.NotFound:
                if vol["configMap"].get("optional"):
                    paths[vol["name"]] = path
                    continue
                raise VolumeNotReady(f'MountVolume.SetUp failed for volume "{vol["name"]}" : '
                                     f'configmap "{name}" not found') from None
            data = cm.get("data") or {}
            items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])
        elif "downwardAPI" in vol:  # the pod's own fields, e.g. an annotation, as files
            for item in vol["downwardAPI"].get("items") or []:
                if "fieldRef" not in item:
                    continue  # resourceFieldRef: not needed by the pods run here
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(field_ref(pod, item["fieldRef"]["fieldPath"]))
        paths[vol["name"]] = path
    return paths


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


class Network:
    """Pod addresses: one loopback address per pod (127.10.x.y; a second executor's
    `own` range 127.11.x.y), its DNS names in /etc/hosts under the executor's mark."""

    HOSTS = Path("/etc/hosts")
    MARK = "# flywheel-local-executor"
    _hosts_lock = threading.Lock()  # every executor in this process edits one file

    def __init__(self, own: str | None = None) -> None:
        self.mark = f"{self.MARK}-{own}" if own else self.MARK
        self.prefix = "127.11" if own else "127.10"
        self.ips: dict[str, str] = {}  # pod uid -> its loopback address
        self.next = 0
        self.lock = threading.Lock()

    def allocate(self, uid: str) -> str:
        """A loopback address no live pod holds; rotating, so a freed one is not reused soon."""
        with self.lock:
            if uid in self.ips:
                return self.ips[uid]
            taken = set(self.ips.values())
            while True:
                self.next = self.next % (250 * 250) + 1
                ip = f"{self.prefix}.{self.next // 250 + 1}.{self.next % 250 + 1}"
                if ip not in taken:
                    self.ips[uid] = ip
                    return ip

    def release(self, uid: str) -> None:
        with self.lock:
            self.ips.pop(uid, None)

    def add_hosts(self, uid: str, names: list[str], ip: str = "127.0.0.1") -> None:
        with self._hosts_lock:
            lines = self.HOSTS.read_text().splitlines()
            lines.append(f"{ip} {' '.join(names)} {self.mark} {uid}")
            self.HOSTS.write_text("\n".join(lines) + "\n")

    def remove_hosts(self, uid: str | None = None) -> None:
        """Remove the pod's entries (every entry of this executor without `uid`)."""
        with self._hosts_lock:
            lines = self.HOSTS.read_text().splitlines()
            keep = [ln for ln in lines if f" {self.mark} " not in ln
                    or (uid is not None and not ln.endswith(f" {self.mark} {uid}"))]
            if keep != lines:
                self.HOSTS.write_text("\n".join(keep) + "\n")
