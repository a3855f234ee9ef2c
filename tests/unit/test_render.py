"""Rendering an attempt's children (and the preflight Job): every invariant, no cluster."""

from __future__ import annotations

import json
import re

import pytest
from flywheel_operator import render, vocab
from flywheel_operator.config import OperatorConfig
from flywheel_trainer.config import TrainerConfig

from .conftest_data import make_run

CONFIG = OperatorConfig()
COMET = {
    "comet": {
        "workspace": "acme",
        "project": "flow-agent",
        "apiKeySecretRef": {"name": "comet", "key": "api-key"},
    }
}


def _objects(run=None, attempt=1, config=CONFIG):
    """The trainer's config (as the pod reads it), Service (None for one node) and Job of an
    attempt."""
    objs = {o["kind"]: o for o in render.attempt_objects(run or _run(), attempt, config)}
    return _trainer_config(objs["Job"]), objs.get("Service"), objs["Job"]


def _trainer_config(job):
    """The TrainerConfig JSON a Job's pods get: their template's annotation, parsed."""
    return json.loads(job["spec"]["template"]["metadata"]["annotations"][render.CONFIG_ANNOTATION])


#: The pod's "config" volume: the kubelet writes the pod's own config annotation as the file
#: config.json, mounted at /etc/flywheel (the trainer's --config).
CONFIG_VOLUME = {"name": "config", "downwardAPI": {"items": [{"path": "config.json", "fieldRef": {
    "fieldPath": "metadata.annotations['flywheel.dev/trainer-config']"}}]}}


def _run(**spec):
    spec.setdefault("resources", {"nodes": 4, "gpusPerNode": 8})
    spec.setdefault("tracking", COMET)
    return make_run(**spec)


def _pod(job):
    return job["spec"]["template"]["spec"]


def _container(job):
    (container,) = _pod(job)["containers"]
    return container


def _env(job):
    return {e["name"]: e for e in _container(job)["env"]}


def test_kinds_names_and_order():
    objs = render.attempt_objects(_run(), 2, CONFIG)
    assert [o["kind"] for o in objs] == ["Service", "NetworkPolicy", "Job"]  # the Job last
    assert [o["metadata"]["name"] for o in objs] == ["qwen-w48-a2"] * 3
    assert [(c.kind, c.name) for c in render.attempt_children("qwen-w48", 2)] == [
        ("Service", "qwen-w48-a2"), ("NetworkPolicy", "qwen-w48-a2"), ("Job", "qwen-w48-a2")]
    assert all(o["metadata"]["namespace"] == "ml" for o in objs)


def test_rendering_is_deterministic():
    assert _objects() == _objects()


def test_owner_references_and_labels_everywhere():
    run = _run()
    for obj in render.attempt_objects(run, 3, CONFIG):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "flywheel.dev/v1alpha1",
            "kind": "FineTuneRun",
            "name": "qwen-w48",
            "uid": run.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        labels = obj["metadata"]["labels"]
        assert labels["flywheel.dev/run"] == "qwen-w48"
        assert labels["flywheel.dev/attempt"] == "3"
        assert labels["app.kubernetes.io/managed-by"] == "flywheel-operator"
    job = _objects(run, attempt=3)[2]
    tmpl = job["spec"]["template"]["metadata"]["labels"]
    assert tmpl["flywheel.dev/run"] == "qwen-w48" and tmpl["flywheel.dev/attempt"] == "3"


def test_indexed_job_shape():
    job = _objects()[2]
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["completionMode"] == "Indexed" and spec["backoffLimit"] == 0
    assert _pod(job)["restartPolicy"] == "Never"
    assert _pod(job)["subdomain"] == "qwen-w48-a1"


