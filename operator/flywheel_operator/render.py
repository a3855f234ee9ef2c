"""Pure rendering: a FineTuneRun (api.Run) -> the Kubernetes objects of an attempt.

No I/O. Names are deterministic, so re-running a handler can never create a second Job:
`<run>-a<attempt>` (Job, and for a gang its headless Service and NetworkPolicy) and
`<run>-preflight` (Job). The trainer's config travels inside its Job: an annotation of the
pod template (`CONFIG_ANNOTATION`), which the kubelet writes into the pod as a file (a
downward API volume). No separate object can be missing, late, or someone else's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from flywheel_trainer.config import TrainerConfig, default_checkpoint_uri, run_scoped
from flywheel_trainer.contract import EXIT_DATA_ERROR, TERMINATION_LOG, Env
from kubernetes.utils.quantity import parse_quantity

from . import isolation, policy
from .api import FineTuneRunSpec, Run
from .config import GPU_RESOURCE, OperatorConfig, Pool
from .vocab import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_ANNOTATION,
    COMPONENT_LABEL,
    MANAGED_BY,
    MODEL_REF_SCHEME,
    PRIORITY_CLASS_LABEL,
    PROGRESS_PORT,
    PROGRESS_PORT_NAME,
    QUEUE_NAME_LABEL,
    RUN_LABEL,
    experiment_key,
    owner_reference,
)
from .wiring import GCS_KEY_DIR, PVC_ROOT, claims, storage_wiring  # noqa: F401 (re-exported)

CONFIG_DIR = "/etc/flywheel"
CONFIG_PATH = f"{CONFIG_DIR}/config.json"
CONFIG_KEY = "config.json"
#: The pod template's annotation that holds the trainer's config (TrainerConfig as JSON).
CONFIG_ANNOTATION = "flywheel.dev/trainer-config"
MASTER_PORT = 29500
RUN_AS = 1000
#: Longest base name: "<base>-a<attempt>-<index>" must stay a 63-char DNS label (pod hostname).
MAX_BASE = 50


# ---------------------------------------------------------------------------- names and labels


def base_name(run_name: str) -> str:
    """A DNS-1035 label of at most MAX_BASE chars for the run (the name itself when it fits)."""
    name = run_name.lower().replace(".", "-")
    if len(name) <= MAX_BASE and name[:1].isalpha() and name == run_name:
        return name
    digest = hashlib.sha256(run_name.encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    if not stem[:1].isalpha():
        stem = "r" + stem
    return f"{stem[: MAX_BASE - 9].rstrip('-')}-{digest}"


def attempt_name(run_name: str, attempt: int) -> str:
    """Name of the attempt's Job and headless Service: `<run>-a<attempt>`."""
    return f"{base_name(run_name)}-a{attempt}"


class Child(NamedTuple):
    """One child object of a run, by API version, kind and name."""

    api_version: str
    kind: str
    name: str


def attempt_children(run_name: str, attempt: int) -> list[Child]:
    """Every object of an attempt, in deletion order: the Job last (while it exists the
    attempt is seen, so a crash half-way through deletes the rest on the next reconcile)."""
    name = attempt_name(run_name, attempt)
    return [Child("v1", "Service", name),
            Child(isolation.NETWORK_POLICY_API, "NetworkPolicy", name),
            Child("batch/v1", "Job", name)]


def preflight_children(run_name: str) -> list[Child]:
    """The preflight's objects: its Job."""
    return [Child("batch/v1", "Job", preflight_name(run_name))]


def preflight_name(run_name: str) -> str:
    """Name of the preflight Job: `<run>-preflight`."""
    return f"{base_name(run_name)}-preflight"


def _label_value(run_name: str) -> str:
    return run_name if len(run_name) <= 63 else base_name(run_name)


def attempt_labels(run_name: str, attempt: int) -> dict[str, str]:
    """Labels on every child of an attempt and on its pod template."""
    return {RUN_LABEL: _label_value(run_name), ATTEMPT_LABEL: str(attempt),
            COMPONENT_LABEL: "trainer", **MANAGED_BY}


def preflight_labels(run_name: str) -> dict[str, str]:
    """Labels of the preflight children (no attempt label: preflight precedes attempts)."""
    return {RUN_LABEL: _label_value(run_name), COMPONENT_LABEL: "preflight", **MANAGED_BY}


