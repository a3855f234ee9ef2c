"""What a pod's spec means on this machine, for the local executor (hack/local_executor.py):
its environment resolved as the kubelet resolves it (`$(VAR)`, fieldRef, secretKeyRef,
configMapKeyRef), its volumes as local folders (a PersistentVolumeClaim as
.cache/pvc/<namespace>/<claim>) and container paths pointed at them, its DNS names."""

from __future__ import annotations

import re
import time
from pathlib import Path

from flywheel_operator import kube

ROOT = Path(__file__).resolve().parent.parent
PVC = ROOT / ".cache" / "pvc"  # claim C of namespace N is the folder .cache/pvc/N/C


class ContainerConfigError(Exception):
    """A Secret or ConfigMap the container's env needs is missing."""


def resolve_env(pod: dict, container: dict, pod_ip: str) -> dict[str, str]:
    """The container's environment, as the kubelet resolves it."""
    ns = pod["metadata"]["namespace"]
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
