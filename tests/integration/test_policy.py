"""The operator's own line, with no Flywheel admission policy in the cluster: its config's `policy`
refuses a run at once (PolicyDenied, naming the rule and the field), an unknown pool fails at
once naming the pools the namespace may use, a CPU run aimed at the H200 nodes never gets
there, and an admitted run's attempt comes fenced (the namespace's NetworkPolicy, and a gang's
own) with bounded pods.

Each test runs its own operator, confined to the test's namespace, with a config carrying the
policy, as a ServiceAccount of its own. Other operators on the cluster (this session's, which
watches every namespace without this policy, or another session's) are fenced out of the
namespace: a test-only ValidatingAdmissionPolicy, bound to it alone, refuses Jobs and run
status writes from anyone else. (It is not Flywheel's admission policy, which stays absent:
every refusal here is the operator's own.)
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import ROOT, Cluster, Operator, admission_refusal, wait_until
from tests.helm.test_install import token_kubeconfig
from tests.integration.test_operator import (
    attempt_pods,
    finish_pods,
    jobs_of,
    manifest,
    run_status,
    running_pods,
)

pytestmark = pytest.mark.cluster

POLICY = {"allowedImages": ["registry.acme.dev/ml/"], "maxNodes": 4}


def fence(cluster: Cluster, namespace: str, user: str) -> list[dict]:
    """A ValidatingAdmissionPolicy (and binding, for `namespace` only) that lets only `user`
    create Jobs and write run status there."""
    return admission_refusal(
        f"fwt-fence-{namespace}", namespace,
        [{"apiGroups": ["batch"], "apiVersions": ["*"], "operations": ["CREATE"],
          "resources": ["jobs"]},
         {"apiGroups": ["flywheel.dev"], "apiVersions": ["*"], "operations": ["UPDATE"],
          "resources": ["finetuneruns/status"]}],
        f"request.userInfo.username == '{user}'",
        "fenced: another test's operator owns this namespace")


@pytest.fixture
def policy_operator(crds: Cluster, namespace: str, tmp_path):
    cluster = crds
    account = f"system:serviceaccount:{namespace}:policy-operator"
    cluster.kubectl("create", "serviceaccount", "policy-operator", "-n", namespace)
    binding = f"fwt-{namespace}-operator"
    cluster.kubectl("create", "clusterrolebinding", binding, "--clusterrole=cluster-admin",
                    f"--serviceaccount={namespace}:policy-operator")
    fenced = fence(cluster, namespace, account)
    try:
        cluster.apply(fenced)
        probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe"},
                 "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                     {"name": "c", "image": "busybox"}]}}}}
        wait_until(lambda: "fenced" in cluster.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-",
            input=json.dumps(probe), check=False).stderr, timeout=30, message="fence up")
        token = cluster.kubectl("create", "token", "policy-operator", "-n", namespace,
                                "--duration=1h").stdout.strip()
        kubeconfig = token_kubeconfig(cluster, token, tmp_path / "kubeconfig")
        config = yaml.safe_load((ROOT / "hack" / "operator-local.yaml").read_text())
        config["policy"] = {**POLICY, "namespacePools": {namespace: ["h200", "cpu"]}}
        path = tmp_path / "operator.yaml"
        path.write_text(yaml.safe_dump(config))
        op = Operator(str(kubeconfig), tmp_path / "operator.log", path,
                      ["--standalone", "--namespace", namespace])
        op.start()
        try:
            yield op
        finally:
            op.stop()
            print((tmp_path / "operator.log").read_text()[-3000:])
    finally:
        for obj in fenced:
            cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"],
                            "--ignore-not-found", check=False)
        cluster.kubectl("delete", "clusterrolebinding", binding, "--ignore-not-found",
                        check=False)


def failed(cluster: Cluster, namespace: str, name: str, timeout: float = 30) -> dict:
    status = wait_until(lambda: (s := run_status(cluster, namespace, name)).get("phase")
                        == "Failed" and s, timeout=timeout, message=f"{name} Failed")
    (condition,) = [c for c in status["conditions"] if c["type"] == "Failed"]
    return condition


def trainer_jobs(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    return [j for j in jobs_of(cluster, namespace, name)
            if j["metadata"]["labels"].get("flywheel.dev/component") == "trainer"]


def test_a_run_outside_the_policy_fails_at_once_with_policy_denied(
        cluster, policy_operator, namespace):
    cluster.apply(manifest("miner", nodes=8, image="docker.io/evil/miner:1"), namespace)
    condition = failed(cluster, namespace, "miner")
    assert condition["reason"] == "PolicyDenied"
    assert condition["message"].startswith(
        "refused by the operator's policy: policy.allowedImages: spec.image "
        "'docker.io/evil/miner:1' is not an allowed trainer image")
    assert "policy.maxNodes: spec.resources.nodes is 8, more than 4" in condition["message"]
    events = cluster.get("events", "-n", namespace,
                         "--field-selector", "involvedObject.name=miner")["items"]
    assert any(e["reason"] == "PolicyDenied" for e in events)
    assert not trainer_jobs(cluster, namespace, "miner")
    # Within the policy, the same run starts.
    cluster.apply(manifest("ok", image="registry.acme.dev/ml/trainer:1"), namespace)
    running_pods(cluster, namespace, "ok", 1, 2)


def test_an_unknown_pool_fails_at_once_naming_the_pools_the_namespace_may_use(
        cluster, policy_operator, namespace):
    run = manifest("nowhere", resources={"nodes": 1, "gpusPerNode": 8, "nodePool": "a100"})
    cluster.apply(run, namespace)
    condition = failed(cluster, namespace, "nowhere")
    assert condition["reason"] == "InvalidSpec"
    assert condition["message"] == (
        f"spec.resources.nodePool: unknown node pool 'a100'; pools namespace {namespace} may "
        "use: cpu, h200")


def test_a_cpu_run_aimed_at_the_h200_nodes_never_lands_there(cluster, policy_operator, namespace):
    run = manifest("sneaky", resources={
        "nodes": 1, "gpusPerNode": 8, "nodePool": "cpu",
        "nodeSelector": {"flywheel.dev/pool": "h200"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    cluster.apply(run, namespace)
    condition = failed(cluster, namespace, "sneaky")
    assert condition["reason"] == "PolicyDenied"
    assert ("pool boundary: spec.resources.nodeSelector['flywheel.dev/pool'] is 'h200' but pool "
            "cpu selects flywheel.dev/pool=cpu" in condition["message"])
    assert "spec.resources.tolerations[0] tolerates nvidia.com/gpu" in condition["message"]
    assert not trainer_jobs(cluster, namespace, "sneaky")
    assert not attempt_pods(cluster, namespace, "sneaky", 1)
    # Narrowing the pool is fine, and the pod is placed on the CPU pool.
    run = manifest("narrow", resources={"nodes": 1, "gpusPerNode": 8, "nodePool": "cpu",
                                        "nodeSelector": {"kubernetes.io/os": "linux"}})
    cluster.apply(run, namespace)
    (pod,) = running_pods(cluster, namespace, "narrow", 1, 1)
    node = cluster.get("node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["flywheel.dev/pool"] == "cpu"
    # One node: the namespace's fence covers its pod, with no policy of its own.
    fence = cluster.get("networkpolicy", "flywheel-trainers", "-n", namespace)
    assert fence["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert cluster.kubectl("get", "networkpolicy", "narrow-a1", "-n", namespace,
                           check=False).returncode != 0


def test_an_attempt_has_its_network_policy_and_bounded_pods(cluster, policy_operator, namespace):
    cluster.apply(manifest("fenced", maxRestarts=1), namespace)
    pods = running_pods(cluster, namespace, "fenced", 1, 2)
    netpol = cluster.get("networkpolicy", "fenced-a1", "-n", namespace)
    (owner,) = netpol["metadata"]["ownerReferences"]
    assert owner["kind"] == "FineTuneRun" and owner["name"] == "fenced"
    selector = {"flywheel.dev/run": "fenced", "flywheel.dev/attempt": "1"}
    assert netpol["spec"]["podSelector"] == {"matchLabels": selector}
    assert netpol["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    # The namespace's fence, in place before the first Job, admits the operator to every
    # trainer pod on the progress port, and nothing else; it belongs to no run.
    fence = cluster.get("networkpolicy", "flywheel-trainers", "-n", namespace)
    assert "ownerReferences" not in fence["metadata"]
    assert fence["spec"]["policyTypes"] == ["Ingress"]
    assert [rule["ports"] for rule in fence["spec"]["ingress"]] == [
        [{"protocol": "TCP", "port": 9400}]]
    fenced = fence["spec"]["podSelector"]["matchLabels"]
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert all(labels[k] == v for k, v in selector.items())
        assert fenced.items() <= labels.items()
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "64Gi"
        assert volumes["cache"]["emptyDir"]["sizeLimit"] == "256Gi"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "1600Gi"
    # The next attempt gets its own NetworkPolicy; the failed attempt's goes with its Job.
    finish_pods(cluster, namespace, pods[:1], 1, '{"error": "boom"}')  # one pod fails it
    running_pods(cluster, namespace, "fenced", 2, 2)
    assert cluster.get("networkpolicy", "fenced-a2", "-n", namespace)
    wait_until(lambda: cluster.kubectl("get", "networkpolicy", "fenced-a1", "-n", namespace,
                                       check=False).returncode != 0,
               timeout=30, message="attempt 1's NetworkPolicy deleted")