def test_one_node_rendezvous_on_its_own_loopback_without_a_service():
    # At a fleet's scale a Service (and its EndpointSlice) and a NetworkPolicy per one-node
    # run are objects and API requests per run for nothing: torchrun's store is on the pod
    # itself, and the namespace's fence covers it.
    objs = render.attempt_objects(_run(resources={"nodes": 1, "gpusPerNode": 8}), 1, CONFIG)
    assert [o["kind"] for o in objs] == ["Job"]
    job = objs[-1]
    assert "subdomain" not in _pod(job)
    assert "--master-addr=127.0.0.1" in _container(job)["args"]
    assert "--master-addr=qwen-w48-a1-0.qwen-w48-a1.ml.svc" in _container(_objects()[2])["args"]


def test_headless_service_selects_the_attempt():
    svc = _objects(attempt=2)[1]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] == {"flywheel.dev/run": "qwen-w48", "flywheel.dev/attempt": "2"}
    assert svc["ports"][0]["port"] == 29500


def test_torchrun_command():
    job = _objects()[2]
    c = _container(job)
    # torchrun through the launcher that keeps the trainer's exit code 2 (data error)
    assert c["command"] == ["python", "-m", "flywheel_trainer.launch"]
    assert c["args"] == [
        "--nnodes=4",
        "--nproc-per-node=8",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=qwen-w48-a1-0.qwen-w48-a1.ml.svc",
        "--master-port=29500",
        "-m",
        "flywheel_trainer",
        "--config",
        "/etc/flywheel/config.json",
    ]
    # $(JOB_COMPLETION_INDEX) only expands if the variable is declared in env.
    index = _env(job)["JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    names = [e["name"] for e in c["env"]]
    assert names.index("JOB_COMPLETION_INDEX") == 0


def test_gpu_requests_and_scheduling():
    job = _objects(
        _run(
            resources={
                "nodes": 2,
                "gpusPerNode": 4,
                "nodeSelector": {"topology.kubernetes.io/zone": "a"},
                "tolerations": [
                    {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
                ],
            }
        )
    )[2]
    res = _container(job)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "4"
    pod = _pod(job)
    assert pod["nodeSelector"] == {"flywheel.dev/pool": "h200", "topology.kubernetes.io/zone": "a"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_cpu_pool_omits_gpus_and_local_pool_selects_executor():
    cpu = _objects(_run(resources={"nodes": 1, "gpusPerNode": 2, "nodePool": "cpu"}))[2]
    assert "nvidia.com/gpu" not in json.dumps(_container(cpu)["resources"])
    assert "tolerations" not in _pod(cpu)
    local = _objects(_run(resources={"nodes": 2, "gpusPerNode": 1, "nodePool": "local"}))[2]
    assert _pod(local)["nodeSelector"] == {"flywheel.dev/executor": "local"}
    assert _container(local)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_pool_cpu_memory_resources():
    config = OperatorConfig.model_validate(
        {"pools": {"h200": {"gpusPerNode": 8, "resources": {"cpu": "90", "memory": "1000Gi"}}}}
    )
    res = _container(_objects(config=config)[2])["resources"]
    assert res["requests"] == {"cpu": "90", "memory": "1000Gi", "nvidia.com/gpu": "8"}
    assert res["limits"] == {"memory": "1000Gi", "nvidia.com/gpu": "8"}
    # 90 cores shared by the pod's 8 ranks
    assert _env(_objects(config=config)[2])["OMP_NUM_THREADS"]["value"] == "11"


def test_threads_per_rank_follow_the_pools_cpu_request():
    # No CPU request (the h200 preset): torch's and torchrun's own defaults.
    assert "OMP_NUM_THREADS" not in _env(_objects()[2])
    # The local pool requests a core per pod: one thread per rank, not one per host core.
    local = _objects(_run(resources={"nodes": 2, "gpusPerNode": 1, "nodePool": "local"}))[2]
    assert _env(local)["OMP_NUM_THREADS"]["value"] == "1"
    assert _container(local)["resources"]["requests"]["cpu"] == "1"
    half = OperatorConfig.model_validate({"pools": {"cpu": {"resources": {"cpu": "500m"}}}})
    cpu = _objects(_run(resources={"nodes": 1, "gpusPerNode": 2, "nodePool": "cpu"}),
                   config=half)[2]
    assert _env(cpu)["OMP_NUM_THREADS"]["value"] == "1"


def test_a_cpu_request_that_is_no_quantity_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"pools\.h200\.resources\.cpu"):
        OperatorConfig.model_validate({"pools": {"h200": {"resources": {"cpu": "two"}}}})


def test_unknown_pool_raises():
    with pytest.raises(KeyError, match="a100"):
        _objects(_run(resources={"nodePool": "a100"}))


def test_volumes_shm_config_and_termination_message():
    job = _objects()[2]
    pod, c = _pod(job), _container(job)
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}  # the pool's
    assert vols["config"] == CONFIG_VOLUME
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/dev/shm": "dshm", "/etc/flywheel": "config",
                      "/var/cache/flywheel": "cache"}  # test_render_isolation.py
    assert c["terminationMessagePath"] == "/dev/termination-log"
    # rank 0's summary, else (a failing rank without one) the log's tail
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert _env(job)["FLYWHEEL_SUMMARY_PATH"]["value"] == "/dev/termination-log"


