"""FineTuneRun (`kubectl get ftr`): spec, status and the CRD-only constraints on the spec.

The spec reuses the trainer's torch-free spec models, so the trainer config and the CRD share
one vocabulary; constraints the trainer does not declare (length limits and CEL rules for URIs
and secrets) are added here in `SPEC_PATCHES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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

from ..vocab import API_VERSION, RunPhase
from .common import (
    DNS_SUBDOMAIN_RE,
    METRIC_RE,
    NO_SECRET_RULE,
    URI_MAX,
    Condition,
    DnsLabel,
    LabelValue,
    StatusText,
    Timestamp,
    Toleration,
    cel,
    conditions_field,
    uri_rules,
)
from .storage import Storage


class Resources(SpecModel):
    """Where and how wide the run is: nodes x GPUs per node on a pool."""

    nodes: int = Field(default=1, ge=1, le=256, description="Nodes (one pod each), >= 1.")
    gpusPerNode: int = Field(
        default=8, ge=1, le=8, description="GPUs per node (1..8); torchrun's nproc-per-node.")
    nodePool: DnsLabel | None = Field(
        default=None,
        description="A pool preset from the operator's config (nodeSelector, tolerations, "
        "prices). Empty: the operator's default pool (h200).")
    nodeSelector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra node labels, merged over the pool's nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32,
                                          description="Extra tolerations, added to the pool's.")


class Preflight(SpecModel):
    """Preflight: a CPU Job that checks data, tokenizer and coverage before any GPU pod."""

    enabled: bool = Field(default=True, description="Run preflight before training.")


def _obj(factory: Any, description: str) -> Any:
    """A nested object field that the API server defaults to `{}` (then its own defaults)."""
    return Field(
        default_factory=factory, description=description, json_schema_extra={"default": {}})


class FineTuneRunSpec(SpecModel):
    """What to train, on what, where, and where the result goes."""

    baseModel: str = Field(
        max_length=URI_MAX,
        description="Base model: a registry version of this namespace, model://MODEL@ALIAS "
        "(e.g. model://flow-agent@production) or model://MODEL/VERSION, resolved to its "
        "artifact and digest when the run starts (status.baseModel); or a URI: "
        "hf://[org/]name[@revision], s3://, gs://, file:/// or pvc://<claim>/<path>. Immutable.",
        json_schema_extra=cel(*uri_rules("model")))
    modelName: DnsLabel = Field(
        description="The registry Model this run produces a version of. Immutable.")
    dataset: Dataset = Field(
        description="Training and evaluation data, and the categories it must cover. Immutable.")
    hyperparameters: Hyperparameters = _obj(Hyperparameters, "Optimisation settings.")
    resources: Resources = _obj(Resources, "Nodes, GPUs and node pool. Immutable.")
    fsdp: Fsdp = _obj(Fsdp, "FSDP2 options.")
    checkpoint: Checkpoint = _obj(Checkpoint, "Distributed checkpointing.")
    output: Output = Field(description="Where the exported model is written: the run's own "
                           "directory `<output.uri>/<run-name>-<uid8>/` (status.outputUri), so "
                           "runs naming one output never overwrite each other. Immutable.")
    resumeFrom: str | None = Field(
        default=None, max_length=URI_MAX,
        description="Warm start from another run's checkpoint (a step-N directory, or a "
        "checkpoint directory: its newest complete step) when this run has none of its own. "
        "Without it a run only ever resumes from checkpoints it wrote itself. Immutable.",
        json_schema_extra=cel(*uri_rules("data")))
    tracking: Tracking = _obj(Tracking, "Experiment tracking (Comet).")
    image: str | None = Field(
        default=None,
        max_length=512,
        description="Trainer container image; default from the operator's config.",
        json_schema_extra=cel(NO_SECRET_RULE))
    maxRestarts: int = Field(
        default=3, ge=0, le=100, description="Attempts after failed ones (a crash, OOMKilled, "
        "a communication or CUDA error, a stall) before the run fails.")
    maxDisruptions: int = Field(
        default=10, ge=0, le=1000, description="Attempts after disrupted ones (node lost, pod "
        "evicted or preempted); they do not spend maxRestarts.")
    stallTimeoutSeconds: int | None = Field(
        default=None, ge=10, le=7 * 86400, description="No heartbeat or no optimizer step for "
        "this long while training: the attempt is Stalled, torn down and restarted from its "
        "checkpoint. Default: the operator's (30 min); model loading and evaluation have "
        "their own allowances.")
    suspend: bool = Field(
        default=False, description="Stop the pods and set phase Suspended; false resumes.")
    preflight: Preflight = _obj(Preflight, "Preflight checks on CPU before training.")
    storage: Storage | None = Field(
        default=None,
        description="Storage credentials and endpoints (Secret names, S3 endpoint, "
        "ServiceAccount); unset fields come from the operator config's `storage`.")
    queueName: DnsLabel | None = Field(
        default=None,
        description="Kueue LocalQueue that admits the run (all of its pods or none). Empty: "
        "the operator's default queue for the namespace, if any, else no queue.")
    priorityClassName: DnsLabel | None = Field(
        default=None,
        description="Kueue WorkloadPriorityClass of a queued run: a higher one may preempt "
        "lower ones, which resume from their last complete checkpoint.")


class Progress(BaseModel):
    """Training progress as rank 0 reports it (polled while the run trains)."""

    model_config = ConfigDict(extra="forbid")

    stage: str | None = Field(
        default=None, max_length=32, description="starting, loading-model, tokenizing, "
        "training, evaluating, exporting; done at the end.")
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    totalSteps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    percent: str | None = Field(
        default=None, max_length=8, description="step / totalSteps as text, e.g. `42%`.")
    epoch: int | None = Field(default=None, ge=0, description="Current epoch (1-based).")
    loss: float | None = Field(default=None, description="Training loss (smoothed).")
    tokensPerSecond: float | None = Field(
        default=None, ge=0, description="Non-padding tokens/s over all GPUs.")
    mfu: float | None = Field(default=None, ge=0, description="Model FLOPs utilisation (GPU).")
    tokens: int | None = Field(default=None, ge=0, description="Training tokens processed.")
    eta: Timestamp | None = Field(default=None, description="Estimated end of training.")
    heartbeatTime: Timestamp | None = Field(
        default=None, description="Rank 0's last heartbeat the operator heard.")


class LastCheckpoint(BaseModel):
    """The newest complete distributed checkpoint (the next attempt resumes from it)."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0, description="Optimizer step it holds.")
    time: Timestamp | None = Field(default=None, description="When it completed.")
    uri: str | None = Field(default=None, description="Where it is.")


