"""The chart rendered without a cluster: lint, defaults, each documented option, the schema."""

from __future__ import annotations

import pytest
import yaml
from flywheel_operator import kube, vocab
from flywheel_operator.config import OperatorConfig

from .support import CHART, find, helm, one, render

RESTRICTED_CONTAINER = {
    "runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return render()


def operator_container(objs: list[dict]) -> dict:
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def rules_of(role: dict) -> list[dict]:
    return role["rules"]


def allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               for r in rules)


@pytest.mark.parametrize("values", [
    None,
    {"watchNamespaces": ["team-a", "team-b"]},
    {"replicas": 3},
    {"metrics": {"serviceMonitor": {"enabled": True}}},
    {"peering": {"enabled": False}, "replicas": 1},
    {"kueue": {"enabled": True, "defaultQueue": "h200"}},
])
def test_helm_lint_is_clean(values):
    from .support import set_args

    out = helm("lint", "--strict", str(CHART), *set_args(values)).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out


def test_defaults_render_a_restricted_clusterwide_operator(default):
    kinds = sorted(o["kind"] for o in default)
    # The ClusterRoles: the operator's, and the user roles -view, -edit, -release (the
    # admission policies need the API server's capabilities: test_admission.py).
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding",
                            "Service", "Deployment", "ClusterKopfPeering", "Pod",
                            "ClusterRole", "ClusterRole", "ClusterRole",
                            "PodDisruptionBudget"])
    deployment = one(default, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    # production: an active replica and a standby, one kept up through drains
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    pdb = one(default, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(default)
    assert container["securityContext"] == RESTRICTED_CONTAINER
    assert container["image"] == "ghcr.io/flywheel-dev/flywheel-operator:0.1.0"
    assert container["args"] == [
        "--all-namespaces", "--config=/etc/flywheel/operator.yaml", "--peering=flywheel",
        "--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9090"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "health": 8080, "metrics": 9090}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/flywheel"]]["configMap"]["name"] == "fw-flywheel-config"
    assert pod["serviceAccountName"] == one(default, "ServiceAccount")["metadata"]["name"]
    assert one(default, "ClusterKopfPeering")["metadata"]["name"] == "flywheel"
    service = one(default, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_operator_config_has_pool_presets_and_loads(default):
    config = yaml.safe_load(one(default, "ConfigMap")["data"]["operator.yaml"])
    assert config["defaultImage"] == "ghcr.io/flywheel-dev/flywheel-trainer:0.1.0"
    loaded = OperatorConfig.model_validate(config)
    h200 = loaded.pools["h200"]
    assert h200.nodeSelector == {"flywheel.dev/pool": "h200"} and h200.gpusPerNode == 8
    assert h200.tolerations[0].key == "nvidia.com/gpu"
    assert loaded.pools["cpu"].gpusPerNode == 0
    assert loaded.defaultPool == "h200" and loaded.preflightPool == "cpu"


def test_extra_pools_and_trainer_image_reach_the_operator_config():
    objs = render({
        "trainerImage": {"repository": "registry.acme.dev/flywheel-trainer", "tag": "2026.11"},
        "config": {"defaultPool": "h100", "preflightPool": "cpu", "pools": {
            "h100": {"nodeSelector": {"gpu": "h100"}, "gpusPerNode": 8, "gpuHourPrice": 2.5,
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                      "effect": "NoSchedule"}],
                     "resources": {"cpu": "96", "memory": "1500Gi"}},
            # Helm merges maps with the defaults: null removes a preset's key.
            "cpu": {"nodeSelector": {"flywheel.dev/pool": None, "pool": "general"}}}},
    })
    loaded = OperatorConfig.model_validate(
        yaml.safe_load(one(objs, "ConfigMap")["data"]["operator.yaml"]))
    assert loaded.defaultImage == "registry.acme.dev/flywheel-trainer:2026.11"
    assert loaded.defaultPool == "h100" and loaded.pools["h100"].resources.memory == "1500Gi"
    assert loaded.pools["cpu"].nodeSelector == {"pool": "general"}
    assert "h200" in loaded.pools  # built-in presets stay available
    # A config change rolls the operator's pods.
    before = one(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    after = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/config"] != after["checksum/config"]


# Every grant, deliberately: a change to the chart's RBAC must change this table too.
NAMESPACED_GRANTS = {
    ("flywheel.dev", "finetuneruns"): {"get", "list", "watch", "create", "delete"},
    ("flywheel.dev", "finetuneschedules"): {"get", "list", "watch"},
    ("flywheel.dev", "modelversions"): {"get", "list", "watch", "create"},
    ("flywheel.dev", "models"): {"get", "list", "watch", "create"},
    ("flywheel.dev", "finetuneruns/status"): {"patch"},
    ("flywheel.dev", "finetuneschedules/status"): {"patch"},
    ("flywheel.dev", "models/status"): {"patch"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch", "delete"},
    ("", "services"): {"get", "create", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("apps", "deployments"): {"get", "list", "patch"},
    ("serving.kserve.io", "inferenceservices"): {"get", "patch"},
}
CLUSTERWIDE_EXTRA = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
}


def grants(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames tricks
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_clusterrole_is_least_privilege(default):
    rules = rules_of(one(default, "ClusterRole", "fw-flywheel"))
    granted = grants(rules)
    assert granted == {**NAMESPACED_GRANTS, **CLUSTERWIDE_EXTRA}
    assert not any(resource == "secrets" or "*" in (group, resource)
                   or "*" in verbs for (group, resource), verbs in granted.items())
    # Every kind the operator reaches through kube.py is covered (Workloads: with Kueue on).
    groups = {"Service": "", "Job": "batch", "Pod": "", "Deployment": "apps",
              "NetworkPolicy": "networking.k8s.io", "InferenceService": "serving.kserve.io"}
    for kind, plural in kube.PLURALS.items():
        if kind != "Workload":
            assert (groups.get(kind, vocab.GROUP), plural) in granted, kind
    # The operator writes its custom objects' status only, and never writes pods.
    assert "patch" not in granted[("flywheel.dev", "finetuneruns")]
    assert "patch" not in granted[("flywheel.dev", "models")]
    assert granted[("", "pods")] == {"get", "list", "watch"}
    assert ("", "namespaces") not in granted  # clusterwide kopf does not list them


def test_watch_namespaces_uses_roles():
    objs = render({"watchNamespaces": ["team-a", "team-b"]})
    roles, bindings = find(objs, "Role"), find(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fw-flywheel",
                                        "namespace": "flywheel-system"}]
    for role in roles:
        assert grants(role["rules"]) == {
            **NAMESPACED_GRANTS, ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"}}
    # The only cluster-scoped grant: what kopf needs to start (CRDs, namespace names).
    cluster_role = one(objs, "ClusterRole", "fw-flywheel-discovery")
    assert {res for r in cluster_role["rules"] for res in r["resources"]} == {
        "customresourcedefinitions", "namespaces"}
    assert {v for r in cluster_role["rules"] for v in r["verbs"]} == {"list", "watch"}
    assert not find(objs, "ClusterKopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in find(objs, "KopfPeering")) == [
        "team-a", "team-b"]
    args = operator_container(objs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args


KUEUE_GRANTS = {
    ("kueue.x-k8s.io", "workloads"): {"get", "list", "watch", "patch"},
    ("kueue.x-k8s.io", "localqueues"): {"get", "list", "watch"},
    ("visibility.kueue.x-k8s.io", "localqueues/pendingworkloads"): {"get"},
}


def test_kueue_is_off_by_default(default):
    config = yaml.safe_load(one(default, "ConfigMap")["data"]["operator.yaml"])
    assert "kueue" not in config
    assert not any(group.endswith("kueue.x-k8s.io")
                   for group, _ in grants(rules_of(one(default, "ClusterRole", "fw-flywheel"))))


def test_kueue_values_set_the_default_queues_and_read_workloads():
    values = {"kueue": {"enabled": True, "defaultQueue": "h200",
                        "namespaceQueues": {"team-a": "team-a-h200"}}}
    objs = render(values)
    config = yaml.safe_load(one(objs, "ConfigMap")["data"]["operator.yaml"])
    assert config["kueue"] == values["kueue"]
    kueue = OperatorConfig.model_validate(config).kueue
    assert kueue.queue("team-a", None) == "team-a-h200" and kueue.queue("other", None) == "h200"
    assert grants(rules_of(one(objs, "ClusterRole", "fw-flywheel"))) == {
        **NAMESPACED_GRANTS, **CLUSTERWIDE_EXTRA, **KUEUE_GRANTS}
    # Namespaced mode: the same grants in each watched namespace's Role.
    objs = render({**values, "watchNamespaces": ["team-a"]})
    assert grants(one(objs, "Role")["rules"]) == {
        **NAMESPACED_GRANTS, **KUEUE_GRANTS,
        ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"}}


@pytest.mark.parametrize(("flag", "complaint"), [
    (["--set", "kueue.defaultQueue=H200"], "/kueue/defaultQueue"),
    (["--set", "kueue.enabled=yes"], "/kueue/enabled"),
    (["--set", "kueue.namespaceQueues.team-a=Bad_Queue"], "/kueue/namespaceQueues/team-a"),
    (["--set", "kueue.queue=h200"], "additional properties 'queue' not allowed"),
])
def test_schema_rejects_bad_kueue_values(flag, complaint):
    proc = helm("template", "fw", str(CHART), *flag, check=False)
    assert proc.returncode != 0, f"{flag} was accepted"
    assert complaint in proc.stderr, proc.stderr


def test_replicas_above_one_use_peering_and_a_rolling_update():
    objs = render({"replicas": 3, "peering": {"name": "flywheel-ha"}})
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0,
                                                               "maxUnavailable": 1}
    assert "--peering=flywheel-ha" in operator_container(objs)["args"]
    assert one(objs, "ClusterKopfPeering")["metadata"]["name"] == "flywheel-ha"
    env = {e["name"]: e for e in operator_container(objs)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_standalone_when_peering_is_off_and_refused_with_replicas():
    objs = render({"peering": {"enabled": False}, "replicas": 1})
    assert "--standalone" in operator_container(objs)["args"]
    assert not find(objs, "PodDisruptionBudget")
    assert one(objs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(objs, "ClusterKopfPeering")
    assert not allows(one(objs, "ClusterRole", "fw-flywheel")["rules"], "kopf.dev",
                      "clusterkopfpeerings", "get")
    proc = helm("template", "fw", str(CHART), "--set", "replicas=2", "--set",
                "peering.enabled=false", check=False)
    assert proc.returncode != 0 and "replicas > 1 needs peering.enabled=true" in proc.stderr


def test_service_monitor_is_optional():
    assert not find(render(), "ServiceMonitor")
    objs = render({"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s",
                                                  "labels": {"release": "prom"}}}})
    monitor = one(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                             "interval": "15s", "scrapeTimeout": "10s"}]
    service = one(objs, "Service")
    assert all(service["metadata"]["labels"][k] == v
               for k, v in monitor["spec"]["selector"]["matchLabels"].items())


def test_metrics_off_drops_service_and_test_pod():
    objs = render({"metrics": {"enabled": False}})
    assert not find(objs, "Service") and not find(objs, "Pod")
    assert "--metrics-port=0" in operator_container(objs)["args"]


def test_scheduling_and_image_values():
    objs = render({
        "image": {"repository": "registry.acme.dev/flywheel-operator", "tag": "1.2.3",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"flywheel.dev/pool": "cpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops",
                         "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "system-cluster-critical",
    })
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"flywheel.dev/pool": "cpu"}
    assert pod["tolerations"][0]["key"] == "dedicated" and pod["affinity"] == {"nodeAffinity": {}}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    container = operator_container(objs)
    assert container["image"] == "registry.acme.dev/flywheel-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"


def test_helm_test_pod_is_restricted_and_not_selected_by_the_service(default):
    pod = one(default, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"] == RESTRICTED_CONTAINER
    assert "fw-flywheel-metrics.flywheel-system.svc:9090/metrics" in container["args"][0]
    selector = one(default, "Service")["spec"]["selector"]
    assert not all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())


def test_storage_defaults_reach_the_operator_config():
    storage = {"s3": {"endpoint": "https://minio.storage:9000", "region": "us-east-1",
                      "credentialsSecret": "s3-keys"},
               "gcs": {"keySecretRef": {"name": "gcp-sa", "key": "key.json"}},
               "serviceAccountName": "flywheel-trainer"}
    objs = render({"config": {"storage": storage}})
    loaded = OperatorConfig.model_validate(
        yaml.safe_load(one(objs, "ConfigMap")["data"]["operator.yaml"]))
    assert loaded.storage.model_dump(exclude_none=True) == storage


@pytest.mark.parametrize(("flag", "complaint"), [
    (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
    (["--set", "image.tags=latest"], "additional properties 'tags' not allowed"),
    (["--set", "config.pools.h200.gpus=8"], "additional properties 'gpus' not allowed"),
    (["--set", "replicas=two"], "/replicas"),
    (["--set-json", "watchNamespaces=\"team-a\""], "/watchNamespaces"),
    (["--set", "config.pools.h200.gpusPerNode=-1"], "/config/pools/h200/gpusPerNode"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "metrics.serviceMonitor.enabled=yes"], "/metrics/serviceMonitor/enabled"),
    (["--set", "config.storage.s3.accessKey=AKIA"], "additional properties 'accessKey'"),
    (["--set", "config.storage.s3.endpoint=ftp://x"], "/config/storage/s3/endpoint"),
])
def test_schema_rejects_unknown_keys_and_wrong_types(flag, complaint):
    proc = helm("template", "fw", str(CHART), *flag, check=False)
    assert proc.returncode != 0, f"{flag} was accepted"
    assert complaint in proc.stderr, proc.stderr


def test_unknown_default_pool_is_refused():
    proc = helm("template", "fw", str(CHART), "--set", "config.defaultPool=a100", check=False)
    assert proc.returncode != 0 and 'config.defaultPool "a100"' in proc.stderr


def test_chart_ships_the_flywheel_and_kopf_peering_crds():
    # `helm show crds` concatenates the files helm will install (no separators between files).
    shown = helm("show", "crds", str(CHART)).stdout
    generated = {yaml.safe_load(p.read_text())["metadata"]["name"]
                 for p in (CHART.parents[1] / "crds").glob("*.yaml")}
    for name in generated | {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}:
        assert f"\n  name: {name}\n" in shown, name
    peering = list(yaml.safe_load_all((CHART / "crds" / "kopf-peering.yml").read_text()))
    assert {(d["spec"]["names"]["kind"], d["spec"]["scope"]) for d in peering} == {
        ("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")}
