"""The chart installed into the local cluster: an available operator, restricted Pod Security,
no Secrets, and RBAC proven sufficient by running the real operator with the chart's
ServiceAccount token through a whole run lifecycle.

kwok plays the kubelets: the chart's operator pod becomes Running on the CPU pool without
running anything, and pods annotated `flywheel.dev/simulate-exit` finish with that code.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, Cluster, Operator, wait_until
from tests.integration.test_operator import manifest, summary

from .support import CHART, helm, lua_health, set_args

pytestmark = pytest.mark.cluster

CA = ROOT / ".cache" / "cluster" / "pki" / "ca.crt"
# Keep the operator pod on the fake CPU pool (never on the local-executor nodes), and let
# kwok finish the `helm test` pod.
LOCAL_VALUES = {
    "nodeSelector": {"flywheel.dev/pool": "cpu"},
    "tests": {"podAnnotations": {"flywheel.dev/simulate-exit": "0"}},
}


@dataclass
class Release:
    name: str
    namespace: str
    values: dict = field(default_factory=dict)

    @property
    def fullname(self) -> str:
        return f"{self.name}-flywheel"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    @property
    def peering(self) -> str:
        return self.values["peering"]["name"]


@pytest.fixture
def install(cluster: Cluster, crds: Cluster):
    """Install the chart (unique release, namespace and peering name); uninstall afterwards."""
    releases: list[Release] = []

    def _install(values: dict | None = None, labels: dict | None = None) -> Release:
        suffix = uuid.uuid4().hex[:6]
        # The admission policies (cluster-scoped) bind only in this test's namespaces: the
        # release's own, unless a test names others.
        own = {"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": f"fw-{suffix}"}}}
        release = Release(f"fw-{suffix}", f"fw-{suffix}",
                          {**LOCAL_VALUES, "peering": {"name": f"flywheel-{suffix}"},
                           "admissionPolicy": own, **(values or {})})
        namespace = {"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": release.namespace, "labels": labels or {}}}
        cluster.apply(namespace)
        releases.append(release)
        # No --skip-crds: helm skips CRDs that exist (the shared cluster has ours) and adds
        # kopf's peering CRDs where missing, as `helm install flywheel charts/flywheel` would.
        helm("install", release.name, str(CHART), "--namespace", release.namespace,
             *set_args(release.values), "--wait", "--timeout", "120s")
        return release

    yield _install
    for release in releases:
        helm("uninstall", release.name, "--namespace", release.namespace, "--wait",
             check=False)
        cluster.kubectl("delete", "namespace", release.namespace, "--wait=false", check=False)


def operator_pods(cluster: Cluster, release: Release) -> list[dict]:
    return cluster.get("pods", "-n", release.namespace, "-l",
                       f"app.kubernetes.io/instance={release.name},"
                       "app.kubernetes.io/component=operator")["items"]


# --- install, Pod Security, helm test ------------------------------------------------------------


def test_install_in_a_restricted_namespace_gives_an_available_operator(cluster, install):
    release = install(labels={"pod-security.kubernetes.io/enforce": "restricted",
                              "pod-security.kubernetes.io/enforce-version": "latest"})
    deployment = cluster.get("deployment", release.fullname, "-n", release.namespace)
    # the production default: an active replica and a standby
    assert deployment["status"].get("availableReplicas") == 2
    pods = operator_pods(cluster, release)
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        node = cluster.get("node", pod["spec"]["nodeName"])
        assert node["metadata"]["labels"]["flywheel.dev/pool"] == "cpu"
    pdb = cluster.get("pdb", release.fullname, "-n", release.namespace)
    assert pdb["spec"]["minAvailable"] == 1

    # The label is enforced here: a pod without the restricted settings is refused...
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    proc = cluster.kubectl("create", "--dry-run=server", "-n", release.namespace, "-f", "-",
                           input=json.dumps(bare), check=False)
    assert proc.returncode != 0 and "violates PodSecurity" in proc.stderr
    # ...so the operator pod (and the ReplicaSet that made it) passed the restricted profile.
    events = cluster.get("events", "-n", release.namespace)["items"]
    assert not [e for e in events if e.get("reason") == "FailedCreate"]

    # `helm test`: the metrics check pod is admitted too (kwok finishes it with exit 0).
    out = helm("test", release.name, "--namespace", release.namespace, "--timeout", "60s").stdout
    assert "Succeeded" in out, out


def test_service_account_cannot_touch_secrets(cluster, install, namespace):
    release = install()
    for verb in ("get", "list", "watch"):
        for scope in (["-n", release.namespace], ["-n", namespace], ["--all-namespaces"]):
            proc = cluster.kubectl("auth", "can-i", verb, "secrets", "--as",
                                   release.service_account, *scope, check=False)
            assert proc.stdout.strip() == "no", (verb, scope, proc.stdout)
    # What it does need, it has.
    for verb, resource, *sub in (("watch", "finetuneruns.flywheel.dev"),
                                 ("create", "jobs.batch"), ("list", "pods"),
                                 ("patch", "finetuneruns.flywheel.dev", "--subresource=status")):
        proc = cluster.kubectl("auth", "can-i", verb, resource, *sub, "--as",
                               release.service_account, "--all-namespaces", check=False)
        assert proc.stdout.strip() == "yes", (verb, resource, sub)
    # And with the ServiceAccount's own token: Forbidden.
    token = create_token(cluster, release)
    proc = cluster.kubectl_as(token, "get", "secrets", "-n", namespace)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower()


# --- RBAC sufficiency: the real operator with the chart's ServiceAccount token --------------------


def create_token(cluster: Cluster, release: Release) -> str:
    return cluster.kubectl("create", "token", release.fullname, "-n", release.namespace,
                           "--duration=1h").stdout.strip()


def token_kubeconfig(cluster: Cluster, token: str, path: Path) -> Path:
    """A kubeconfig with only the bearer token: no client certificate, no admin rights."""
    server = cluster.kubectl("config", "view", "--minify",
                             "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "flywheel",
        "clusters": [{"name": "local", "cluster": {"server": server,
                                                   "certificate-authority": str(CA)}}],
        "users": [{"name": "flywheel-operator", "user": {"token": token}}],
        "contexts": [{"name": "flywheel", "context": {"cluster": "local",
                                                      "user": "flywheel-operator"}}],
    }))
    return path


def run_manifest(name: str) -> dict:
    run = manifest(name, nodes=2, gpus=8)
    run["metadata"]["labels"]["app.kubernetes.io/part-of"] = "ml"
    return run


MODEL = {
    "apiVersion": "flywheel.dev/v1alpha1", "kind": "Model", "metadata": {"name": "flow-agent"},
    "spec": {"promotion": {"alias": "production",
                           "gates": [{"metric": "tool_call_accuracy/email", "min": 0.8}]},
             "servingTargets": [{"deployment": "flow-server", "container": "server"}]},
}
SERVER = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "flow-server"},
    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "flow-server"}},
             "template": {"metadata": {"labels": {"app": "flow-server"}},
                          "spec": {"nodeSelector": {"flywheel.dev/pool": "cpu"},
                                   "containers": [{"name": "server", "image": "vllm"}]}}},
}


@dataclass
class Lifecycle:
    """Runs driven end to end while only the chart's ServiceAccount operates on them:
    Job on the H200 pool -> Succeeded -> ModelVersion -> Model aliases -> serving rollout."""

    cluster: Cluster
    namespace: str

    def get(self, *args: str) -> dict:
        return self.cluster.get(*args, "-n", self.namespace)

    def status(self, run: str) -> dict:
        return self.get("ftr", run).get("status") or {}

    def pods(self, run: str, attempt: int = 1) -> list[dict]:
        return self.get("pods", "-l", f"flywheel.dev/run={run},flywheel.dev/attempt={attempt}",
                        )["items"]

    def prepare_serving(self) -> None:
        self.cluster.apply(SERVER, self.namespace)
        self.cluster.apply(MODEL, self.namespace)

    def start(self, run: str) -> list[dict]:
        self.cluster.apply(run_manifest(run), self.namespace)
        pods = wait_until(
            lambda: (pods := self.pods(run)) and len(pods) == 2
            and all(p["status"].get("phase") == "Running" for p in pods) and pods,
            timeout=90, message=f"2 running pods of {run}")
        for pod in pods:
            node = self.cluster.get("node", pod["spec"]["nodeName"])
            assert node["metadata"]["labels"]["flywheel.dev/pool"] == "h200"
        wait_until(lambda: self.status(run).get("phase") == "Running", timeout=60,
                   message=f"{run} Running")
        return pods

    def succeed(self, run: str, pods: list[dict], message: str) -> dict:
        for pod in pods:
            annotations = ["flywheel.dev/simulate-exit=0"]
            if pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0":
                annotations.append(f"flywheel.dev/simulate-message={message}")
            self.cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n",
                                 self.namespace, "--overwrite", *annotations)
        return wait_until(lambda: (s := self.status(run)).get("phase") in ("Succeeded", "Failed")
                          and s, timeout=90, message=f"{run} finished")

    def served(self) -> tuple[str | None, str | None]:
        template = self.get("deployment", "flow-server")["spec"]["template"]
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        return (env.get("FLYWHEEL_MODEL_URI"),
                (template["metadata"].get("annotations") or {}).get("flywheel.dev/model-digest"))

    def dump(self) -> str:
        """What the operator made, for failure output."""
        out = self.cluster.kubectl("get", "ftr,mv,model,jobs", "-n", self.namespace,
                                   "--show-labels", check=False)
        return out.stdout + out.stderr

    def assert_no_drift(self, run: str) -> None:
        """What the user (or Argo CD) wrote is untouched: no ignoreDifferences needed."""
        obj = self.get("ftr", run, "--show-managed-fields")
        expected = run_manifest(run)["metadata"]
        assert obj["metadata"]["generation"] == 1
        assert obj["metadata"]["labels"] == expected["labels"]
        assert obj["metadata"]["annotations"] == expected["annotations"]
        assert not obj["metadata"].get("finalizers")
        for entry in obj["metadata"]["managedFields"]:
            if entry["manager"] != "kubectl":
                assert entry.get("subresource") == "status", entry


@pytest.fixture
def only_this_operator(request, cluster: Cluster, namespace: str):
    """Pause the session's admin operator so nothing but the SA-backed one acts; fail clearly
    when some other operator (another test session on the same cluster) still answers."""
    session_operator: Operator = request.getfixturevalue("operator")
    session_operator.stop()
    probe = run_manifest("probe")
    probe["spec"]["suspend"] = True
    cluster.apply(probe, namespace)
    try:
        wait_until(lambda: cluster.get("ftr", "probe", "-n", namespace).get("status"),
                   timeout=4, message="")
        foreign = True
    except AssertionError:
        foreign = False
    cluster.kubectl("delete", "ftr", "probe", "-n", namespace, "--wait=true")
    try:
        if foreign:
            pytest.fail("another Flywheel operator is reconciling runs on this cluster: the RBAC "
                        "proof needs the chart's ServiceAccount to be the only actor")
        yield
    finally:
        session_operator.start()


@pytest.mark.parametrize("mode", ["clusterwide", "watchNamespaces"])
def test_operator_with_the_chart_service_account_runs_a_whole_lifecycle(
        cluster, install, namespace, only_this_operator, tmp_path, mode):
    # The chart's admission policies bind in the runs' namespace: the operator's own writes
    # (status, ModelVersions) pass the registry policy, the runs the runs policy.
    values = {"admissionPolicy": {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": namespace}}}}
    if mode == "watchNamespaces":
        values["watchNamespaces"] = [namespace]
    release = install(values)
    assert cluster.get("validatingadmissionpolicybinding", f"{release.fullname}-registry")
    token = create_token(cluster, release)
    kubeconfig = token_kubeconfig(cluster, token, tmp_path / "kubeconfig")
    whoami = cluster.kubectl("--kubeconfig", str(kubeconfig), "auth", "whoami", "-o", "json")
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == \
        release.service_account

    # The operator config the chart renders, as the pod would mount it.
    config = tmp_path / "operator.yaml"
    config.write_text(cluster.get("configmap", f"{release.fullname}-config", "-n",
                                  release.namespace)["data"]["operator.yaml"])
    scope = ["--namespace", namespace] if mode == "watchNamespaces" else ["--all-namespaces"]
    log = tmp_path / "operator.log"
    operator = Operator(str(kubeconfig), log, config, [*scope, f"--peering={release.peering}"])
    operator.start()
    try:
        lifecycle = Lifecycle(cluster, namespace)
        lifecycle.prepare_serving()

        # Week 1 passes the gate: registered, promoted, rolled out to the serving Deployment.
        pods = lifecycle.start("week-1")
        assert lua_health("FineTuneRun", lifecycle.get("ftr", "week-1"))["status"] == \
            "Progressing"
        status = lifecycle.succeed("week-1", pods, summary("w1", 1.2, 0.9))
        assert status["phase"] == "Succeeded", status
        assert status["modelVersion"] == "flow-agent-v1"
        assert lua_health("FineTuneRun", lifecycle.get("ftr", "week-1"))["status"] == "Healthy"
        mv = lifecycle.get("mv", "flow-agent-v1")
        assert lua_health("ModelVersion", mv)["status"] == "Healthy"
        digest = mv["spec"]["artifact"]["digest"]
        model = wait_until(lambda: (m := lifecycle.get("model", "flow-agent"))
                           .get("status", {}).get("aliases", {}).get("production") and m,
                           message="production alias set")
        assert model["status"]["aliases"]["production"]["digest"] == digest
        assert lua_health("Model", model)["status"] == "Healthy"
        wait_until(lambda: lifecycle.served() == ("s3://models/flow-agent/w1/", digest),
                   message="the serving Deployment rolled out v1")
        lifecycle.assert_no_drift("week-1")

        # Week 2 fails the e-mail gate: Argo CD would show the Model Degraded, naming it.
        status = lifecycle.succeed("week-2", lifecycle.start("week-2"), summary("w2", 1.2, 0.5))
        assert status["phase"] == "Succeeded" and status["modelVersion"] == "flow-agent-v2"
        model = wait_until(lambda: (m := lifecycle.get("model", "flow-agent"))
                           ["status"]["aliases"]["latest"]["version"] == 2 and m,
                           message="v2 registered")
        health = lua_health("Model", model)
        assert health["status"] == "Degraded" and "tool_call_accuracy/email" in \
            health["message"], health
        assert lifecycle.served()[1] == digest  # serving stays on v1
        lifecycle.assert_no_drift("week-2")

        # The operator's Events reached the API, and its keep-alives the peering object.
        expected = {"Succeeded", "Registered", "Promoted", "ServingUpdated", "PromotionBlocked"}
        wait_until(lambda: expected <= {e["reason"] for e in lifecycle.get("events")["items"]},
                   timeout=30, message=f"events {expected}")
        if mode == "watchNamespaces":
            peering = cluster.get("kopfpeering", release.peering, "-n", namespace)
        else:
            peering = cluster.get("clusterkopfpeering", release.peering)
        assert peering.get("status"), "the operator never touched its peering object"
    finally:
        operator.stop()
        text = log.read_text()
        print(text[-4000:])
        print(Lifecycle(cluster, namespace).dump())
    # RBAC denials only ("forbidden ... being terminated" from other tests' namespaces is not).
    denied = re.findall(r"cannot \w+ resource \S+ in API group \S*[^\n]*", text)
    assert not denied and "not enough permissions" not in text.lower(), denied
