"""The chart's admission policies and user roles. Rendered (no cluster): what they hold. On the
local control plane, as users the API server authenticates (impersonation, RBAC): a
`flywheel-edit` user submits runs and reads the registry, and is refused ModelVersions, status
writes and anything outside the admin's policy, with messages naming the rule; even a user
with every Flywheel permission cannot write the registry past the admission policy.

Each cluster test applies the rendered cluster-scoped objects under a unique name, with the
bindings selecting only its own namespace, and deletes them afterwards.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from flywheel_operator import config as operator_config
from flywheel_operator.api import ModelVersionSpec
from flywheel_operator.config import OperatorConfig

from tests.conftest import Cluster, wait_until
from tests.integration.test_operator import manifest

from .support import CHART, find, helm, one, set_args

VAP = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"
POLICY = {"allowedImages": ["registry.acme.dev/ml/"], "namespacePools": {"*": ["h200", "cpu"]}}


def render(values: dict | None = None, release: str = "fw", namespace: str = "flywheel-system",
           capable: bool = True) -> list[dict]:
    """`helm template` as against a cluster that serves ValidatingAdmissionPolicy."""
    flags = ["--api-versions", VAP] if capable else []
    out = helm("template", release, str(CHART), "--namespace", namespace, *flags,
               *set_args(values)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# --- rendered ------------------------------------------------------------------------------------


def test_policies_are_on_by_default_where_the_cluster_serves_them():
    objs = render()
    assert {p["metadata"]["name"] for p in find(objs, "ValidatingAdmissionPolicy")} == {
        "fw-flywheel-runs", "fw-flywheel-registry"}
    for binding in find(objs, "ValidatingAdmissionPolicyBinding"):
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert "matchResources" not in binding["spec"]  # every namespace
    registry = one(objs, "ValidatingAdmissionPolicy", "fw-flywheel-registry")["spec"]
    assert registry["failurePolicy"] == "Fail"
    assert json.loads(registry["variables"][0]["expression"]) == [
        "system:serviceaccount:flywheel-system:fw-flywheel"]
    assert {r for rule in registry["matchConstraints"]["resourceRules"]
            for r in rule["resources"]} == {"modelversions", "finetuneruns/status",
                                            "models/status", "finetuneschedules/status"}
    # No API, or turned off: nothing rendered.
    assert not find(render(capable=False), "ValidatingAdmissionPolicy")
    assert not find(render({"admissionPolicy": {"enabled": False}}), "ValidatingAdmissionPolicy")


def test_bindings_follow_watch_namespaces_or_the_selector():
    objs = render({"watchNamespaces": ["team-a", "team-b"]})
    for binding in find(objs, "ValidatingAdmissionPolicyBinding"):
        assert binding["spec"]["matchResources"]["namespaceSelector"] == {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In",
             "values": ["team-a", "team-b"]}]}
    selector = {"matchLabels": {"flywheel.dev/tenant": "true"}}
    objs = render({"admissionPolicy": {"namespaceSelector": selector,
                                       "registryWriters": ["system:serviceaccount:ops:migrate"]}})
    for binding in find(objs, "ValidatingAdmissionPolicyBinding"):
        assert binding["spec"]["matchResources"]["namespaceSelector"] == selector
    writers = one(objs, "ValidatingAdmissionPolicy", "fw-flywheel-registry")["spec"]["variables"]
    assert "system:serviceaccount:ops:migrate" in json.loads(writers[0]["expression"])


def test_the_charts_pool_presets_are_the_operators():
    a100 = {"nodeSelector": {"gpu": "a100"}, "gpusPerNode": 4,
            "tolerations": [{"key": "dedicated", "operator": "Exists"}]}
    objs = render({"config": {"pools": {"a100": a100}}})
    spec = one(objs, "ValidatingAdmissionPolicy", "fw-flywheel-runs")["spec"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    selectors, gpus = json.loads(variables["selectors"]), json.loads(variables["gpus"])
    for name, pool in operator_config.PRESETS.items():
        assert selectors[name] == pool.nodeSelector and gpus[name] == pool.gpusPerNode, name
    assert selectors["a100"] == {"gpu": "a100"} and gpus["a100"] == 4
    assert json.loads(variables["fences"]) == ["dedicated", "nvidia.com/gpu"]


def test_user_roles_never_write_the_registry_or_status():
    objs = render()
    view, edit, release = (one(objs, "ClusterRole", f"fw-flywheel-{n}")
                           for n in ("view", "edit", "release"))
    labels = "rbac.authorization.k8s.io/aggregate-to-"
    assert view["metadata"]["labels"][labels + "view"] == "true"
    assert edit["metadata"]["labels"][labels + "edit"] == "true"
    assert release["metadata"]["labels"][labels + "admin"] == "true"

    def grants(role):
        return {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}

    reads = {(res, v) for res in ("finetuneruns", "finetuneschedules", "models", "modelversions")
             for v in ("get", "list", "watch")}
    assert grants(view) == reads
    writes = {"create", "update", "patch", "delete"}
    assert grants(edit) == reads | {(res, v) for res in ("finetuneruns", "finetuneschedules")
                                    for v in writes}
    assert grants(release) == reads | {("models", v) for v in writes - {"delete"}}
    for role in (view, edit, release):
        assert not any(res.endswith("/status") or res == "*" or (res == "modelversions"
                                                                 and verb not in ("get", "list",
                                                                                  "watch"))
                       for res, verb in grants(role))
    assert not find(render({"rbac": {"userRoles": False}}), "ClusterRole", "fw-flywheel-edit")


def test_operator_config_admits_the_charts_operator_pods_to_the_progress_port():
    objs = render(namespace="ops")
    config = OperatorConfig.model_validate(
        yaml.safe_load(one(objs, "ConfigMap")["data"]["operator.yaml"]))
    assert config.networkPolicy.enabled
    assert config.networkPolicy.operatorPeers == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
        "podSelector": {"matchLabels": one(objs, "Deployment")["spec"]["selector"][
            "matchLabels"]}}]
    policy = {**POLICY, "maxNodes": 4, "allowRunSecrets": False, "allowedSecrets": ["comet"]}
    config = OperatorConfig.model_validate(yaml.safe_load(one(
        render({"config": {"policy": policy}}), "ConfigMap")["data"]["operator.yaml"]))
    assert config.policy.model_dump(exclude_defaults=True) == policy


@pytest.mark.parametrize(("flag", "complaint"), [
    (["--set", "config.policy.maxNodes=0"], "/config/policy/maxNodes"),
    (["--set", "config.policy.allowedImages=evil"], "/config/policy/allowedImages"),
    (["--set-json", 'config.policy.namespacePools={"Team_A":["h200"]}'],
     "'Team_A' does not match pattern"),
    (["--set", "config.policy.allowAll=true"], "additional properties 'allowAll' not allowed"),
    (["--set", "config.pools.h200.shmSize=lots"], "/config/pools/h200/shmSize"),
    (["--set", "admissionPolicy.enabled=yes"], "/admissionPolicy/enabled"),
])
def test_schema_rejects_bad_policy_values(flag, complaint):
    proc = helm("template", "fw", str(CHART), *flag, check=False)
    assert proc.returncode != 0, f"{flag} was accepted"
    assert complaint in proc.stderr, proc.stderr


# --- on the local control plane, as authenticated users ------------------------------------------


class Policies:
    """The chart's admission policies and user roles, applied under a unique name and bound
    only in one namespace."""

    def __init__(self, cluster: Cluster, namespace: str, policy: dict):
        self.cluster, self.namespace = cluster, namespace
        self.name = f"fwt-{uuid.uuid4().hex[:6]}"
        values = {"fullnameOverride": self.name, "config": {"policy": policy},
                  "admissionPolicy": {"namespaceSelector": {"matchLabels": {
                      "kubernetes.io/metadata.name": namespace}}}}
        self.objects = [o for o in render(values, namespace="flywheel-system")
                        if o["kind"] in ("ValidatingAdmissionPolicy",
                                         "ValidatingAdmissionPolicyBinding", "ClusterRole")
                        and o["metadata"]["name"] != self.name]  # not the operator's own
        self.operator = f"system:serviceaccount:flywheel-system:{self.name}"

    def apply(self) -> None:
        self.cluster.apply(self.objects)
        # The API server enforces a policy once its type checks ran (status.observedGeneration).
        for obj in find(self.objects, "ValidatingAdmissionPolicy"):
            wait_until(lambda o=obj: self.cluster.get(
                "validatingadmissionpolicy", o["metadata"]["name"]).get("status", {}).get(
                "observedGeneration"), timeout=30, message="policy type-checked")
        for obj in find(self.objects, "ValidatingAdmissionPolicy"):
            warnings = self.cluster.get("validatingadmissionpolicy", obj["metadata"]["name"])[
                "status"].get("typeChecking", {}).get("expressionWarnings")
            assert not warnings, warnings

    def delete(self) -> None:
        for obj in self.objects:
            self.cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"],
                                 "--ignore-not-found", check=False)

    def bind(self, user: str, role: str) -> None:
        self.cluster.kubectl("create", "rolebinding", f"{user}-{role.rsplit('-', 1)[-1]}",
                             "-n", self.namespace, f"--clusterrole={role}", f"--user={user}")


@pytest.fixture
def policies(cluster: Cluster, crds: Cluster, namespace: str):
    applied: list[Policies] = []

    def _apply(policy: dict) -> Policies:
        p = Policies(cluster, namespace, policy)
        applied.append(p)
        p.apply()
        return p

    yield _apply
    for p in applied:
        p.delete()


def as_user(cluster: Cluster, user: str, *args: str, input: dict | None = None):
    return cluster.kubectl("--as", user, *args, input=json.dumps(input) if input else None,
                           check=False)


def create(cluster: Cluster, user: str, namespace: str, obj: dict, dry_run: bool = True):
    return as_user(cluster, user, "create", "-n", namespace, "-f", "-",
                   *(["--dry-run=server"] if dry_run else []), input=obj)


def model_version() -> dict:
    """A well-formed ModelVersion (flow-agent-v9) of weights no run produced."""
    spec = ModelVersionSpec(
        modelName="flow-agent", version=9, baseModel="hf://Qwen/Qwen3-32B",
        artifact={"uri": "s3://evil/weights/", "digest": "sha256:" + "e" * 64},
        sourceRun={"name": "forged", "uid": str(uuid.uuid4())},
        dataset={"train": "s3://data/flow/train.jsonl"}, metrics={"eval_loss": 0.01})
    return {"apiVersion": "flywheel.dev/v1alpha1", "kind": "ModelVersion",
            "metadata": {"name": "flow-agent-v9", "labels": {"flywheel.dev/model": "flow-agent"}},
            "spec": spec.model_dump(mode="json", exclude_none=True)}


def schedule(spec: dict) -> dict:
    return {"apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneSchedule",
            "metadata": {"name": "weekly"},
            "spec": {"schedule": "0 3 * * 1", "runTemplate": {"spec": spec}}}


def test_an_edit_user_runs_and_reads_but_cannot_forge_or_step_outside_the_policy(
        cluster, policies, namespace):
    p = policies(POLICY)
    p.bind("alice", f"{p.name}-edit")
    ok = manifest("ok", image="registry.acme.dev/ml/trainer:1.2")
    proc = create(cluster, "alice", namespace, ok)
    assert proc.returncode == 0, proc.stderr
    assert as_user(cluster, "alice", "get", "mv,model", "-n", namespace).returncode == 0

    # Forged records: RBAC refuses them to an edit user.
    proc = create(cluster, "alice", namespace, model_version())
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
    cluster.apply(manifest("real", suspend=True), namespace)
    proc = as_user(cluster, "alice", "patch", "ftr", "real", "-n", namespace,
                   "--subresource=status", "--type=merge",
                   "-p", '{"status":{"phase":"Succeeded"}}')
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr

    # Outside the policy: the admission policy refuses, naming the rule and the field.
    refusals = {
        "policy.allowedImages: spec.image docker.io/evil/miner:1 is not an allowed trainer "
        "image (allowed: registry.acme.dev/ml/, the default image":
            manifest("img", image="docker.io/evil/miner:1"),
        "spec.resources.nodePool: unknown node pool a100; pools namespace "
        f"{namespace} may use: h200, cpu": manifest("pool", resources={
            "nodes": 1, "gpusPerNode": 8, "nodePool": "a100"}),
        "policy.namespacePools: spec.resources.nodePool: namespace "
        f"{namespace} may not use pool local": manifest("local", resources={
            "nodes": 1, "gpusPerNode": 8, "nodePool": "local"}),
        "pool boundary: spec.resources.nodeSelector may narrow pool cpu, never leave it: the "
        "pool selects flywheel.dev/pool=cpu": manifest("escape", resources={
            "nodes": 1, "gpusPerNode": 8, "nodePool": "cpu",
            "nodeSelector": {"flywheel.dev/pool": "h200"}}),
        "pool boundary: spec.resources.tolerations may not tolerate every taint or "
        "nvidia.com/gpu": manifest("tolerate", resources={
            "nodes": 1, "gpusPerNode": 8, "nodePool": "cpu",
            "tolerations": [{"operator": "Exists"}]}),
        "policy.allowedImages: spec.runTemplate.spec.image docker.io/evil/miner:1":
            schedule(manifest("x", image="docker.io/evil/miner:1")["spec"]),
    }
    for message, obj in refusals.items():
        # the API server's admission informers see a new policy's binding a moment after it
        # is type-checked: allow them that moment, then the refusal must hold
        proc = wait_until(lambda obj=obj: (r := create(cluster, "alice", namespace, obj))
                          .returncode != 0 and r, timeout=30,
                          message=f"{obj['metadata']['name']} refused")
        assert f"ValidatingAdmissionPolicy '{p.name}-runs'" in proc.stderr, proc.stderr
        assert message in proc.stderr, proc.stderr
    # A run within the pool's bounds (narrowing it) and a schedule within the policy pass.
    narrow = manifest("narrow", resources={"nodes": 1, "gpusPerNode": 8, "nodePool": "cpu",
                                           "nodeSelector": {"zone": "a"}})
    for obj in (narrow, schedule(ok["spec"])):
        proc = create(cluster, "alice", namespace, obj)
        assert proc.returncode == 0, proc.stderr
    # Suspending a run is not a new request for an image: it passes.
    proc = as_user(cluster, "alice", "patch", "ftr", "real", "-n", namespace, "--type=merge",
                   "-p", '{"spec":{"suspend":false}}')
    assert proc.returncode == 0, proc.stderr


def test_only_the_operator_writes_the_registry_whatever_a_user_may(cluster, policies, namespace):
    p = policies({})
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "flywheel-all"},
                   "rules": [{"apiGroups": ["flywheel.dev"], "resources": ["*"],
                              "verbs": ["*"]}]}, namespace)
    for user in ("bob", p.operator):
        cluster.kubectl("create", "rolebinding", f"all-{uuid.uuid4().hex[:4]}", "-n", namespace,
                        "--role=flywheel-all", f"--user={user}")
    cluster.apply(manifest("real", suspend=True), namespace)
    # (polled: the admission informers see a new binding a moment after it is type-checked)
    proc = wait_until(lambda: (r := create(cluster, "bob", namespace, model_version()))
                      .returncode != 0 and r, timeout=30, message="bob's forgery refused")
    assert (f"ValidatingAdmissionPolicy '{p.name}-registry'" in proc.stderr
            and f"registry: only the Flywheel operator ({p.operator}) may create or change "
            "ModelVersions; bob may not" in proc.stderr), proc.stderr
    proc = as_user(cluster, "bob", "patch", "ftr", "real", "-n", namespace,
                   "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Failed"}}')
    assert proc.returncode != 0, "bob wrote a run's status"
    assert "may write the status of finetuneruns; bob may not" in proc.stderr, proc.stderr
    # The operator's own ServiceAccount passes.
    assert create(cluster, p.operator, namespace, model_version()).returncode == 0
    proc = as_user(cluster, p.operator, "patch", "ftr", "real", "-n", namespace,
                   "--subresource=status", "--type=merge", "-p", '{"status":{"message":"hi"}}')
    assert proc.returncode == 0, proc.stderr


def test_the_roles_aggregate_into_the_built_in_ones(cluster, policies, namespace):
    p = policies({})
    cluster.kubectl("create", "rolebinding", "carol-edit", "-n", namespace,
                    "--clusterrole=edit", "--user=carol")

    def can(verb: str, resource: str, *flags: str) -> bool:
        proc = cluster.kubectl("auth", "can-i", verb, resource, *flags, "-n", namespace,
                               "--as", "carol", check=False)
        return proc.stdout.strip() == "yes"

    wait_until(lambda: can("create", "finetuneruns.flywheel.dev"), timeout=30,
               message=f"{p.name}-edit aggregated into edit")
    assert can("list", "modelversions.flywheel.dev")
    assert not can("create", "modelversions.flywheel.dev")
    assert can("patch", "finetuneruns.flywheel.dev")
    assert not can("patch", "finetuneruns.flywheel.dev", "--subresource=status")
