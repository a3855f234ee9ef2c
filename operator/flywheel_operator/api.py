"""The Flywheel API (`flywheel.dev/v1alpha1`): pydantic models, the single source of truth.

`crdgen` turns these models into CRDs. Field names are the public API (camelCase, as
written in manifests). `FineTuneRun.spec` reuses the trainer's torch-free spec models, so the
trainer config and the CRD share one vocabulary; constraints the trainer does not declare
(length limits and CEL rules for URIs and secrets) are added here in `SPEC_PATCHES`.

CEL rules are plain data (`x-kubernetes-validations` entries) so they can be unit-tested and
end up verbatim in the CRDs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from flywheel_trainer.config import (
    Checkpoint,
    Dataset,
    Fsdp,
    Hyperparameters,
    Output,
    SpecModel,
    Tracking,
)
from pydantic import BaseModel, ConfigDict, Field

GROUP = "flywheel.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# --------------------------------------------------------------------------------------------
# CEL building blocks. Regexes are RE2 (what CEL's matches() uses) and also valid Python `re`.

#: Storage URIs for data and outputs: s3://bucket/..., gs://bucket/..., file:///abs, pvc://claim/path.
#: Bucket and claim names exclude `@` and `:`, so `user:pass@` credentials cannot match.
DATA_URI_RE = (
    r"^((s3|gs)://[a-z0-9][a-z0-9._-]{1,62}(/[^?#]*)?"
    r"|file:///[^?#]*"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^?#]+)$"
)
#: Base model URIs: the data schemes plus hf://[org/]name[@revision].
MODEL_URI_RE = (
    r"^(hf://([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._/-]*)?"
    r"|(s3|gs)://[a-z0-9][a-z0-9._-]{1,62}(/[^?#]*)?"
    r"|file:///[^?#]*"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^?#]+)$"
)
#: Well-known credential shapes anywhere in a string (case-insensitive).
SECRET_RE = (
    r"(?i)(sk-[a-z0-9_-]{16,}|gh[pousr]_[a-z0-9]{20,}|github_pat_|hf_[a-z0-9]{20,}"
    r"|akia[0-9a-z]{16}|xox[abprs]-|-----begin|eyj[a-z0-9_-]{8,}\.[a-z0-9_-]{8,}"
    r"|(api[_-]?key|secret|passw(or)?d|token|x-amz-signature|x-goog-signature|sig)\s*[=:])"
)
#: A bare opaque token: 20+ letters and digits with upper case, lower case and digits mixed.
TOKEN_RE = r"^[A-Za-z0-9]{20,}$"

NO_SECRET_RULE = {
    "rule": (
        f"!self.matches(r'{SECRET_RE}') && !(self.matches(r'{TOKEN_RE}') && "
        "self.matches(r'[A-Z]') && self.matches(r'[a-z]') && self.matches(r'[0-9]'))"
    ),
    "message": "must not hold a secret value (API key, token, password): "
    "reference a Secret (e.g. tracking.comet.apiKeySecretRef) instead",
}
NO_QUERY_RULE = {
    "rule": "!self.contains('?') && !self.contains('#')",
    "message": "must not carry a query string or fragment: presigned URLs and tokens are "
    "secrets; give the pods storage credentials instead",
}


def uri_rules(kind: Literal["data", "model"]) -> list[dict[str, str]]:
    """CEL rules for a URI field: scheme, no query string, no secret."""
    if kind == "model":
        scheme = {
            "rule": f"self.matches(r'{MODEL_URI_RE}')",
            "message": "must be hf://[org/]name[@revision], s3://bucket/path, gs://bucket/path, "
            "file:///path or pvc://claim/path",
        }
    else:
        scheme = {
            "rule": f"self.matches(r'{DATA_URI_RE}')",
            "message": "must be s3://bucket/path, gs://bucket/path, file:///path or "
            "pvc://claim/path (no credentials)",
        }
    return [scheme, NO_QUERY_RULE, NO_SECRET_RULE]


def cel(*rules: dict[str, str]) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules."""
    return {"x-kubernetes-validations": list(rules)}