def master_addr(run: Run, attempt: int) -> str:
    """Where torchrun's rendezvous is: rank 0's stable DNS name,
    `<job>-0.<service>.<namespace>.svc`; a one-node attempt's own loopback (no Service)."""
    if run.spec.resources.nodes == 1:
        return "127.0.0.1"
    name = attempt_name(run.name, attempt)
    return f"{name}-0.{name}.{run.namespace}.svc"


# ---------------------------------------------------------------------------- trainer config


def run_paths(run: Run) -> tuple[str, str]:
    """(artifact directory, checkpoint directory) of a run: its own directories under the
    spec's `output.uri` (and `checkpoint.uri`), `<uri>/<run-name>-<uid8>/` (config.run_scoped).
    Two runs naming one output, or a run deleted and applied again, never share either."""
    output = run_scoped(run.spec.output.uri, run.name, run.uid)
    checkpoint = run.spec.checkpoint.uri
    return output, (run_scoped(checkpoint, run.name, run.uid) if checkpoint
                    else default_checkpoint_uri(output))


def trainer_config(run: Run, attempt: int | None,
                   baseline: dict | None = None) -> TrainerConfig:
    """The trainer's config for an attempt: the spec's training part plus runtime fields
    (`baseline`: the promoted version's {name, metrics}, for the model card).

    Output and checkpoints go to the run's own directories (`run_paths`), so every attempt
    resumes from the same place and no other run's. A registry base model (`model://`) is
    the artifact it resolved to when the run started (`status.baseModel`), with its digest.
    """
    spec, resolved = run.spec, run.status.baseModel
    output, checkpoints = run_paths(run)
    if spec.baseModel.startswith(MODEL_REF_SCHEME) and not resolved:
        raise ValueError(f"baseModel {spec.baseModel} is not resolved yet (status.baseModel)")
    data: dict[str, Any] = {"baseModel": resolved.uri if resolved else spec.baseModel,
                            "baseModelDigest": resolved and resolved.digest,
                            "parentVersion": resolved and resolved.modelVersion,
                            "dataset": spec.dataset.model_dump(exclude_none=True),
                            "hyperparameters": spec.hyperparameters.model_dump(),
                            "fsdp": spec.fsdp.model_dump(),
                            "checkpoint": {**spec.checkpoint.model_dump(exclude_none=True),
                                           "uri": checkpoints},
                            "output": {"uri": output},
                            "tracking": spec.tracking.model_dump(exclude_none=True),
                            "runName": run.name, "runUid": run.uid, "attempt": attempt,
                            "resumeFrom": spec.resumeFrom,
                            "experimentKey": experiment_key(run.uid),
                            "baseline": baseline}
    data = {k: v for k, v in data.items() if v is not None}
    return TrainerConfig.model_validate(data)


def config_annotation(cfg: TrainerConfig) -> dict[str, str]:
    """The pod template's annotation that carries the trainer's config (CONFIG_ANNOTATION)."""
    return {CONFIG_ANNOTATION: json.dumps(cfg.model_dump(mode="json", exclude_none=True),
                                          indent=1, sort_keys=True)}


# ---------------------------------------------------------------------------- pod pieces


def _meta(run: Run, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": run.namespace, "labels": dict(labels),
            "ownerReferences": [owner_reference(run.ref)]}


def _scheduling(pool: Pool, spec: FineTuneRunSpec | None, config: OperatorConfig
                ) -> dict[str, Any]:
    # The run's nodeSelector and tolerations only narrow its pool (policy.scheduling).
    selector, tolerations = policy.scheduling(pool, spec, config.pools)
    out: dict[str, Any] = {"nodeSelector": selector} if selector else {}
    if tolerations:
        out["tolerations"] = tolerations
    return out


