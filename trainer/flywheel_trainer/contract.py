"""The contract between the trainer and the operator, defined once (torch-free).

What crosses the boundary, and nothing else:

- the environment the operator renders into trainer and preflight pods (`Env`);
- the pod's exit codes (`EXIT_DATA_ERROR`: the same input fails again, no retry);
- rank 0's **summary** (`Summary`), JSON in the container's termination message, read back
  by the operator to register the model (at most `MESSAGE_LIMIT` bytes: `fit`);
- the **preflight result** (`PreflightResult`), the same way, from the preflight pod;
- the **progress document** (`Progress`) rank 0 serves on its `progress` port while it trains,
  and its stage names (`STAGES`);
- where a run's files go: `config.run_scoped` and `config.default_checkpoint_uri`.

The trainer writes these documents with the models' field names; the operator parses them
with the same models (unknown fields are kept, so an older operator reads a newer trainer).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Where the termination message goes, and the most Kubernetes keeps of it.
TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4096
#: Exit code of a data or configuration error (launch.py passes it through torchrun).
EXIT_DATA_ERROR = 2
#: Stages of a run, in order, as the progress document names them ("done" is the operator's
#: word for a finished run).
STAGES = ("starting", "loading-model", "tokenizing", "training", "evaluating", "exporting")
TRAINING = "training"
FORMAT = "huggingface-safetensors"


class Env:
    """Environment variables the operator sets in the pods it renders."""

    RUN_NAME = "FLYWHEEL_RUN_NAME"
    ATTEMPT = "FLYWHEEL_ATTEMPT"
    EXPERIMENT_KEY = "FLYWHEEL_EXPERIMENT_KEY"
    SUMMARY_PATH = "FLYWHEEL_SUMMARY_PATH"
    PROGRESS_PORT = "FLYWHEEL_PROGRESS_PORT"
    PVC_ROOT = "FLYWHEEL_PVC_ROOT"
    COMET_WORKSPACE = "COMET_WORKSPACE"
    COMET_PROJECT = "COMET_PROJECT_NAME"
    COMET_API_KEY = "COMET_API_KEY"
    HF_TOKEN = "HF_TOKEN"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- rank 0's summary -------------------------------------------------------------------


class SummaryArtifact(_Doc):
    uri: str
    digest: str = Field(pattern=r"^sha256:[a-f0-9]{64}$")
    format: Literal["huggingface-safetensors"] = FORMAT
    card: str | None = None


class Throughput(_Doc):
    tokensPerSecond: float | None = None
    mfu: float | None = None
    tokensPerSecondPerDevice: float | None = None


class TrackingSummary(_Doc):
    url: str | None = None
    experimentKey: str | None = None
    offlineArchive: str | None = None


class DatasetSummary(_Doc):
    digests: dict[str, str] = Field(default_factory=dict)
    examples: dict[str, int] = Field(default_factory=dict)


class Summary(_Doc):
    """What rank 0 of a finished run reports: the artifact, its metrics and figures."""

    artifact: SummaryArtifact
    metrics: dict[str, float | None] = Field(default_factory=dict)
    steps: int = Field(ge=0)
    startStep: int = Field(default=0, ge=0, description="> 0: resumed at that step.")
    tokens: int = Field(ge=0)
    throughput: Throughput = Field(default_factory=Throughput)
    tracking: TrackingSummary = Field(default_factory=TrackingSummary)
    dataset: DatasetSummary = Field(default_factory=DatasetSummary)
    warnings: list[str] = Field(default_factory=list)
    truncated: bool = False


class ErrorSummary(_Doc):
    """What rank 0 reports when the run failed in the trainer's own words."""

    error: str
    tracking: TrackingSummary = Field(default_factory=TrackingSummary)


class SummaryError(ValueError):
    """The summary is missing or malformed: the run fails, nothing is registered."""