class AttemptStatus(BaseModel):
    """One attempt (Job) of the run."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1, description="Attempt number (1-based).")
    job: str | None = Field(default=None, description="Name of the attempt's Job.")
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Preempted",
                   "Deleted"] | None = Field(
        default=None, description="Outcome of the attempt.")
    startTime: Timestamp | None = Field(default=None, description="First pod start.")
    completionTime: Timestamp | None = Field(default=None, description="Last pod finish.")
    gpuHours: float | None = Field(default=None, ge=0, description="GPU-hours it used.")
    reason: str | None = Field(
        default=None, description="Why it ended: Completed, OOMKilled, CommunicationError, "
        "CUDAError, CUDAOutOfMemory, DataError, Stalled, NodeLost, Evicted, PodDeleted, Preempted, "
        "ImagePullBackOff, CreateContainerConfigError, ... or AttemptFailed.")
    message: StatusText | None = Field(default=None, description="Failing pod's message.")


class PreflightStatus(BaseModel):
    """Results of the preflight Job."""

    model_config = ConfigDict(extra="forbid")

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"] | None = Field(
        default=None, description="Preflight outcome.")
    job: str | None = Field(default=None, description="Name of the preflight Job.")
    startTime: Timestamp | None = Field(default=None, description="When preflight started.")
    completionTime: Timestamp | None = Field(default=None, description="When it finished.")
    examples: int | None = Field(default=None, ge=0, description="Valid training examples.")
    invalidExamples: int | None = Field(default=None, ge=0, description="Malformed lines.")
    tokens: int | None = Field(default=None, ge=0, description="Training tokens per epoch.")
    steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    parameters: int | None = Field(
        default=None, ge=0, description="Base model parameters (sizes the pods' model cache).")
    categories: dict[str, int] = Field(
        default_factory=dict, description="Training examples per category.")
    missingCategories: list[str] = Field(
        default_factory=list, description="Required categories below minExamplesPerCategory.")
    problems: list[str] = Field(
        default_factory=list, description="First problems found (file:line: what is wrong).")
    estimatedGpuHours: float | None = Field(default=None, ge=0, description="Estimate.")
    estimatedCost: float | None = Field(default=None, ge=0, description="Estimate (pool price).")
    message: StatusText | None = Field(default=None, description="Summary of the result.")


class QueueStatus(BaseModel):
    """Where a queued run stands in Kueue."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The LocalQueue.")
    clusterQueue: str | None = Field(default=None, description="The ClusterQueue admitting it.")
    position: int | None = Field(
        default=None, ge=0, description="Place in the LocalQueue while pending (0: next), where "
        "Kueue's visibility API serves it.")
    flavors: list[str] = Field(
        default_factory=list, description="ResourceFlavors of the admission (e.g. h200).")
    workload: str | None = Field(default=None, description="The current attempt's Workload.")
    admittedAt: Timestamp | None = Field(default=None, description="When Kueue admitted it.")


