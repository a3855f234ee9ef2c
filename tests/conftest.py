"""Shared fixtures. `cluster` brings up (or reuses) the real local control plane."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KUBECONFIG = ROOT / ".cache" / "cluster" / "kubeconfig"
KUBECTL = ROOT / ".cache" / "bin" / "kubectl"


@dataclass
class Cluster:
    """Handle on the local control plane: kubectl and the Python client, both as admin."""

    kubeconfig: str

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(KUBECTL), "--kubeconfig", self.kubeconfig, *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def kubectl_as(self, token: str, *args: str, check: bool = False):
        """kubectl with only a bearer token (no client certificate), e.g. a ServiceAccount's."""
        server = self.kubectl("config", "view", "--minify",
                              "-o", "jsonpath={.clusters[0].cluster.server}").stdout
        ca = ROOT / ".cache" / "cluster" / "pki" / "ca.crt"
        return subprocess.run(
            [str(KUBECTL), "--kubeconfig", "/dev/null", f"--server={server}",
             f"--certificate-authority={ca}", f"--token={token}", *args],
            capture_output=True, text=True, timeout=60, check=check,
        )

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def apply(self, obj: dict | list, namespace: str | None = None) -> None:
        doc = obj if isinstance(obj, dict) else {"apiVersion": "v1", "kind": "List", "items": obj}
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", "--server-side", "-f", "-", *ns, input=json.dumps(doc))

    def api_client(self):
        import kubernetes

        return kubernetes.config.new_client_from_config(config_file=self.kubeconfig)


def admission_refusal(name: str, namespace: str, rules: list[dict], expression: str,
                      message: str) -> list[dict]:
    """A ValidatingAdmissionPolicy and its binding, for `namespace` only: requests matching
    `rules` are refused with `message` unless `expression` (CEL) holds."""
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": name},
         "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": rules},
                  "validations": [{"expression": expression, "message": message}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": name},
         "spec": {"policyName": name, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels": {
                      "kubernetes.io/metadata.name": namespace}}}}}]


def wait_until(predicate, timeout: float = 60, interval: float = 0.25, message: str = ""):
    """Poll `predicate` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message or predicate} (last: {last!r})")


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    subprocess.run([sys.executable, str(ROOT / "hack" / "cluster.py"), "up"], check=True)
    return Cluster(kubeconfig=str(KUBECONFIG))


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The Flywheel CRDs, installed and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds")
    )
    return cluster


@pytest.fixture
def namespace(cluster: Cluster):
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the controller-manager has created the default ServiceAccount.
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=30s")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


class Operator:
    """The real operator as a subprocess against the local cluster; killable at will."""

    def __init__(self, kubeconfig: str, log_path: Path, config: Path | None = None,
                 scope: list[str] | None = None):
        """`scope`: the scope and peering flags (default: --standalone --all-namespaces)."""
        self.kubeconfig, self.log_path, self.config = kubeconfig, log_path, config
        self.scope = scope or ["--standalone", "--all-namespaces"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import os

        env = {**os.environ, "KUBECONFIG": self.kubeconfig}
        # the scope's flags last: they may override the defaults (e.g. --metrics-port -1)
        args = [sys.executable, "-m", "flywheel_operator", "--metrics-port", "0",
                "--liveness", "", *self.scope]
        if self.config:
            args += ["--config", str(self.config)]
        # Look for the start line only in what this start writes (the log is appended to).
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: b"flywheel operator: started" in self.log_path.read_bytes()[offset:]
                   or self.proc.poll() is not None, timeout=60, message="operator started")
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def operator(crds: Cluster, tmp_path_factory) -> Operator:
    """One operator for the whole session, watching all namespaces (standalone)."""
    log_path = ROOT / ".cache" / "test-operator.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    op = Operator(crds.kubeconfig, log_path, ROOT / "hack" / "operator-local.yaml")
    op.start()
    yield op
    op.stop()