def parse_summary(text: str | None) -> Summary:
    """Rank 0's termination message -> Summary; SummaryError says what is wrong."""
    if not text or not text.strip():
        raise SummaryError("rank 0 wrote no summary to its termination message")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SummaryError(f"rank 0's summary is not JSON ({err.msg} at char {err.pos})") from None
    if isinstance(data, dict) and data.get("error"):
        raise SummaryError(f"the trainer reported an error: {data['error']}"[:1024])
    try:
        return Summary.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5])
        raise SummaryError(f"rank 0's summary is malformed: {problems}") from None


# --- preflight --------------------------------------------------------------------------


class SplitReport(_Doc):
    """One data split as preflight (and training) read it."""

    examples: int | None = None
    categories: dict[str, int] = Field(default_factory=dict)
    tokens: int | None = None
    digest: str | None = None


class PreflightResult(_Doc):
    """The preflight pod's verdict and plan."""

    ok: bool
    problems: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    invalidLines: int | None = None
    train: SplitReport | None = None
    eval: SplitReport | None = None
    missingCategories: dict[str, int] = Field(default_factory=dict)
    totalTokens: int | None = None
    optimizerSteps: int | None = None
    memory: dict[str, Any] | None = None


def parse_preflight(text: str | None) -> PreflightResult | None:
    """A preflight pod's termination message -> its result (None: not a result)."""
    try:
        return PreflightResult.model_validate_json(text or "")
    except ValidationError:
        return None


# --- progress ---------------------------------------------------------------------------


class CheckpointMark(_Doc):
    step: int | None = None
    time: str | None = None


class RankState(_Doc):
    rank: int
    stage: str | None = None
    step: int | None = None
    stepTime: str | None = None
    heartbeatTime: str | None = None
    where: str | None = None


class Progress(_Doc):
    """Rank 0's `GET /progress` document (times are RFC 3339 UTC, seconds)."""

    stage: str
    stageTime: str | None = None
    step: int = 0
    totalSteps: int | None = None
    percent: float | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    tokensPerSecond: float | None = None
    mfu: float | None = None
    secondsPerStep: float | None = None
    etaSeconds: float | None = None
    lastCheckpoint: CheckpointMark | None = None
    heartbeatTime: str | None = None
    stepTime: str | None = None
    startTime: str | None = None
    attempt: int | None = None
    worldSize: int | None = None
    ranks: list[RankState] = Field(default_factory=list)


# --- the 4 KiB limit ------------------------------------------------------------------------


def _finite(x: Any) -> Any:
    """NaN/inf are not JSON: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def fit(doc: dict, limit: int = MESSAGE_LIMIT) -> str:
    """Compact JSON of `doc` in at most `limit` bytes, dropping the least needed parts first
    (and saying so with `truncated: true`): per-category metrics from the end, the newest
    error lines, per-split details, then the dataset and tracking blocks; an error message
    is shortened last."""
    doc = _finite(json.loads(json.dumps(doc, default=str)))

    def text() -> str:
        return json.dumps(doc, separators=(",", ":"))

    def drops():
        metrics = doc.get("metrics") or {}
        for key in [k for k in metrics if "/" in k][::-1]:
            yield lambda key=key: metrics.pop(key)
        for _ in range(len(doc.get("errors") or [])):
            yield lambda: doc["errors"].pop()
        for split in ("eval", "train"):
            for field in ("noLoss", "lossShare", "categories"):
                if isinstance(doc.get(split), dict) and field in doc[split]:
                    yield lambda split=split, field=field: doc[split].pop(field)
        for key in ("dataset", "tracking", "warnings"):
            if key in doc:
                yield lambda key=key: doc.pop(key)

    out = text()
    for drop in drops():
        if len(out.encode()) <= limit:
            return out
        drop()
        doc["truncated"] = True
        out = text()
    while len(out.encode()) > limit and doc.get("error"):
        doc["error"] = doc["error"][: max(0, len(doc["error"]) - 256)]
        out = text()
    return out


def write_message(doc: dict, path: str | None) -> str:
    """Write `doc` (fitted) to the termination message at `path`; returns the text."""
    out = fit(doc)
    if path:
        try:
            with open(path, "w") as f:
                f.write(out)
        except OSError:
            pass  # e.g. no termination log outside a pod: the caller logs the text
    return out