def test_env_and_comet_secret_only_by_reference():
    run = _run()
    env = _env(_objects(run, attempt=2)[2])
    assert env["FLYWHEEL_RUN_NAME"]["value"] == "qwen-w48"
    assert env["FLYWHEEL_ATTEMPT"]["value"] == "2"
    assert env["COMET_WORKSPACE"]["value"] == "acme"
    assert env["COMET_PROJECT_NAME"]["value"] == "flow-agent"
    assert env["COMET_API_KEY"] == {
        "name": "COMET_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "comet", "key": "api-key"}},
    }
    for e in env.values():  # nothing secret-looking is ever a literal value
        assert "API_KEY" not in e["name"] or "value" not in e
    no_key = _run(tracking={"comet": {"workspace": "acme", "project": "p"}})
    assert "COMET_API_KEY" not in _env(_objects(no_key)[2])
    assert not any(k.startswith("COMET") for k in _env(_objects(_run(tracking={}))[2]))


def test_experiment_key_is_stable_across_attempts():
    run = _run()
    keys = {
        _env(_objects(run, attempt=a)[2])["FLYWHEEL_EXPERIMENT_KEY"]["value"] for a in (1, 2, 3)
    }
    (key,) = keys
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert key == vocab.experiment_key(run.uid)
    assert key != vocab.experiment_key("another-uid")
    assert vocab.comet_experiment_url("acme", "flow-agent", key) == (
        f"https://www.comet.com/acme/flow-agent/{key}"
    )


def test_non_root_security_context():
    job = _objects()[2]
    pod, c = _pod(job)["securityContext"], _container(job)["securityContext"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] == 1000
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["runAsNonRoot"] and c["allowPrivilegeEscalation"] is False
    assert c["capabilities"] == {"drop": ["ALL"]}
    assert c["seccompProfile"] == {"type": "RuntimeDefault"}


def test_image_from_spec_or_config():
    assert _container(_objects()[2])["image"] == CONFIG.defaultImage
    assert _container(_objects(_run(image="example.com/t:1"))[2])["image"] == "example.com/t:1"


def test_the_jobs_pod_template_holds_the_trainer_config():
    run = _run(
        dataset={
            "train": "s3://d/t.jsonl",
            "requiredCategories": ["email"],
            "minExamplesPerCategory": 5,
        }
    )
    objs = render.attempt_objects(run, 2, CONFIG)
    (job,) = [o for o in objs if o["kind"] == "Job"]
    # On the pod template, so every pod of the gang gets the file; no object of its own.
    assert render.CONFIG_ANNOTATION in job["spec"]["template"]["metadata"]["annotations"]
    assert "ConfigMap" not in [o["kind"] for o in objs]
    assert {v["name"]: v for v in _pod(job)["volumes"]}["config"] == CONFIG_VOLUME
    cfg = TrainerConfig.model_validate(_trainer_config(job))
    assert cfg.baseModel == "hf://Qwen/Qwen3-32B"
    assert cfg.runName == "qwen-w48"
    uid8 = run.uid[:8]
    # the run's own directories under spec.output.uri: no other run shares them
    assert cfg.output.uri == f"s3://models/flow-agent/qwen-w48-{uid8}/"
    assert cfg.checkpoint.uri == f"s3://models/flow-agent/qwen-w48-{uid8}/checkpoints/"
    assert cfg.runUid == run.uid
    assert cfg.dataset.train == "s3://d/t.jsonl"
    if "requiredCategories" in type(cfg.dataset).model_fields:
        assert cfg.dataset.requiredCategories == ["email"]
    if "experimentKey" in TrainerConfig.model_fields:
        assert cfg.experimentKey == vocab.experiment_key(run.uid)
    assert cfg.tracking.comet.apiKeySecretRef.name == "comet"