URI_MAX = 2048
DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
METRIC_RE = r"^[A-Za-z0-9_][A-Za-z0-9_./:-]*$"

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_RE)]
FreeText = Annotated[str, Field(max_length=256, json_schema_extra=cel(NO_SECRET_RULE))]
LabelValue = Annotated[
    str, Field(max_length=63, pattern=LABEL_VALUE_RE, json_schema_extra=cel(NO_SECRET_RULE))
]
LabelKey = Annotated[
    str,
    Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        json_schema_extra=cel(NO_SECRET_RULE),
    ),
]
MetricName = Annotated[str, Field(min_length=1, max_length=256, pattern=METRIC_RE)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
StatusText = Annotated[str, Field(max_length=32768)]

# --------------------------------------------------------------------------------------------
# Shared


class Condition(BaseModel):
    """A standard condition (as metav1.Condition): `kubectl wait --for=condition=<type>`."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(max_length=316, description="Condition type, e.g. Succeeded, Running.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None, max_length=1024, description="CamelCase reason for the last transition."
    )
    message: str | None = Field(
        default=None, max_length=32768, description="Human-readable detail."
    )
    lastTransitionTime: Timestamp | None = Field(
        default=None, description="When the status last changed."
    )
    observedGeneration: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed for."
    )


CONDITIONS_SCHEMA = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


def conditions_field() -> Any:
    return Field(
        default_factory=list,
        max_length=64,
        description="Standard conditions (type/status/reason/message/lastTransitionTime).",
        json_schema_extra=CONDITIONS_SCHEMA,
    )


class Toleration(SpecModel):
    """A pod toleration (the subset Flywheel passes through)."""

    key: LabelKey | None = Field(default=None, description="Taint key; empty matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(default=None, description="Taint value (for Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    tolerationSeconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound."
    )


# --------------------------------------------------------------------------------------------
# FineTuneRun


class Resources(SpecModel):
    """Where and how wide the run is: nodes x GPUs per node on a pool."""

    nodes: int = Field(default=1, ge=1, le=256, description="Nodes (one pod each), >= 1.")
    gpusPerNode: int = Field(
        default=8, ge=1, le=8, description="GPUs per node (1..8); torchrun's nproc-per-node."
    )
    nodePool: DnsLabel | None = Field(
        default=None,
        description="A pool preset from the operator's config (nodeSelector, tolerations, "
        "prices). Empty: the operator's default pool (h200).",
    )
    nodeSelector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra node labels, merged over the pool's nodeSelector.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Extra tolerations, added to the pool's.",
    )


class Preflight(SpecModel):
    """Preflight: a CPU Job that checks data, tokenizer and coverage before any GPU pod."""

    enabled: bool = Field(default=True, description="Run preflight before training.")


def _obj(factory: Any, description: str) -> Any:
    """A nested object field that the API server defaults to `{}` (then its own defaults)."""
    return Field(
        default_factory=factory, description=description, json_schema_extra={"default": {}}
    )


class FineTuneRunSpec(SpecModel):
    """What to train, on what, where, and where the result goes."""

    baseModel: str = Field(
        max_length=URI_MAX,
        description="Base model URI: hf://[org/]name[@revision], s3://, gs://, file:/// or "
        "pvc://<claim>/<path>. Immutable.",
        json_schema_extra=cel(*uri_rules("model")),
    )
    modelName: DnsLabel = Field(
        description="The registry Model this run produces a version of. Immutable."
    )
    dataset: Dataset = Field(
        description="Training and evaluation data, and the categories it must cover. Immutable."
    )
    hyperparameters: Hyperparameters = _obj(Hyperparameters, "Optimisation settings.")
    resources: Resources = _obj(Resources, "Nodes, GPUs and node pool. Immutable.")
    fsdp: Fsdp = _obj(Fsdp, "FSDP2 options.")
    checkpoint: Checkpoint = _obj(Checkpoint, "Distributed checkpointing.")
    output: Output = Field(description="Where the exported model is written. Immutable.")
    tracking: Tracking = _obj(Tracking, "Experiment tracking (Comet).")
    image: str | None = Field(
        default=None,
        max_length=512,
        description="Trainer container image; default from the operator's config.",
        json_schema_extra=cel(NO_SECRET_RULE),
    )
    maxRestarts: int = Field(
        default=3, ge=0, le=100, description="Attempts after the first before the run fails."
    )
    suspend: bool = Field(
        default=False, description="Stop the pods and set phase Suspended; false resumes."
    )
    preflight: Preflight = _obj(Preflight, "Preflight checks on CPU before training.")


RunPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]


class Progress(BaseModel):
    """Training progress as reported by the trainer."""

    model_config = ConfigDict(extra="forbid")

    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    totalSteps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    percent: str | None = Field(
        default=None, max_length=8, description="step / totalSteps as text, e.g. `42%`."
    )
    tokensPerSecond: float | None = Field(
        default=None, ge=0, description="Non-padding tokens/s over all GPUs."
    )
    tokens: int | None = Field(default=None, ge=0, description="Training tokens processed.")
    eta: Timestamp | None = Field(default=None, description="Estimated completion time.")


class AttemptStatus(BaseModel):
    """One attempt (Job) of the run."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1, description="Attempt number (1-based).")
    job: str | None = Field(default=None, description="Name of the attempt's Job.")
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Deleted"] | None = Field(
        default=None, description="Outcome of the attempt."
    )
    startTime: Timestamp | None = Field(default=None, description="First pod start.")
    completionTime: Timestamp | None = Field(default=None, description="Last pod finish.")
    gpuHours: float | None = Field(default=None, ge=0, description="GPU-hours it used.")
    reason: str | None = Field(default=None, description="Why it ended, CamelCase.")
    message: StatusText | None = Field(default=None, description="Failing pod's message.")