class ResolvedModel(BaseModel):
    """A registry base model (`model://`), as resolved when the run started."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(max_length=URI_MAX, description="spec.baseModel as written.")
    modelVersion: str = Field(max_length=253, description="The ModelVersion it resolved to.")
    version: int = Field(ge=1, description="Its version number.")
    uri: str = Field(max_length=URI_MAX, description="The artifact the run trains from.")
    digest: str = Field(max_length=128, description="The artifact's digest, verified by the "
                        "trainer before training.")


class GangStatus(BaseModel):
    """The pods of the current attempt once all of them ran: a torchrun gang cannot take a
    restarted rank back, so one of them deleted or replaced ends the attempt."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1, description="The attempt.")
    pods: list[str] = Field(default_factory=list, max_length=256, description="Its pods.")


class FineTuneRunStatus(BaseModel):
    """Observed state of a run; written by the operator only."""

    model_config = ConfigDict(extra="forbid")

    phase: RunPhase | None = Field(
        default=None, description="Pending, Queued, Running, Succeeded, Failed or Suspended.")
    attempt: int | None = Field(default=None, ge=0, description="Current attempt (1-based).")
    observedGeneration: int | None = Field(
        default=None, ge=0, description="metadata.generation last acted on.")
    conditions: list[Condition] = conditions_field()
    startTime: Timestamp | None = Field(default=None, description="When the first pod started.")
    completionTime: Timestamp | None = Field(
        default=None, description="When the run Succeeded or Failed.")
    attempts: list[AttemptStatus] = Field(
        default_factory=list, description="Every attempt so far, oldest first.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    trackingUrl: str | None = Field(default=None, description="Comet experiment URL.")
    baseModel: ResolvedModel | None = Field(
        default=None, description="The registry version a model:// baseModel resolved to.")
    outputUri: str | None = Field(
        default=None, description="The run's own artifact directory under spec.output.uri.")
    checkpointUri: str | None = Field(
        default=None, description="The run's own checkpoint directory.")
    experimentKey: str | None = Field(
        default=None, description="Comet experiment key (same for every attempt).")
    lastCheckpoint: LastCheckpoint | None = Field(
        default=None, description="The last complete checkpoint.")
    modelVersion: str | None = Field(
        default=None, description="Name of the ModelVersion this run produced.")
    gpuHours: float | None = Field(
        default=None, ge=0, description="GPU-hours over all attempts (pod run time x GPUs).")
    estimatedCost: float | None = Field(
        default=None, ge=0, description="gpuHours x the pool's gpuHourPrice.")
    preflight: PreflightStatus | None = Field(default=None, description="Preflight results.")
    gang: GangStatus | None = Field(default=None, description="The running attempt's pods.")
    queue: QueueStatus | None = Field(default=None, description="Kueue queue and admission.")
    message: StatusText | None = Field(default=None, description="Human-readable summary.")


class FineTuneRun(BaseModel):
    """A training run: `kubectl get ftr`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal[API_VERSION] = API_VERSION
    kind: Literal["FineTuneRun"] = "FineTuneRun"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneRunSpec
    status: FineTuneRunStatus | None = None


@dataclass(frozen=True)
class Run:
    """A FineTuneRun as the operator's decisions see it: parsed once, where it enters
    (`Run.parse`, on the body the reconciler reads from kopf's index), into the API models."""

    name: str
    namespace: str
    uid: str
    spec: FineTuneRunSpec
    status: FineTuneRunStatus = field(default_factory=FineTuneRunStatus)
    generation: int = 1
    resource_version: str = ""

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Run:
        """A run body (as kopf or the API server gives it); the spec and status validated
        (a misspelt status key fails here, loudly)."""
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta["uid"],
                   FineTuneRunSpec.model_validate(body.get("spec") or {}),
                   FineTuneRunStatus.model_validate(body.get("status") or {}),
                   meta.get("generation", 1), meta.get("resourceVersion", ""))

    @property
    def ref(self) -> dict[str, Any]:
        """The run as Events (kube.post_event) and ownerReferences name it."""
        return {"apiVersion": API_VERSION, "kind": "FineTuneRun",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}


def status_document(status: BaseModel) -> dict[str, Any]:
    """A status model as written: the fields set, a list or map set empty included, no
    Nones (a field set to None is removed: `status_patch`)."""
    return status.model_dump(exclude_unset=True, exclude_none=True)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that writes the whole `new` status over `old` (status documents):
    every field of `new`, and None (removal) for each top-level field it no longer has."""
    return {**new, **{k: None for k in old if k not in new}}


#: FineTuneRun spec fields that cannot change after creation (CEL `self == oldSelf`).
IMMUTABLE_RUN_FIELDS = ("baseModel", "modelName", "dataset", "resources", "output",
                        "resumeFrom")

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
        **cel(NO_SECRET_RULE)},
    "tracking.comet.workspace": {"maxLength": 128, **cel(NO_SECRET_RULE)},
    "tracking.comet.project": {"maxLength": 128, **cel(NO_SECRET_RULE)},
    "tracking.comet.apiKeySecretRef.name": {"maxLength": 253, "pattern": DNS_SUBDOMAIN_RE},
    "tracking.comet.apiKeySecretRef.key": {
        "maxLength": 253,
        "pattern": r"^[-._a-zA-Z0-9]+$",
        **cel(NO_SECRET_RULE)}}

#: Cross-field rules on FineTuneRunSpec (wherever it appears, including schedule templates).
SPEC_RULES = [
    {
        "rule": "self.hyperparameters.globalBatchSize % (self.hyperparameters.microBatchSize * "
        "self.resources.nodes * self.resources.gpusPerNode) == 0",
        "fieldPath": ".hyperparameters.globalBatchSize",
        "message": "hyperparameters.globalBatchSize must be a multiple of microBatchSize x "
        "resources.nodes x resources.gpusPerNode"}]