def test_long_and_odd_names_stay_valid_dns_labels():
    label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for name in ("x" * 200, "9-lives", "a.b.c", "run-" + "y" * 60):
        job_name = render.attempt_name(name, 12)
        assert label.match(job_name) and len(job_name + "-127") <= 63, job_name
        assert render.attempt_name(name, 12) == job_name  # deterministic
    assert render.attempt_name("a" * 200, 1) != render.attempt_name("a" * 199, 1)
    assert render.attempt_name("short", 1) == "short-a1"


def test_attempt_must_be_positive():
    with pytest.raises(ValueError):
        _objects(attempt=0)


def test_preflight_job():
    run = _run()
    (job,) = render.preflight_objects(run, CONFIG)
    assert job["metadata"]["name"] == "qwen-w48-preflight"
    assert [(c.kind, c.name) for c in render.preflight_children("qwen-w48")] == [
        ("Job", "qwen-w48-preflight")]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert job["spec"]["backoffLimit"] == 0 and "completionMode" not in job["spec"]
    assert job["spec"]["activeDeadlineSeconds"] == CONFIG.preflightTimeoutSeconds
    c = _container(job)
    assert c["command"] == ["python"]
    assert c["args"] == [
        "-m",
        "flywheel_trainer",
        "--preflight",
        "--config",
        "/etc/flywheel/config.json",
        "--world-size",
        str(run.spec.resources.nodes * run.spec.resources.gpusPerNode),
        # The run's pool (h200), not the preflight pool: its GPUs bound the memory plan.
        "--device-memory-gb",
        "141",
    ]
    assert c["image"] == _container(_objects(run)[2])["image"]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert _pod(job)["nodeSelector"] == {"flywheel.dev/pool": "cpu"}
    assert job["metadata"]["labels"]["flywheel.dev/run"] == "qwen-w48"
    assert job["metadata"]["labels"]["flywheel.dev/component"] == "preflight"
    assert job["metadata"]["ownerReferences"][0]["controller"] is True
    assert {v["name"]: v for v in _pod(job)["volumes"]}["config"] == CONFIG_VOLUME
    assert TrainerConfig.model_validate(_trainer_config(job)).runName == "qwen-w48"
    local = OperatorConfig(preflightPool="local")
    assert _pod(render.preflight_objects(run, local)[-1])["nodeSelector"] == {
        "flywheel.dev/executor": "local"
    }
    # A pool without a GPU memory figure: the plan is made but not checked.
    run.spec.resources.nodePool = "local"
    assert "--device-memory-gb" not in _container(render.preflight_objects(run, CONFIG)[-1])["args"]


def test_estimates():
    pool = CONFIG.pool("h200")
    hours = vocab.estimate_gpu_hours(2000 * 3600, pool.tokensPerSecondPerGpu)
    assert hours == pytest.approx(1.0)
    assert vocab.estimate_cost(hours, pool.gpuHourPrice) == pytest.approx(pool.gpuHourPrice)
    assert vocab.estimate_gpu_hours(10, CONFIG.pool("cpu").tokensPerSecondPerGpu) is None


def test_progress_port_watchdog_env_and_pod_failure_policy():
    job = _objects()[2]
    c = _container(job)
    assert {"name": "progress", "containerPort": 9400} in c["ports"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FLYWHEEL_PROGRESS_PORT"] == "9400"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "600"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In",
                                       "values": [2]}