class PreflightStatus(BaseModel):
    """Results of the preflight Job."""

    model_config = ConfigDict(extra="forbid")

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"] | None = Field(
        default=None, description="Preflight outcome."
    )
    job: str | None = Field(default=None, description="Name of the preflight Job.")
    startTime: Timestamp | None = Field(default=None, description="When preflight started.")
    completionTime: Timestamp | None = Field(default=None, description="When it finished.")
    examples: int | None = Field(default=None, ge=0, description="Valid training examples.")
    invalidExamples: int | None = Field(default=None, ge=0, description="Malformed lines.")
    tokens: int | None = Field(default=None, ge=0, description="Training tokens per epoch.")
    steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    categories: dict[str, int] = Field(
        default_factory=dict, description="Training examples per category."
    )
    missingCategories: list[str] = Field(
        default_factory=list, description="Required categories below minExamplesPerCategory."
    )
    problems: list[str] = Field(
        default_factory=list, description="First problems found (file:line: what is wrong)."
    )
    estimatedGpuHours: float | None = Field(default=None, ge=0, description="Estimate.")
    estimatedCost: float | None = Field(default=None, ge=0, description="Estimate (pool price).")
    message: StatusText | None = Field(default=None, description="Summary of the result.")


class FineTuneRunStatus(BaseModel):
    """Observed state of a run; written by the operator only."""

    model_config = ConfigDict(extra="forbid")

    phase: RunPhase | None = Field(
        default=None, description="Pending, Running, Succeeded, Failed or Suspended."
    )
    attempt: int | None = Field(default=None, ge=0, description="Current attempt (1-based).")
    observedGeneration: int | None = Field(
        default=None, ge=0, description="metadata.generation last acted on."
    )
    conditions: list[Condition] = conditions_field()
    startTime: Timestamp | None = Field(default=None, description="When the first pod started.")
    completionTime: Timestamp | None = Field(
        default=None, description="When the run Succeeded or Failed."
    )
    attempts: list[AttemptStatus] = Field(
        default_factory=list, description="Every attempt so far, oldest first."
    )
    progress: Progress | None = Field(default=None, description="Training progress.")
    trackingUrl: str | None = Field(default=None, description="Comet experiment URL.")
    experimentKey: str | None = Field(
        default=None, description="Comet experiment key (same for every attempt)."
    )
    lastCheckpoint: str | None = Field(
        default=None, description="URI of the last complete checkpoint."
    )
    modelVersion: str | None = Field(
        default=None, description="Name of the ModelVersion this run produced."
    )
    gpuHours: float | None = Field(
        default=None, ge=0, description="GPU-hours over all attempts (pod run time x GPUs)."
    )
    estimatedCost: float | None = Field(
        default=None, ge=0, description="gpuHours x the pool's gpuHourPrice."
    )
    preflight: PreflightStatus | None = Field(default=None, description="Preflight results.")
    message: StatusText | None = Field(default=None, description="Human-readable summary.")