def _resources(pool: Pool, gpus: int) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if pool.resources.cpu:
        requests["cpu"] = pool.resources.cpu
    memory = isolation.pod_memory(pool, gpus)
    if memory:
        requests["memory"] = limits["memory"] = memory
    if gpus and pool.gpusPerNode:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _threads_env(pool: Pool, ranks: int) -> list[dict[str, Any]]:
    """OMP_NUM_THREADS: the pod's CPU request shared by its ranks, where the pool sets one.
    Without it every rank starts a thread per core of the node (torchrun sets 1 only for
    several ranks a pod), and ranks that share few cores slow each other down."""
    if not pool.resources.cpu:
        return []
    cores = parse_quantity(pool.resources.cpu)
    return [_env("OMP_NUM_THREADS", max(1, int(cores // max(ranks, 1))))]


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _env(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _comet_env(spec: FineTuneRunSpec) -> list[dict[str, Any]]:
    comet = spec.tracking.comet
    if comet is None:
        return []
    env = [_env(Env.COMET_WORKSPACE, comet.workspace), _env(Env.COMET_PROJECT, comet.project)]
    if comet.apiKeySecretRef is not None:
        ref = comet.apiKeySecretRef
        env.append({"name": Env.COMET_API_KEY,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _volumes(pool: Pool, cache: str) -> list[dict[str, Any]]:
    # The trainer's config: the pod's own annotation, written as a file by the kubelet.
    config = {"name": "config", "downwardAPI": {"items": [{"path": CONFIG_KEY, "fieldRef": {
        "fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}]}}
    return [config, *isolation.volumes(pool.shmSize, cache)]


_MOUNTS = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, *isolation.MOUNTS]


def _job(run: Run, name: str, labels: dict[str, str], pod_spec: dict[str, Any],
         completions: int, indexed: bool, cfg: TrainerConfig) -> dict[str, Any]:
    template = {"metadata": {"labels": dict(labels), "annotations": config_annotation(cfg)},
                "spec": pod_spec}
    spec: dict[str, Any] = {"completions": completions, "parallelism": completions,
                            "backoffLimit": 0, "template": template}
    if indexed:
        spec["completionMode"] = "Indexed"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(run, name, labels),
            "spec": spec}


def _pod_spec(container: dict[str, Any], pool: Pool, spec: FineTuneRunSpec | None,
              storage: dict[str, Any], config: OperatorConfig, cache: str) -> dict[str, Any]:
    container = {**container, "env": [*container["env"], *storage["env"],
                                      *isolation.env(config)],
                 "volumeMounts": [*container["volumeMounts"], *storage["mounts"]]}
    pod = {"restartPolicy": "Never", "enableServiceLinks": False,
           "automountServiceAccountToken": False, "securityContext": _pod_security(),
           **_scheduling(pool, spec, config), "containers": [container],
           "volumes": [*_volumes(pool, cache), *storage["volumes"]]}
    if storage["serviceAccountName"]:
        pod["serviceAccountName"] = storage["serviceAccountName"]
    return pod


# ---------------------------------------------------------------------------- public renderers


def attempt_objects(run: Run, attempt: int, config: OperatorConfig,
                    baseline: dict | None = None) -> list[dict]:
    """Headless Service and NetworkPolicy (for more than one node: its pods' DNS names, and
    their traffic to each other, unless the config turns policies off) and the Indexed Job
    of `attempt` (1-based, the trainer's config in its pod template), in creation order. A
    one-node attempt (its Job alone) rendezvous on its own
    loopback and the namespace's fence (isolation.namespace_fence) covers it: at a fleet's
    scale a Service (and its EndpointSlice) and a policy per run would be objects and API
    requests per run for nothing.
    `baseline`: the promoted version's {name, metrics}, passed on to the model card."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    spec = run.spec
    pool = config.pool(spec.resources.nodePool)
    name = attempt_name(run.name, attempt)
    labels = attempt_labels(run.name, attempt)
    selector = {RUN_LABEL: labels[RUN_LABEL], ATTEMPT_LABEL: labels[ATTEMPT_LABEL]}
    nodes, gpus = spec.resources.nodes, spec.resources.gpusPerNode

    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, name, labels),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}]}}
    env = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            }},
        _env(Env.RUN_NAME, run.name),
        _env(Env.ATTEMPT, attempt),
        _env(Env.EXPERIMENT_KEY, experiment_key(run.uid)),
        _env(Env.SUMMARY_PATH, TERMINATION_LOG),
        _env(Env.PROGRESS_PORT, PROGRESS_PORT),
        # NCCL's own watchdog: a hung collective ends the process (and so the attempt)
        _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", 1),
        _env("TORCH_NCCL_ENABLE_MONITORING", 1),
        _env("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", config.ncclHeartbeatTimeoutSeconds),
        *_comet_env(spec),
        *_threads_env(pool, gpus)]
    # torchrun through the launcher, which keeps the trainer's exit code 2 (data error)
    container = {"name": "trainer", "image": spec.image or config.defaultImage,
                 "command": ["python", "-m", "flywheel_trainer.launch"],
                 "args": [f"--nnodes={nodes}", f"--nproc-per-node={gpus}",
                          "--node-rank=$(JOB_COMPLETION_INDEX)",
                          f"--master-addr={master_addr(run, attempt)}",
                          f"--master-port={MASTER_PORT}", "-m", "flywheel_trainer", "--config",
                          CONFIG_PATH],
                 "env": env,
                 "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT},
                           {"name": PROGRESS_PORT_NAME, "containerPort": PROGRESS_PORT}],
                 "resources": _resources(pool, gpus), "volumeMounts": list(_MOUNTS),
                 # rank 0 writes its summary; any other failing pod leaves its log's tail
                 "terminationMessagePath": TERMINATION_LOG,
                 "terminationMessagePolicy": "FallbackToLogsOnError",
                 "securityContext": _container_security()}
    parameters = run.status.preflight and run.status.preflight.parameters
    pod_spec = {**({"subdomain": name} if nodes > 1 else {}),
                **_pod_spec(container, pool, spec, storage_wiring(spec, config), config,
                            isolation.cache_size(pool, parameters))}
    job = _job(run, name, labels, pod_spec, nodes, indexed=True,
               cfg=trainer_config(run, attempt, baseline))
    # Lost nodes, evictions and preemptions (DisruptionTarget) and data errors (exit 2) fail
    # the Job at once with a reason the operator classifies (observe.classify).
    job["spec"]["podFailurePolicy"] = {"rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget",
                                                   "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                              "values": [EXIT_DATA_ERROR]}}]}
    queue = config.kueue.queue(run.namespace, spec.queueName)
    if queue:  # Kueue admits it: created suspended; Kueue alone unsuspends (all pods or none)
        job["metadata"]["labels"][QUEUE_NAME_LABEL] = queue
        if spec.priorityClassName:
            job["metadata"]["labels"][PRIORITY_CLASS_LABEL] = spec.priorityClassName
        job["spec"]["suspend"] = True
    if nodes == 1:
        return [job]
    netpol = isolation.network_policy(_meta(run, name, labels), selector, config)
    return [service, *([netpol] if netpol else []), job]


def preflight_objects(run: Run, config: OperatorConfig) -> list[dict]:
    """The single-pod CPU Job that runs the trainer's preflight mode (in a list, as
    attempt_objects)."""
    spec = run.spec
    pool = config.pool(config.preflightPool)
    name = preflight_name(run.name)
    labels = preflight_labels(run.name)
    env = [_env(Env.RUN_NAME, run.name), _env(Env.SUMMARY_PATH, TERMINATION_LOG)]
    world_size = spec.resources.nodes * spec.resources.gpusPerNode
    memory = config.pool(spec.resources.nodePool).gpuMemoryGB
    container = {
        "name": "preflight",
        "image": spec.image or config.defaultImage,
        "command": ["python"],
        # Steps and per-GPU memory are planned for the training world size and pool.
        "args": ["-m", "flywheel_trainer", "--preflight", "--config", CONFIG_PATH,
                 "--world-size", str(world_size),
                 *(["--device-memory-gb", f"{memory:g}"] if memory else [])],
        "env": env,
        "resources": _resources(pool, 0),
        "volumeMounts": list(_MOUNTS),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": _container_security()}
    # Preflight runs on the CPU pool: only the pool's own scheduling, not the run's GPU extras.
    pod_spec = _pod_spec(container, pool, None, storage_wiring(spec, config), config,
                         pool.cacheSize or isolation.PREFLIGHT_CACHE_SIZE)
    job = _job(run, name, labels, pod_spec, 1, indexed=False, cfg=trainer_config(run, None))
    job["spec"]["activeDeadlineSeconds"] = config.preflightTimeoutSeconds
    return [job]
