"""Helpers for the chart and Argo CD tests: helm against the local cluster, rendering, Lua."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "flywheel"
HELM = ROOT / ".cache" / "bin" / "helm"
KUBECONFIG = ROOT / ".cache" / "cluster" / "kubeconfig"
HEALTH = ROOT / "argocd" / "health"

# Helm's own state (repositories, cache) stays inside the repo's ignored cache folder.
HELM_ENV = {
    **os.environ,
    "HELM_CACHE_HOME": str(ROOT / ".cache" / "helm" / "cache"),
    "HELM_CONFIG_HOME": str(ROOT / ".cache" / "helm" / "config"),
    "HELM_DATA_HOME": str(ROOT / ".cache" / "helm" / "data"),
}


def helm(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """The helm built for the local cluster (`make tools`), pointed at that cluster only."""
    if not HELM.exists():
        pytest.skip(f"{HELM} is missing: `make tools` builds it (`make test` always does)")
    proc = subprocess.run([str(HELM), "--kubeconfig", str(KUBECONFIG), *args],
                          capture_output=True, text=True, timeout=timeout, env=HELM_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_args(values: dict | None) -> list[str]:
    """Values as --set-json flags (one per top-level key; nested structure kept)."""
    return [arg for key, value in (values or {}).items()
            for arg in ("--set-json", f"{key}={json.dumps(value)}")]


def render(values: dict | None = None, release: str = "fw", namespace: str = "flywheel-system",
           ) -> list[dict]:
    """`helm template` with these values: the rendered objects (tests included)."""
    out = helm("template", release, str(CHART), "--namespace", namespace, *set_args(values)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


# --- Argo CD health (Lua) -----------------------------------------------------------------------


def lua_health(kind: str, obj: dict, script: str | None = None) -> dict:
    """Run an Argo CD health script the way Argo CD does: `obj` global, returns {status,message}.

    Lua 5.1 (lupa.lua51): Argo CD embeds gopher-lua, a Lua 5.1 implementation.
    """
    from lupa.lua51 import LuaRuntime

    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
    source = script if script is not None else (HEALTH / f"flywheel.dev_{kind}.lua").read_text()
    result = lua.execute(source)
    return {key: result[key] for key in ("status", "message") if result[key] is not None}
