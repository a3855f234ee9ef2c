"""Pure: what fences and bounds a run's pods. The namespace's fence (its trainer pods accept
traffic only on the progress port, from the operator), an attempt of more than one node's
NetworkPolicy (its pods accept each other too), a size-limited
`/dev/shm`, and the model cache on a size-limited emptyDir instead of the container's root
filesystem (base model downloads, HF_HOME, TMPDIR), sized from the pool or from the model
size preflight measured.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .config import DEFAULT_CACHE_SIZE, OperatorConfig, Pool
from .vocab import COMPONENT_LABEL, MANAGED_BY, PROGRESS_PORT

CACHE_DIR = "/var/cache/flywheel"
#: The preflight pod fetches config and tokenizer only, never weights.
PREFLIGHT_CACHE_SIZE = "10Gi"
NETWORK_POLICY_API = "networking.k8s.io/v1"
#: The namespace's NetworkPolicy over every trainer pod (not owned by a run: it outlives them).
FENCE_NAME = "flywheel-trainers"


def cache_size(pool: Pool, parameters: int | None) -> str:
    """The model cache's size limit: the pool's `cacheSize`; else room for the base model at
    4 bytes a parameter (fp32 files, the worst case), a quarter more and 2Gi for tokenizer,
    temporary files and the Hub's own bookkeeping; else DEFAULT_CACHE_SIZE."""
    if pool.cacheSize:
        return pool.cacheSize
    if parameters:
        return f"{-(-parameters * 5 // 2**30) + 2}Gi"  # 4 B x 1.25, rounded up to Gi
    return DEFAULT_CACHE_SIZE


def pod_memory(pool: Pool, gpus: int) -> str | None:
    """A pod's memory request and limit: the pool's memoryPerGpu times the pod's GPUs, else
    the pool's resources.memory (None: not set)."""
    if pool.memoryPerGpu and gpus and pool.gpusPerNode:
        number = pool.memoryPerGpu.rstrip("KMGTPik")
        total = Decimal(number) * gpus
        return f"{total.normalize():f}{pool.memoryPerGpu[len(number):]}"
    return pool.resources.memory


def volumes(shm: str, cache: str) -> list[dict[str, Any]]:
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
            {"name": "cache", "emptyDir": {"sizeLimit": cache}}]


MOUNTS = [{"name": "dshm", "mountPath": "/dev/shm"},
          {"name": "cache", "mountPath": CACHE_DIR}]


def env(config: OperatorConfig) -> list[dict[str, Any]]:
    """Everything the trainer downloads or spools goes to the bounded cache; dataset lines
    are capped (a longer one is a `file:line` error)."""
    return [{"name": "FLYWHEEL_MODEL_CACHE", "value": f"{CACHE_DIR}/models"},
            {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"},
            {"name": "TMPDIR", "value": CACHE_DIR},
            {"name": "FLYWHEEL_MAX_LINE_BYTES", "value": str(config.maxDatasetLineBytes)}]


def namespace_fence(config: OperatorConfig) -> dict[str, Any] | None:
    """The NetworkPolicy over every trainer pod of a namespace (None when the config turns
    policies off): ingress only on the progress port, from the operator's peers (any source
    when none are configured); egress is left open (object stores, the Hub, Comet). It is in
    place before a namespace's first Job, so a pod is fenced from its first moment, and a
    one-node attempt needs nothing more."""
    if not config.networkPolicy.enabled:
        return None
    progress: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": PROGRESS_PORT}]}
    if config.networkPolicy.operatorPeers:
        progress["from"] = [dict(p) for p in config.networkPolicy.operatorPeers]
    return {"apiVersion": NETWORK_POLICY_API, "kind": "NetworkPolicy",
            "metadata": {"name": FENCE_NAME, "labels": dict(MANAGED_BY)},
            "spec": {"podSelector": {"matchLabels": {COMPONENT_LABEL: "trainer", **MANAGED_BY}},
                     "policyTypes": ["Ingress"], "ingress": [progress]}}


def network_policy(metadata: dict[str, Any], selector: dict[str, str],
                   config: OperatorConfig) -> dict[str, Any] | None:
    """An attempt of more than one node's NetworkPolicy (None when the config turns policies
    off): its pods also accept each other (rendezvous, torchrun's store, NCCL/gloo on any
    port). Policies add up: the namespace's fence still admits the operator."""
    if not config.networkPolicy.enabled:
        return None
    return {"apiVersion": NETWORK_POLICY_API, "kind": "NetworkPolicy", "metadata": metadata,
            "spec": {"podSelector": {"matchLabels": dict(selector)},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": dict(selector)}}]}]}}
