"""The registry's API: ModelVersion (`kubectl get mv`, one immutable trained model) and Model
(`kubectl get model`: promotion policy, serving targets, aliases and versions)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..vocab import API_VERSION
from .common import (
    NO_QUERY_RULE,
    URI_MAX,
    Condition,
    DnsLabel,
    MetricName,
    Timestamp,
    cel,
    conditions_field,
    uri_rules,
)


class Artifact(BaseModel):
    """The exported model files."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(max_length=URI_MAX, description="Where the files are.",
                     json_schema_extra=cel(*uri_rules("data")))
    digest: str = Field(max_length=128, pattern=r"^sha256:[a-f0-9]{64}$",
                        description="Content digest over the files: sha256:<hex>.")
    format: Literal["huggingface-safetensors"] = Field(
        default="huggingface-safetensors", description="Artifact format.")
    card: str | None = Field(
        default=None, max_length=URI_MAX,
        description="The model card (README.md beside the weights, inside the digest).")


class SourceRun(BaseModel):
    """The FineTuneRun that produced a version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=253, description="FineTuneRun name.")
    uid: str = Field(max_length=64, description="FineTuneRun uid.")


class ParentRecord(BaseModel):
    """The registry version a version was trained from (lineage)."""

    model_config = ConfigDict(extra="forbid")

    modelVersion: str = Field(max_length=253, description="Parent ModelVersion name.")
    version: int = Field(ge=1, description="Parent version number.")
    digest: str = Field(max_length=128, description="Parent artifact digest (verified).")
    ref: str | None = Field(default=None, max_length=URI_MAX,
                            description="The reference the run named, e.g. model://m@production.")


class DatasetRecord(BaseModel):
    """The data a version was trained on."""

    model_config = ConfigDict(extra="forbid")

    train: str = Field(max_length=URI_MAX, description="Training data URI.")
    eval: str | None = Field(default=None, max_length=URI_MAX, description="Eval data URI.")
    digests: dict[str, str] = Field(
        default_factory=dict, max_length=16, description="sha256 per data file (train, eval).")


class TrackingRecord(BaseModel):
    """Where the version's training was tracked."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=URI_MAX, description="Comet experiment URL.",
                            json_schema_extra=cel(NO_QUERY_RULE))
    experimentKey: str | None = Field(default=None, max_length=64, description="Comet key.")


class Comparison(BaseModel):
    """Metric deltas against the version the promoted alias pointed to at registration."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field(max_length=63, description="The alias compared against.")
    version: int = Field(ge=1, description="The version that alias pointed to.")
    deltas: dict[str, float] = Field(
        default_factory=dict, description="This version's metric minus the baseline's.")


class ModelVersionSpec(BaseModel):
    """Immutable record of one trained model; written once by the operator."""

    model_config = ConfigDict(extra="forbid")

    modelName: DnsLabel = Field(description="The Model this is a version of.")
    version: int = Field(ge=1, description="Version number, increasing per model.")
    artifact: Artifact = Field(description="The exported files.")
    baseModel: str = Field(max_length=URI_MAX, description="Base model URI (for a registry "
                           "parent: its artifact URI).")
    parent: ParentRecord | None = Field(
        default=None, description="The registry version it was trained from, if any.")
    sourceRun: SourceRun = Field(description="The run that produced it.")
    dataset: DatasetRecord = Field(description="The data it was trained on.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Flat metrics from the trainer summary: eval_loss, eval_loss/<category>, "
        "tool_call_accuracy/<category>, ...")
    tracking: TrackingRecord | None = Field(default=None, description="Comet experiment.")
    comparison: Comparison | None = Field(
        default=None, description="Per-metric deltas against the promoted alias's version.")


class ModelVersion(BaseModel):
    """One trained model: `kubectl get mv`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal[API_VERSION] = API_VERSION
    kind: Literal["ModelVersion"] = "ModelVersion"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelVersionSpec


# --- Model ----------------------------------------------------------------------------------


class Gate(BaseModel):
    """A candidate passes when its metric lies within [min, max]."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=cel(
            {"rule": "has(self.min) || has(self.max)", "message": "a gate needs min or max"}))

    metric: MetricName = Field(
        description="Metric name, e.g. eval_loss or tool_call_accuracy/email.")
    min: float | None = Field(default=None, description="Lowest acceptable value.")
    max: float | None = Field(default=None, description="Highest acceptable value.")


class NoRegression(BaseModel):
    """No listed metric may be worse than the current alias target's by more than tolerance."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[MetricName] = Field(
        default_factory=list,
        max_length=64,
        description="Metrics compared; names containing `loss` are better lower, others higher.")
    tolerance: float = Field(default=0.0, ge=0, description="Allowed worsening.")


class Promotion(BaseModel):
    """Which alias a new version is promoted to, and the gates it must pass."""

    model_config = ConfigDict(extra="forbid")

    alias: DnsLabel = Field(default="production", description="Alias moved on promotion.")
    gates: list[Gate] = Field(default_factory=list, max_length=64, description="All must hold.")
    noRegression: NoRegression | None = Field(
        default=None, description="Compare with the alias's current version.")


class ServingTarget(BaseModel):
    """What serves the promoted alias: a Deployment's container (it gets FLYWHEEL_MODEL_URI
    and the pod template the URI and digest annotations), or a KServe InferenceService (its
    spec.predictor.model.storageUri and the digest annotation; nothing else is touched)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=cel(
        {"rule": "has(self.deployment) != has(self.inferenceService)",
         "message": "name either a deployment (with its container) or an inferenceService"},
        {"rule": "!has(self.deployment) || has(self.container)",
         "message": "a deployment target names the container that serves"}))

    deployment: DnsLabel | None = Field(default=None, description="Deployment name (same "
                                        "namespace).")
    container: DnsLabel | None = Field(
        default=None, description="The Deployment's container that gets FLYWHEEL_MODEL_URI.")
    inferenceService: DnsLabel | None = Field(
        default=None, description="KServe InferenceService name (same namespace).")


class ModelSpec(BaseModel):
    """Registry entry for one model name (metadata.name = modelName)."""

    model_config = ConfigDict(extra="forbid")

    promotion: Promotion | None = Field(
        default=None, description="Promotion policy; without it only `latest` moves.")
    servingTargets: list[ServingTarget] = Field(
        default_factory=list,
        max_length=16,
        description="Deployments updated when the promoted alias moves.")
    pinnedAliases: dict[str, int] = Field(
        default_factory=dict,
        max_length=16,
        description="Aliases pinned by hand to a version (rollback): the operator points the "
        "alias there and does not move it while pinned.")


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

    aliases: dict[str, AliasTarget] = Field(
        default_factory=dict, description="Alias -> version, e.g. latest, production.")
    versions: list[VersionRef] = Field(
        default_factory=list,
        description="The newest versions (at most 100), oldest first; every version: "
        "kubectl get modelversions -l flywheel.dev/model=NAME.")
    conditions: list[Condition] = conditions_field()


class Model(BaseModel):
    """A registry entry: `kubectl get model`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal[API_VERSION] = API_VERSION
    kind: Literal["Model"] = "Model"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelSpec = Field(default_factory=ModelSpec)
    status: ModelStatus | None = None