class FineTuneRun(BaseModel):
    """A training run: `kubectl get ftr`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal["flywheel.dev/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneRun"] = "FineTuneRun"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneRunSpec
    status: FineTuneRunStatus | None = None


#: FineTuneRun spec fields that cannot change after creation (CEL `self == oldSelf`).
IMMUTABLE_RUN_FIELDS = ("baseModel", "modelName", "dataset", "resources", "output")

#: Constraints on trainer-owned spec fields (flywheel_trainer.config declares none), by path
#: inside FineTuneRunSpec. crdgen merges them into the schema wherever the spec appears.
SPEC_PATCHES: dict[str, dict[str, Any]] = {
    "dataset.train": {"maxLength": URI_MAX, **cel(*uri_rules("data"))},
    "dataset.eval": {"maxLength": URI_MAX, **cel(*uri_rules("data"))},
    "checkpoint.uri": {"maxLength": URI_MAX, **cel(*uri_rules("data"))},
    "output.uri": {"maxLength": URI_MAX, **cel(*uri_rules("data"))},
    "dataset.requiredCategories": {"maxItems": 256, "x-kubernetes-list-type": "set"},
    "dataset.requiredCategories[]": {
        "minLength": 1,
        "maxLength": 128,
        "pattern": METRIC_RE,
        **cel(NO_SECRET_RULE),
    },
    "tracking.comet.workspace": {"maxLength": 128, **cel(NO_SECRET_RULE)},
    "tracking.comet.project": {"maxLength": 128, **cel(NO_SECRET_RULE)},
    "tracking.comet.apiKeySecretRef.name": {"maxLength": 253, "pattern": DNS_SUBDOMAIN_RE},
    "tracking.comet.apiKeySecretRef.key": {
        "maxLength": 253,
        "pattern": r"^[-._a-zA-Z0-9]+$",
        **cel(NO_SECRET_RULE),
    },
}

#: Cross-field rules on FineTuneRunSpec (wherever it appears, including schedule templates).
SPEC_RULES = [
    {
        "rule": "self.hyperparameters.globalBatchSize % (self.hyperparameters.microBatchSize * "
        "self.resources.nodes * self.resources.gpusPerNode) == 0",
        "fieldPath": ".hyperparameters.globalBatchSize",
        "message": "hyperparameters.globalBatchSize must be a multiple of microBatchSize x "
        "resources.nodes x resources.gpusPerNode",
    },
]

# --------------------------------------------------------------------------------------------
# ModelVersion


class Artifact(BaseModel):
    """The exported model files."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(
        max_length=URI_MAX,
        description="Where the files are.",
        json_schema_extra=cel(*uri_rules("data")),
    )
    digest: str = Field(
        max_length=128,
        pattern=r"^sha256:[a-f0-9]{64}$",
        description="Content digest over the files: sha256:<hex>.",
    )
    format: Literal["huggingface-safetensors"] = Field(
        default="huggingface-safetensors", description="Artifact format."
    )


class SourceRun(BaseModel):
    """The FineTuneRun that produced a version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=253, description="FineTuneRun name.")
    uid: str = Field(max_length=64, description="FineTuneRun uid.")


class DatasetRecord(BaseModel):
    """The data a version was trained on."""

    model_config = ConfigDict(extra="forbid")

    train: str = Field(max_length=URI_MAX, description="Training data URI.")
    eval: str | None = Field(default=None, max_length=URI_MAX, description="Eval data URI.")
    digests: dict[str, str] = Field(
        default_factory=dict, max_length=16, description="sha256 per data file (train, eval)."
    )


class TrackingRecord(BaseModel):
    """Where the version's training was tracked."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None,
        max_length=URI_MAX,
        description="Comet experiment URL.",
        json_schema_extra=cel(NO_QUERY_RULE),
    )
    experimentKey: str | None = Field(default=None, max_length=64, description="Comet key.")


