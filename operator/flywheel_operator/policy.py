"""The admin's rules for runs, as pure checks: which trainer images, which node pools per
namespace, whether a run may name its own Secrets and ServiceAccount, how large it may be, and
the pool boundary (a run's nodeSelector and tolerations may narrow its pool, never leave it).

`Policy` is the operator config's `policy`; `denials` lists every rule a run breaks, each
message naming the rule and the field, and `refusal` (lifecycle.decide's first step) fails the
run at once with `PolicyDenied` (or `InvalidSpec`: an unknown pool, queue settings the config
cannot serve) before anything of it exists. `scheduling` renders the pool boundary. The chart's
ValidatingAdmissionPolicy (charts/flywheel/templates/admission.yaml) refuses the same at
`kubectl apply`; these checks are the operator's own line, which holds without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .api import FineTuneRunSpec, Run, Toleration, merge_storage

if TYPE_CHECKING:
    from .config import OperatorConfig, Pool

#: The taint key of GPU nodes (the device plugin's resource name, as GPU operators taint).
GPU_TAINT = "nvidia.com/gpu"
#: `namespacePools` key for every namespace not listed.
ANY_NAMESPACE = "*"


#: A namespace name (a DNS label) or ANY_NAMESPACE.
NAMESPACE_KEY = r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"
NamespaceKey = Annotated[str, StringConstraints(pattern=NAMESPACE_KEY, max_length=63)]


class Policy(BaseModel):
    """What runs may ask for. The defaults restrict nothing but the pool boundary."""

    model_config = ConfigDict(extra="forbid")

    allowedImages: list[str] | None = Field(
        default=None, description="Trainer images a run's spec.image may name: an entry ending "
        "in '/' allows every image under it (a registry or project), any other entry one "
        "repository (any tag or digest). The operator's defaultImage is always allowed. "
        "Unset: any image; []: only the default image.")
    requireImageDigest: bool = Field(
        default=False, description="A run's own spec.image must be pinned by digest "
        "(`@sha256:...`).")
    namespacePools: dict[NamespaceKey, list[str]] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {
            "pattern": NAMESPACE_KEY, "maxLength": 63}},
        description="Node pools each namespace may use, e.g. "
        "{team-a: [h200, cpu], '*': [cpu]} ('*': every namespace not listed). Empty: every "
        "namespace may use every pool.")
    allowRunSecrets: bool = Field(
        default=True, description="Runs may name Secrets of their own (S3 credentials, GCS "
        "key, Hugging Face token, Comet API key) and their own S3 endpoint. Off: only the "
        "config's `storage` Secrets and endpoint, and the names in allowedSecrets.")
    allowedSecrets: list[str] = Field(
        default_factory=list, description="Secrets runs may name while allowRunSecrets is off "
        "(e.g. a shared comet-api-key).")
    allowRunServiceAccount: bool = Field(
        default=True, description="Runs may name their own spec.storage.serviceAccountName. "
        "Off: only the config's.")
    maxNodes: int | None = Field(default=None, ge=1, description="Most nodes (pods) per run.")
    maxGpusPerRun: int | None = Field(
        default=None, ge=1, description="Most GPUs per run (nodes x gpusPerNode, GPU pools).")


# --- images -----------------------------------------------------------------------------------


def image_matches(image: str, entry: str) -> bool:
    """`entry` ending in '/' covers everything under it; otherwise it is one repository, and
    the image is that repository with any tag or digest (`repo-evil` is not `repo`)."""
    if entry.endswith("/"):
        return image.startswith(entry)
    return image == entry or image.startswith((entry + ":", entry + "@"))


def image_denial(image: str | None, policy: Policy, default_image: str) -> str | None:
    if not image or image == default_image:
        return None
    if policy.allowedImages is not None and not any(
            image_matches(image, entry) for entry in policy.allowedImages):
        allowed = ", ".join([*policy.allowedImages, f"the default image {default_image}"])
        return (f"policy.allowedImages: spec.image {image!r} is not an allowed trainer image "
                f"(allowed: {allowed})")
    if policy.requireImageDigest and "@sha256:" not in image:
        return (f"policy.requireImageDigest: spec.image {image!r} must be pinned by digest "
                "(IMAGE@sha256:...)")
    return None


# --- pools ------------------------------------------------------------------------------------


def allowed_pools(config: OperatorConfig, namespace: str) -> list[str]:
    """The pools runs of `namespace` may use, sorted."""
    rules = config.policy.namespacePools
    names = rules.get(namespace, rules.get(ANY_NAMESPACE)) if rules else None
    known = config.pools
    return sorted(known if names is None else [n for n in names if n in known])


def fence_keys(pools: dict[str, Pool]) -> set[str]:
    """Taint keys only pools may tolerate: the GPU taint and every key a pool tolerates."""
    return {GPU_TAINT} | {t.key for pool in pools.values() for t in pool.tolerations if t.key}


def toleration_denial(toleration: Toleration, fences: set[str]) -> str | None:
    """Why a run may not add this toleration (None: it may)."""
    if not toleration.key:
        return "tolerates every taint"
    if toleration.key in fences:
        return f"tolerates {toleration.key}, a taint only node pools grant"
    return None


def scheduling(pool: Pool, spec: FineTuneRunSpec | None, pools: dict[str, Pool]
               ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """nodeSelector and tolerations of a pod on `pool`: the run's extras may only narrow the
    pool (its labels win; tolerations of pool taints, or of every taint, are dropped)."""
    selector = dict(pool.nodeSelector)
    tolerations = [t.model_dump(exclude_none=True) for t in pool.tolerations]
    if spec is not None:
        selector = {**spec.resources.nodeSelector, **pool.nodeSelector}
        fences = fence_keys(pools)
        for t in spec.resources.tolerations:
            extra = t.model_dump(exclude_none=True)
            if toleration_denial(t, fences) is None and extra not in tolerations:
                tolerations.append(extra)
    return selector, tolerations


def pool_denials(spec: FineTuneRunSpec, name: str, config: OperatorConfig) -> list[str]:
    pool = config.pools[name]
    out = []
    for key, value in spec.resources.nodeSelector.items():
        if key in pool.nodeSelector and pool.nodeSelector[key] != value:
            out.append(f"pool boundary: spec.resources.nodeSelector[{key!r}] is {value!r} but "
                       f"pool {name} selects {key}={pool.nodeSelector[key]}: a run may narrow "
                       "its pool, never leave it")
    fences = fence_keys(config.pools)
    for i, toleration in enumerate(spec.resources.tolerations):
        why = toleration_denial(toleration, fences)
        if why:
            out.append(f"pool boundary: spec.resources.tolerations[{i}] {why}: tolerations of "
                       f"pool taints come only from the pool ({name})")
    return out


# --- credentials and size ------------------------------------------------------------------------


def credential_denials(spec: FineTuneRunSpec, config: OperatorConfig) -> list[str]:
    policy, own, defaults = config.policy, spec.storage, config.storage
    out: list[str] = []
    if not policy.allowRunSecrets:
        merged = merge_storage(None, defaults)
        secrets = set(policy.allowedSecrets) | {
            name for name in (merged.s3 and merged.s3.credentialsSecret,
                              merged.gcs and merged.gcs.keySecretRef
                              and merged.gcs.keySecretRef.name,
                              merged.hf and merged.hf.tokenSecretRef
                              and merged.hf.tokenSecretRef.name) if name}
        named = {
            "spec.storage.s3.credentialsSecret": own and own.s3 and own.s3.credentialsSecret,
            "spec.storage.gcs.keySecretRef": own and own.gcs and own.gcs.keySecretRef
            and own.gcs.keySecretRef.name,
            "spec.storage.hf.tokenSecretRef": own and own.hf and own.hf.tokenSecretRef
            and own.hf.tokenSecretRef.name,
            "spec.tracking.comet.apiKeySecretRef": spec.tracking.comet
            and spec.tracking.comet.apiKeySecretRef and spec.tracking.comet.apiKeySecretRef.name}
        for field, name in named.items():
            if name and name not in secrets:
                out.append(f"policy.allowRunSecrets: {field} names Secret {name!r}, but runs may "
                           "only use the operator config's Secrets"
                           + (f" and {', '.join(sorted(secrets))}" if secrets else ""))
        endpoint = own and own.s3 and own.s3.endpoint
        if endpoint and endpoint != (merged.s3 and merged.s3.endpoint):
            out.append(f"policy.allowRunSecrets: spec.storage.s3.endpoint {endpoint!r} is not "
                       "the operator config's: the config's credentials go to its endpoint only")
    account = own and own.serviceAccountName
    if (not policy.allowRunServiceAccount and account
            and account != (defaults and defaults.serviceAccountName)):
        out.append(f"policy.allowRunServiceAccount: spec.storage.serviceAccountName {account!r} "
                   "is not allowed; runs use the operator config's ServiceAccount")
    return out


def size_denials(spec: FineTuneRunSpec, pool: Pool, policy: Policy) -> list[str]:
    nodes, gpus = spec.resources.nodes, spec.resources.gpusPerNode
    out = []
    if policy.maxNodes is not None and nodes > policy.maxNodes:
        out.append(f"policy.maxNodes: spec.resources.nodes is {nodes}, more than {policy.maxNodes}")
    limit = policy.maxGpusPerRun
    if limit is not None and pool.gpusPerNode and nodes * gpus > limit:
        out.append(f"policy.maxGpusPerRun: spec.resources.nodes x gpusPerNode is {nodes * gpus} "
                   f"GPUs, more than {policy.maxGpusPerRun}")
    return out


# --- all of it ----------------------------------------------------------------------------------


def unknown_pool(spec: FineTuneRunSpec, namespace: str, config: OperatorConfig) -> str | None:
    """The message for a run whose pool does not exist (None: it does)."""
    name = spec.resources.nodePool or config.defaultPool
    if name in config.pools:
        return None
    return (f"spec.resources.nodePool: unknown node pool {name!r}; pools namespace {namespace} "
            f"may use: {', '.join(allowed_pools(config, namespace)) or 'none'}")


def denials(spec: FineTuneRunSpec, namespace: str, config: OperatorConfig) -> list[str]:
    """Every rule of the config's policy (and the pool boundary) the run breaks, each naming
    the rule and the field; empty when it may run. The pool must exist (`unknown_pool`)."""
    name = spec.resources.nodePool or config.defaultPool
    out = []
    allowed = allowed_pools(config, namespace)
    if name not in allowed:
        field = "spec.resources.nodePool" if spec.resources.nodePool else (
            f"spec.resources.nodePool (empty: the default pool {name})")
        out.append(f"policy.namespacePools: {field}: namespace {namespace} may not use pool "
                   f"{name}; it may use: {', '.join(allowed) or 'none'}")
    out += pool_denials(spec, name, config)
    why = image_denial(spec.image, config.policy, config.defaultImage)
    if why:
        out.append(why)
    out += credential_denials(spec, config)
    out += size_denials(spec, config.pools[name], config.policy)
    return out


class Refusal(NamedTuple):
    """Why a run fails before anything of it exists: its reason and message."""

    reason: str
    message: str


def refusal(run: Run, config: OperatorConfig) -> Refusal | None:
    """Why the run cannot start under this operator's config (None: it can): a pool that does
    not exist or queue settings that cannot work (InvalidSpec), or the admin's policy
    (PolicyDenied, every rule broken, each naming the rule and the field)."""
    spec, namespace = run.spec, run.namespace
    if spec.queueName and not config.kueue.enabled:
        return Refusal("InvalidSpec", "spec.queueName is set but the operator's Kueue "
                       "integration is off (operator config kueue.enabled)")
    if spec.priorityClassName and not config.kueue.queue(namespace, spec.queueName):
        return Refusal("InvalidSpec", "spec.priorityClassName needs a Kueue queue: set "
                       "spec.queueName (or a default queue in the operator config)")
    unknown = unknown_pool(spec, namespace, config)
    if unknown:
        return Refusal("InvalidSpec", unknown)
    denied = denials(spec, namespace, config)
    if denied:
        return Refusal("PolicyDenied", f"refused by the operator's policy: {'; '.join(denied)}"
                       [:1024])
    return None
