"""Trainer configuration: the `FineTuneRun.spec` vocabulary, torch-free.

The operator imports the spec sub-models from here (they are part of the CRD schema) and
writes a `TrainerConfig` as JSON into the attempt's ConfigMap; the trainer reads it back with
`TrainerConfig.load`. Field names are camelCase on the wire, exactly as in `FineTuneRun.spec`.
Nothing in this module may import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SpecModel(BaseModel):
    """Base for every API model: unknown fields are errors, names are camelCase as written."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Dataset(SpecModel):
    """Where the training data lives. Format `chat-tools`: JSONL of OpenAI-style
    `messages` + `tools`, with an optional `category` per line."""

    train: str = Field(description="URI of the training JSONL (s3://, gs://, file://, pvc://).")
    eval: str | None = Field(
        default=None, description="URI of the evaluation JSONL; per-category eval needs it."
    )
    format: Literal["chat-tools"] = Field(
        default="chat-tools", description="Data format. Only `chat-tools` is supported."
    )
    skipInvalid: bool = Field(
        default=False,
        description="Skip malformed lines (and report how many) instead of failing the run.",
    )
    requiredCategories: list[str] = Field(
        default_factory=list,
        description="Categories the training data must cover (checked by preflight).",
    )
    minExamplesPerCategory: int = Field(
        default=1,
        ge=0,
        description="Minimum training examples for each required category (checked by preflight).",
    )


class Hyperparameters(SpecModel):
    """Optimisation settings."""

    epochs: int = Field(default=1, ge=1, description="Passes over the training data.")
    learningRate: float = Field(default=1.0e-5, gt=0, description="Peak AdamW learning rate.")
    globalBatchSize: int = Field(
        default=64, ge=1, description="Sequences per optimizer step, across all ranks."
    )
    microBatchSize: int = Field(default=1, ge=1, description="Sequences per rank per forward.")
    maxSeqLength: int = Field(
        default=8192, ge=16, description="Tokens per packed sequence; longer examples are dropped."
    )
    warmupRatio: float = Field(
        default=0.03, ge=0, le=1, description="Fraction of steps with linear warmup."
    )
    weightDecay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    maxGradNorm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(default=42, description="Seed for data order and initialisation.")


class Fsdp(SpecModel):
    """FSDP2 options."""

    activationCheckpointing: Literal["none", "selective", "full"] = Field(
        default="selective", description="Recompute activations: none, selective or full."
    )
    reshardAfterForward: bool = Field(
        default=True, description="Free gathered parameters after forward (ZeRO-3 style)."
    )
    compile: bool = Field(default=False, description="torch.compile each decoder block (GPU).")


class Checkpoint(SpecModel):
    """Distributed checkpoints (torch.distributed.checkpoint)."""

    everySteps: int = Field(default=500, ge=1, description="Save every N optimizer steps.")
    keep: int = Field(default=2, ge=2, description="Newest complete checkpoints to keep (>= 2).")
    uri: str | None = Field(
        default=None,
        description="Where checkpoints go; defaults to `<output.uri>/checkpoints/`.",
    )


class Output(SpecModel):
    """Where the exported Hugging Face model is written."""

    uri: str = Field(description="Destination URI (s3://, gs://, file://, pvc://).")


class SecretKeyRef(SpecModel):
    """A key in a Secret of the run's namespace. The value is never read by the operator."""

    name: str = Field(min_length=1, description="Secret name.")
    key: str = Field(min_length=1, description="Key within the Secret.")


class Comet(SpecModel):
    """Comet ML experiment tracking."""

    workspace: str = Field(min_length=1, description="Comet workspace.")
    project: str = Field(min_length=1, description="Comet project.")
    apiKeySecretRef: SecretKeyRef | None = Field(
        default=None, description="Secret holding the API key; without it the run logs offline."
    )


class Tracking(SpecModel):
    """Experiment tracking settings."""

    comet: Comet | None = None


class TrainerConfig(SpecModel):
    """What the trainer reads from `--config`: the spec's training part plus runtime fields."""

    baseModel: str
    dataset: Dataset
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    fsdp: Fsdp = Field(default_factory=Fsdp)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    output: Output
    tracking: Tracking = Field(default_factory=Tracking)
    runName: str | None = Field(default=None, description="FineTuneRun name (for tracking).")
    resumeFrom: str | None = Field(
        default=None, description="A checkpoint to warm-start from when the run has none of "
        "its own: a `step-N/` directory or a checkpoint directory (its newest complete step).")
    # ---- set by the operator ----
    runUid: str | None = Field(
        default=None, description="FineTuneRun uid: recorded in each checkpoint it writes; a "
        "checkpoint of another run is never resumed from (unless named in resumeFrom).")
    baseModelDigest: str | None = Field(
        default=None, description="The base model's content digest (a registry version): "
        "verified before training.")
    parentVersion: str | None = Field(
        default=None, description="The ModelVersion the base model is (lineage, model card).")
    # ---- runtime fields (not part of FineTuneRun.spec) ----
    attempt: int | None = Field(
        default=None, ge=0, description="Attempt number; `FLYWHEEL_ATTEMPT` from env wins."
    )
    experimentKey: str | None = Field(
        default=None,
        description="Comet experiment key; `FLYWHEEL_EXPERIMENT_KEY` from env wins when set.",
    )
    maxSteps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (benchmarks, smoke)."
    )
    logEverySteps: int = Field(default=1, ge=1, description="Log metrics every N steps.")
    evalMaxNewTokens: int = Field(
        default=256, ge=1, description="Greedy tokens generated per tool-call accuracy prompt."
    )
    evalMaxToolCallPrompts: int | None = Field(
        default=None, ge=0, description="Cap on tool-call accuracy prompts (None: all)."
    )
    baseline: dict | None = Field(
        default=None,
        description="The promoted version to compare with in the model card: "
        "{name, metrics} (set by the operator from the promotion alias's ModelVersion).",
    )
    deviceMemoryGB: float | None = Field(
        default=None, gt=0,
        description="Memory of one GPU in GB (1e9 bytes) of the pool the run will use "
        "(H200: 141); preflight refuses a run whose per-GPU estimate exceeds it.",
    )
    attnImplementation: str | None = Field(
        default=None,
        description="Hugging Face attention implementation; default sdpa.",
    )

    @classmethod
    def load(cls, path: str | Path) -> TrainerConfig:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def checkpoint_uri(self) -> str:
        return self.checkpoint.uri or default_checkpoint_uri(self.output.uri)


def default_checkpoint_uri(output_uri: str) -> str:
    """Where checkpoints go when the spec names no place: `<output>/checkpoints/`."""
    return output_uri.rstrip("/") + "/checkpoints/"


def run_scoped(uri: str, run_name: str, run_uid: str) -> str:
    """A run's own directory under a user's URI: `<uri>/<run-name>-<uid8>/`. Two runs that
    name the same output (or a run deleted and applied again) never share a directory, so a
    run neither resumes from another's checkpoints nor overwrites a registered artifact."""
    return f"{uri.rstrip('/')}/{run_name}-{run_uid[:8]}/"