class Comparison(BaseModel):
    """Metric deltas against the version the promoted alias pointed to at registration."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field(max_length=63, description="The alias compared against.")
    version: int = Field(ge=1, description="The version that alias pointed to.")
    deltas: dict[str, float] = Field(
        default_factory=dict, description="This version's metric minus the baseline's."
    )


class ModelVersionSpec(BaseModel):
    """Immutable record of one trained model; written once by the operator."""

    model_config = ConfigDict(extra="forbid")

    modelName: DnsLabel = Field(description="The Model this is a version of.")
    version: int = Field(ge=1, description="Version number, increasing per model.")
    artifact: Artifact = Field(description="The exported files.")
    baseModel: str = Field(max_length=URI_MAX, description="Base model URI.")
    sourceRun: SourceRun = Field(description="The run that produced it.")
    dataset: DatasetRecord = Field(description="The data it was trained on.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Flat metrics from the trainer summary: eval_loss, eval_loss/<category>, "
        "tool_call_accuracy/<category>, ...",
    )
    tracking: TrackingRecord | None = Field(default=None, description="Comet experiment.")
    comparison: Comparison | None = Field(
        default=None, description="Per-metric deltas against the promoted alias's version."
    )


class ModelVersion(BaseModel):
    """One trained model: `kubectl get mv`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal["flywheel.dev/v1alpha1"] = API_VERSION
    kind: Literal["ModelVersion"] = "ModelVersion"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelVersionSpec


# --------------------------------------------------------------------------------------------
# Model


class Gate(BaseModel):
    """A candidate passes when its metric lies within [min, max]."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=cel(
            {"rule": "has(self.min) || has(self.max)", "message": "a gate needs min or max"}
        ),
    )

    metric: MetricName = Field(
        description="Metric name, e.g. eval_loss or tool_call_accuracy/email."
    )
    min: float | None = Field(default=None, description="Lowest acceptable value.")
    max: float | None = Field(default=None, description="Highest acceptable value.")


class NoRegression(BaseModel):
    """No listed metric may be worse than the current alias target's by more than tolerance."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[MetricName] = Field(
        default_factory=list,
        max_length=64,
        description="Metrics compared; names containing `loss` are better lower, others higher.",
    )
    tolerance: float = Field(default=0.0, ge=0, description="Allowed worsening.")


class Promotion(BaseModel):
    """Which alias a new version is promoted to, and the gates it must pass."""

    model_config = ConfigDict(extra="forbid")

    alias: DnsLabel = Field(default="production", description="Alias moved on promotion.")
    gates: list[Gate] = Field(default_factory=list, max_length=64, description="All must hold.")
    noRegression: NoRegression | None = Field(
        default=None, description="Compare with the alias's current version."
    )


class ServingTarget(BaseModel):
    """A Deployment container that serves the promoted alias."""

    model_config = ConfigDict(extra="forbid")

    deployment: DnsLabel = Field(description="Deployment name (same namespace).")
    container: DnsLabel = Field(description="Container that gets FLYWHEEL_MODEL_URI.")


class ModelSpec(BaseModel):
    """Registry entry for one model name (metadata.name = modelName)."""

    model_config = ConfigDict(extra="forbid")

    promotion: Promotion | None = Field(
        default=None, description="Promotion policy; without it only `latest` moves."
    )
    servingTargets: list[ServingTarget] = Field(
        default_factory=list,
        max_length=16,
        description="Deployments updated when the promoted alias moves.",
    )
    pinnedAliases: dict[str, int] = Field(
        default_factory=dict,
        max_length=16,
        description="Aliases pinned by hand to a version (rollback): the operator points the "
        "alias there and does not move it while pinned.",
    )


