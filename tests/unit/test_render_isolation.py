"""What fences and bounds a run's pods (isolation.py through render): the namespace's fence
and a gang's NetworkPolicy, /dev/shm and the model cache with size limits, pool memory
limits, the Hub token by reference, the dataset line cap, and scheduling that never leaves
the pool."""

from __future__ import annotations

import json

from flywheel_operator import isolation, render
from flywheel_operator.config import OperatorConfig

from .conftest_data import make_run

CONFIG = OperatorConfig()


def _attempt(run: dict, config: OperatorConfig = CONFIG) -> dict[str, dict]:
    return {o["kind"]: o for o in render.attempt_objects(run, 1, config)}


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def _env(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "flywheel-system"}},
          "podSelector": {"matchLabels": {"app.kubernetes.io/name": "flywheel"}}}]


def test_the_namespaces_fence_admits_only_the_operator_to_every_trainer_pod():
    config = OperatorConfig.model_validate({"networkPolicy": {"operatorPeers": PEERS}})
    fence = isolation.namespace_fence(config)
    assert fence["apiVersion"] == "networking.k8s.io/v1"
    assert fence["metadata"] == {"name": "flywheel-trainers",
                                 "labels": {"app.kubernetes.io/managed-by": "flywheel-operator"}}
    assert "ownerReferences" not in fence["metadata"]  # outlives every run
    assert fence["spec"] == {
        "podSelector": {"matchLabels": {"flywheel.dev/component": "trainer",
                                        "app.kubernetes.io/managed-by": "flywheel-operator"}},
        "policyTypes": ["Ingress"],  # egress open: stores, the Hub, Comet
        "ingress": [{"from": PEERS, "ports": [{"protocol": "TCP", "port": 9400}]}]}
    # It selects every attempt's pods, of one node or many, and no preflight pod.
    one, many = (_attempt(make_run(resources={"nodes": n, "gpusPerNode": 8}), config)
                 for n in (1, 2))
    for objs in (one, many):
        labels = objs["Job"]["spec"]["template"]["metadata"]["labels"]
        assert fence["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (pre,) = [o for o in render.preflight_objects(make_run(), config) if o["kind"] == "Job"]
    assert pre["spec"]["template"]["metadata"]["labels"]["flywheel.dev/component"] == "preflight"
    # Without peers the progress port is open to any source; turned off, no fence.
    assert isolation.namespace_fence(CONFIG)["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 9400}]}]
    assert isolation.namespace_fence(
        OperatorConfig.model_validate({"networkPolicy": {"enabled": False}})) is None


def test_a_gangs_network_policy_admits_only_the_attempts_own_pods():
    config = OperatorConfig.model_validate({"networkPolicy": {"operatorPeers": PEERS}})
    objs = _attempt(make_run(resources={"nodes": 2, "gpusPerNode": 8}), config)
    netpol, job = objs["NetworkPolicy"], objs["Job"]
    assert list(objs) == ["Service", "NetworkPolicy", "Job"]  # the Job last
    assert netpol["apiVersion"] == "networking.k8s.io/v1"
    assert netpol["metadata"]["name"] == job["metadata"]["name"] == "qwen-w48-a1"
    # Owned by the run: deleted with it (and with its attempt: render.attempt_children).
    assert netpol["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert ("NetworkPolicy", "qwen-w48-a1") in [
        (c.kind, c.name) for c in render.attempt_children("qwen-w48", 1)]
    attempt = {"flywheel.dev/run": "qwen-w48", "flywheel.dev/attempt": "1"}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in attempt.items())
    assert netpol["spec"] == {  # the operator's port: the namespace's fence (policies add up)
        "podSelector": {"matchLabels": attempt},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": attempt}}]}]}
    # Another attempt of the same run is a stranger.
    second = {o["kind"]: o for o in render.attempt_objects(
        make_run(resources={"nodes": 2, "gpusPerNode": 8}), 2, config)}
    assert second["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"][
        "flywheel.dev/attempt"] == "2"
    # A one-node attempt has none of its own; policies turned off, no attempt has one.
    assert list(_attempt(make_run(resources={"nodes": 1, "gpusPerNode": 8}), config)) == ["Job"]
    off = OperatorConfig.model_validate({"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in _attempt(make_run(resources={"nodes": 2, "gpusPerNode": 8}),
                                           off)


def test_shm_and_cache_are_size_limited_and_the_cache_holds_every_download():
    job = _attempt(make_run())["Job"]
    pod = _pod(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "256Gi"}  # no preflight figure yet
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["cache"] == "/var/cache/flywheel"
    env = _env(pod)
    for name, value in (("FLYWHEEL_MODEL_CACHE", "/var/cache/flywheel/models"),
                        ("HF_HOME", "/var/cache/flywheel/hf"), ("TMPDIR", "/var/cache/flywheel"),
                        ("FLYWHEEL_MAX_LINE_BYTES", str(16 * 2**20))):
        assert env[name] == {"name": name, "value": value}


def test_the_cache_is_sized_from_the_model_preflight_measured():
    run = make_run(status={"preflight": {"phase": "Succeeded", "parameters": 32_800_000_000}})
    volumes = {v["name"]: v for v in _pod(_attempt(run)["Job"])["volumes"]}
    # 32.8e9 parameters x 4 bytes x 1.25 = 152.7 GiB, rounded up, + 2Gi
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "155Gi"}
    assert isolation.cache_size(CONFIG.pools["h200"], 1000) == "3Gi"
    # The pool's own figure wins.
    assert isolation.cache_size(CONFIG.pools["local"], 32_800_000_000) == "20Gi"


def test_preflight_pod_is_bounded_too():
    (job,) = render.preflight_objects(make_run(), CONFIG)
    pod = _pod(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "10Gi"}  # config and tokenizer only
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "8Gi"  # the cpu pool's
    assert pod["containers"][0]["resources"] == {"requests": {"memory": "32Gi"},
                                                 "limits": {"memory": "32Gi"}}
    assert _env(pod)["FLYWHEEL_MAX_LINE_BYTES"]["value"] == str(16 * 2**20)


def test_pool_presets_have_memory_limits_by_the_gpus_a_pod_asks_for():
    for name, pool in CONFIG.pools.items():
        assert pool.resources.memory or pool.memoryPerGpu, name
    for gpus, memory in ((8, "1600Gi"), (1, "200Gi")):
        run = make_run(resources={"nodes": 1, "gpusPerNode": gpus})
        resources = _pod(_attempt(run)["Job"])["containers"][0]["resources"]
        assert resources["limits"]["memory"] == resources["requests"]["memory"] == memory
    half = OperatorConfig.model_validate({"pools": {"h200": {
        "gpusPerNode": 8, "memoryPerGpu": "1.5Gi", "resources": {"memory": "9Gi"}}}})
    assert isolation.pod_memory(half.pools["h200"], 3) == "4.5Gi"
    assert isolation.pod_memory(half.pools["h200"], 0) == "9Gi"  # no GPUs: per pod


def test_hub_token_by_reference_from_the_run_or_the_config():
    ref = {"name": "hub", "key": "token"}
    config = OperatorConfig.model_validate({"storage": {"hf": {"tokenSecretRef": ref}}})
    expected = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}
    for pod in (_pod(_attempt(make_run(), config)["Job"]),
                _pod(render.preflight_objects(make_run(), config)[-1])):
        assert _env(pod)["HF_TOKEN"] == expected
    own = {"name": "team-hub", "key": "hf"}
    run = make_run(storage={"hf": {"tokenSecretRef": own}})
    assert _env(_pod(_attempt(run, config)["Job"]))["HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": own}
    assert "HF_TOKEN" not in _env(_pod(_attempt(make_run())["Job"]))
    assert "value" not in _env(_pod(_attempt(run, config)["Job"]))["HF_TOKEN"]  # never a value


def test_a_cpu_run_aimed_at_gpu_nodes_stays_on_the_cpu_pool():
    run = make_run(resources={
        "nodes": 1, "gpusPerNode": 8, "nodePool": "cpu",
        "nodeSelector": {"flywheel.dev/pool": "h200", "nvidia.com/gpu.product": "NVIDIA-H200"},
        "tolerations": [{"operator": "Exists"},
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    pod = _pod(_attempt(run)["Job"])
    assert pod["nodeSelector"]["flywheel.dev/pool"] == "cpu"
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
