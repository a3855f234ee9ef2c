"""Operator configuration: default image, node pool presets and storage defaults.

Loaded from a YAML file (`--config` or env FLYWHEEL_OPERATOR_CONFIG); built-in defaults when
neither is given. Pools in the file are added to (or replace, by name) the built-in presets.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .api import Storage, Toleration
from .policy import Policy
from .vocab import EXECUTOR_LABEL, POOL_LABEL

ENV_VAR = "FLYWHEEL_OPERATOR_CONFIG"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_IMAGE = "ghcr.io/flywheel-dev/flywheel-trainer:0.1.0"
QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
#: The model cache's size limit when neither the pool nor preflight gives one.
DEFAULT_CACHE_SIZE = "256Gi"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PodResources(_Model):
    """CPU and memory requested per pod (also the memory limit). Empty: not set."""

    cpu: str | None = Field(default=None, pattern=r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$",
                            description="Cores (2, 1.5) or millicores (500m).")
    memory: str | None = None


class Pool(_Model):
    """A node pool preset that runs can name in `spec.resources.nodePool`."""

    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gpusPerNode: int = Field(default=0, ge=0, description="GPUs per node; 0 for CPU pools.")
    gpuHourPrice: float = Field(default=0.0, ge=0, description="Price of one GPU-hour.")
    tokensPerSecondPerGpu: float | None = Field(
        default=None, gt=0, description="Throughput figure for preflight estimates.")
    gpuMemoryGB: float | None = Field(
        default=None, gt=0, description="Memory of one GPU in GB (decimal): preflight refuses a "
        "run whose per-GPU memory estimate exceeds it.")
    resources: PodResources = Field(default_factory=PodResources)
    memoryPerGpu: str | None = Field(
        default=None, pattern=QUANTITY_RE, description="Memory request and limit per GPU a pod "
        "asks for (a 2-GPU pod gets twice this), over resources.memory for pods with GPUs.")
    shmSize: str = Field(
        default="8Gi", pattern=QUANTITY_RE, description="Size limit of the trainer pods' "
        "/dev/shm (a memory emptyDir: it counts against the pod's memory limit).")
    cacheSize: str | None = Field(
        default=None, pattern=QUANTITY_RE, description="Size limit of the trainer pods' model "
        "cache (an emptyDir holding downloaded base models, HF_HOME and TMPDIR). Empty: from "
        "the model size preflight measured (4 bytes a parameter, plus a quarter and 2Gi), else "
        f"{DEFAULT_CACHE_SIZE}.")


_GPU_TOLERATION = Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")

PRESETS: dict[str, Pool] = {
    "h200": Pool(
        nodeSelector={POOL_LABEL: "h200"},
        tolerations=[_GPU_TOLERATION],
        gpusPerNode=8,
        gpuHourPrice=3.5,
        tokensPerSecondPerGpu=2000.0,
        gpuMemoryGB=141.0,
        memoryPerGpu="200Gi",  # 1600Gi for a whole 8-GPU node (2 TiB)
        shmSize="64Gi"),
    "cpu": Pool(nodeSelector={POOL_LABEL: "cpu"}, resources=PodResources(memory="32Gi")),
    "local": Pool(
        nodeSelector={EXECUTOR_LABEL: "local"},
        tolerations=[_GPU_TOLERATION],
        gpusPerNode=2,
        tokensPerSecondPerGpu=500.0,
        # one core per rank: the pods share this machine's cores
        resources=PodResources(cpu="1", memory="8Gi"),
        shmSize="1Gi",
        cacheSize="20Gi")}


class NetworkPolicy(_Model):
    """Trainer pods accept traffic only from the operator, on the progress port (a fence per
    namespace), and from their own attempt's pods (rendezvous, store, NCCL: a policy per
    attempt of more than one node). Egress is open."""

    enabled: bool = Field(default=True, description="Render the namespace's fence and the "
                          "multi-node attempts' NetworkPolicies.")
    operatorPeers: list[dict] = Field(
        default_factory=list, description="NetworkPolicy peers (namespaceSelector / "
        "podSelector / ipBlock) the operator polls rank 0's progress port from; the chart "
        "sets its own pods. Empty: the progress port is open to every source (an operator "
        "outside the cluster), the other ports stay closed.")


class Kueue(_Model):
    """Kueue integration: runs with a queue are admitted by Kueue, all pods or none."""

    enabled: bool = Field(default=False, description="Off: spec.queueName is refused.")
    defaultQueue: str = Field(default="", description="LocalQueue of runs that name none.")
    namespaceQueues: dict[str, str] = Field(
        default_factory=dict, description="Per-namespace default LocalQueue.")

    def queue(self, namespace: str, queue_name: str | None) -> str | None:
        """The LocalQueue of a run (None: not queued, Kueue does not see it)."""
        if not self.enabled:
            return None
        return queue_name or self.namespaceQueues.get(namespace) or self.defaultQueue or None


class OperatorConfig(_Model):
    """Everything the operator needs that is not in a FineTuneRun."""

    defaultImage: str = DEFAULT_IMAGE
    defaultPool: str = "h200"
    preflightPool: str = "cpu"
    preflightTimeoutSeconds: int = Field(default=1800, ge=60, description="Preflight deadline.")
    pools: dict[str, Pool] = Field(default_factory=lambda: dict(PRESETS))
    storage: Storage = Field(
        default_factory=Storage,
        description="Cluster-wide storage defaults (S3 endpoint and region, credentials "
        "Secret, GCS key, ServiceAccount) under every run's own `spec.storage`.")
    # watching runs (observe.py, poller.py)
    progressIntervalSeconds: float = Field(
        default=30, ge=1, description="Poll each training run's rank 0 at most this often.")
    stallTimeoutSeconds: int = Field(
        default=1800, ge=10, description="No heartbeat or no step for this long: Stalled "
        "(a run's spec.stallTimeoutSeconds overrides it).")
    loadingTimeoutSeconds: int = Field(
        default=3600, ge=10, description="Allowance for start-up, model loading, tokenizing.")
    evaluationTimeoutSeconds: int = Field(
        default=3600, ge=10, description="Allowance for evaluation and export.")
    startFailureGraceSeconds: int = Field(
        default=120, ge=0, description="How long a container may wait in ImagePullBackOff, "
        "ErrImagePull or CreateContainerConfigError before the run fails.")
    ncclHeartbeatTimeoutSeconds: int = Field(
        default=600, ge=10, description="TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC in trainer pods.")
    kueue: Kueue = Field(default_factory=Kueue)
    policy: Policy = Field(
        default_factory=Policy, description="What runs may ask for: images, pools per "
        "namespace, Secrets and ServiceAccount, size (policy.py).")
    networkPolicy: NetworkPolicy = Field(default_factory=NetworkPolicy)
    maxDatasetLineBytes: int = Field(
        default=16 * 2**20, ge=1024, description="Longest dataset line the trainer reads: a "
        "longer one is a `file:line` error, not an out-of-memory.")
    # every Kubernetes API call (kube.py), with its retries
    peeringLifetimeSeconds: int = Field(
        default=20, ge=5, description="How long a replica counts as alive after its last "
        "keep-alive in the kopf peering object: a standby takes over at most this long after "
        "the active replica dies.")
    apiConnectTimeoutSeconds: float = Field(
        default=5, gt=0, description="Connect timeout of each Kubernetes API request.")
    apiReadTimeoutSeconds: float = Field(
        default=60, gt=0, description="Read timeout of each Kubernetes API request: a stalled "
        "connection is dropped and the request retried, never holding a worker.")

    @model_validator(mode="after")
    def _known_pools(self) -> OperatorConfig:
        self.pools = {**PRESETS, **self.pools}
        for field in ("defaultPool", "preflightPool"):
            if getattr(self, field) not in self.pools:
                raise ValueError(f"{field}: unknown pool {getattr(self, field)!r}")
        for namespace, names in self.policy.namespacePools.items():
            unknown = sorted(set(names) - set(self.pools))
            if unknown:
                known = ", ".join(sorted(self.pools))
                raise ValueError(f"policy.namespacePools.{namespace}: unknown pool(s) "
                                 f"{', '.join(unknown)}; known pools: {known}")
        return self

    def pool(self, name: str | None) -> Pool:
        """The named pool (the default pool for None); KeyError names the known pools."""
        name = name or self.defaultPool
        try:
            return self.pools[name]
        except KeyError:
            raise KeyError(
                f"unknown node pool {name!r}; known pools: {', '.join(sorted(self.pools))}"
            ) from None


def load_config(path: str | Path | None = None) -> OperatorConfig:
    """Load from `path`, else $FLYWHEEL_OPERATOR_CONFIG, else the built-in defaults."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return OperatorConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return OperatorConfig.model_validate(data)