class AliasTarget(BaseModel):
    """What an alias points at: one stable object serving reads."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="Version number.")
    modelVersion: str | None = Field(default=None, description="ModelVersion name.")
    uri: str = Field(description="Artifact URI.")
    digest: str = Field(description="Artifact digest.")
    updateTime: Timestamp | None = Field(default=None, description="When the alias moved.")


class VersionRef(BaseModel):
    """A registered version."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="Version number.")
    name: str = Field(description="ModelVersion name.")
    digest: str | None = Field(default=None, description="Artifact digest.")
    created: Timestamp | None = Field(default=None, description="Registration time.")


class ModelStatus(BaseModel):
    """Aliases and versions; written by the operator."""

    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = Field(default=None, ge=0, description="Generation seen.")
    aliases: dict[str, AliasTarget] = Field(
        default_factory=dict, description="Alias -> version, e.g. latest, production."
    )
    versions: list[VersionRef] = Field(default_factory=list, description="Versions, oldest first.")
    conditions: list[Condition] = conditions_field()


class Model(BaseModel):
    """A registry entry: `kubectl get model`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal["flywheel.dev/v1alpha1"] = API_VERSION
    kind: Literal["Model"] = "Model"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelSpec = Field(default_factory=ModelSpec)
    status: ModelStatus | None = None


# --------------------------------------------------------------------------------------------
# FineTuneSchedule


class TemplateMetadata(BaseModel):
    """Labels and annotations copied onto each run."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Labels."
    )
    annotations: dict[str, FreeText] = Field(
        default_factory=dict, max_length=64, description="Annotations."
    )


class RunTemplate(BaseModel):
    """The FineTuneRun each schedule tick creates."""

    model_config = ConfigDict(extra="forbid")

    metadata: TemplateMetadata | None = Field(default=None, description="Run metadata.")
    spec: FineTuneRunSpec = Field(
        description="FineTuneRun spec. Strings in dataset may use {{ isoWeek }}, {{ date }} "
        "placeholders, filled in with the scheduled time."
    )


CRON_RE = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"


class FineTuneScheduleSpec(BaseModel):
    """A cron schedule that creates FineTuneRuns (like CronJob)."""

    model_config = ConfigDict(extra="forbid")

    schedule: str = Field(
        max_length=128, pattern=CRON_RE, description="Cron expression, e.g. `0 3 * * 1`."
    )
    timeZone: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9_+/-]+$",
        description="IANA time zone of the schedule; default UTC.",
    )
    concurrencyPolicy: Literal["Forbid", "Replace", "Allow"] = Field(
        default="Forbid", description="What to do when the previous run is still active."
    )
    startingDeadlineSeconds: int | None = Field(
        default=None, ge=0, description="Skip a tick missed by more than this many seconds."
    )
    suspend: bool = Field(default=False, description="Create no new runs.")
    successfulRunsHistoryLimit: int = Field(default=3, ge=0, description="Succeeded runs kept.")
    failedRunsHistoryLimit: int = Field(default=1, ge=0, description="Failed runs kept.")
    runTemplate: RunTemplate = Field(description="Template of the runs.")


class FineTuneScheduleStatus(BaseModel):
    """Observed state of a schedule."""

    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = Field(default=None, ge=0, description="Generation seen.")
    lastScheduleTime: Timestamp | None = Field(default=None, description="Last tick run.")
    nextScheduleTime: Timestamp | None = Field(default=None, description="Next tick.")
    active: list[str] = Field(default_factory=list, description="Names of active runs.")
    lastRun: str | None = Field(default=None, description="Name of the newest run.")
    lastRunPhase: RunPhase | None = Field(default=None, description="Its phase.")
    lastRunCost: float | None = Field(default=None, ge=0, description="Its estimated cost.")
    lastSuccessfulRun: str | None = Field(default=None, description="Newest succeeded run.")
    lastTrigger: str | None = Field(
        default=None, description="Last flywheel.dev/trigger annotation value acted on."
    )
    conditions: list[Condition] = conditions_field()


class FineTuneSchedule(BaseModel):
    """The retraining flywheel: `kubectl get fts`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal["flywheel.dev/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneSchedule"] = "FineTuneSchedule"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneScheduleSpec
    status: FineTuneScheduleStatus | None = None
