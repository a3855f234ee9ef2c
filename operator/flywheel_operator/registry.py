"""The model registry, pure: trainer summaries, ModelVersion records, promotion decisions and
serving-target patches. The I/O that applies them lives in handlers.py / kube.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api import Artifact, ModelVersionSpec
from .lifecycle import now_iso

MODEL_LABEL = "flywheel.dev/model"
RUN_UID_LABEL = "flywheel.dev/source-run-uid"
DIGEST_ANNOTATION = "flywheel.dev/model-digest"
URI_ENV = "FLYWHEEL_MODEL_URI"


class SummaryError(ValueError):
    """The trainer's summary is missing or malformed: the run fails, nothing is registered."""


class Throughput(BaseModel):
    tokensPerSecond: float | None = None
    mfu: float | None = None


class TrackingSummary(BaseModel):
    url: str | None = None
    experimentKey: str | None = None
    offlineArchive: str | None = None


class Summary(BaseModel):
    """What rank 0 writes to its termination message (at most 4 KiB of JSON)."""

    model_config = ConfigDict(extra="ignore")

    artifact: Artifact
    metrics: dict[str, float | None] = Field(default_factory=dict)
    steps: int = Field(ge=0)
    tokens: int = Field(ge=0)
    throughput: Throughput = Field(default_factory=Throughput)
    tracking: TrackingSummary = Field(default_factory=TrackingSummary)
    dataset: dict[str, Any] = Field(default_factory=dict)


def parse_summary(text: str | None) -> Summary:
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


def finite_metrics(metrics: dict[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))}


def version_name(model: str, version: int) -> str:
    return f"{model}-v{version}"


def better_lower(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def comparison(alias: str, baseline: dict | None, metrics: dict[str, float]) -> dict | None:
    """Per-metric deltas (candidate minus baseline) against the alias's current version."""
    if not baseline:
        return None
    base = baseline["spec"].get("metrics") or {}
    return {"alias": alias, "version": baseline["spec"]["version"],
            "deltas": {k: round(v - base[k], 6) for k, v in sorted(metrics.items()) if k in base}}


def model_version(run: dict, summary: Summary, version: int, baseline: dict | None,
                  alias: str) -> dict:
    """The immutable ModelVersion record for a succeeded run (validated against the API)."""
    spec = run["spec"]
    metrics = finite_metrics(summary.metrics)
    tracking = {k: v for k, v in {"url": summary.tracking.url,
                                  "experimentKey": summary.tracking.experimentKey}.items() if v}
    mv_spec = ModelVersionSpec.model_validate({
        "modelName": spec["modelName"],
        "version": version,
        "artifact": summary.artifact.model_dump(),
        "baseModel": spec["baseModel"],
        "sourceRun": {"name": run["metadata"]["name"], "uid": run["metadata"]["uid"]},
        "dataset": {"train": spec["dataset"]["train"], "eval": spec["dataset"].get("eval"),
                    "digests": summary.dataset.get("digests") or {}},
        "metrics": metrics,
        "tracking": tracking or None,
        "comparison": comparison(alias, baseline, metrics),
    })
    return {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "ModelVersion",
        "metadata": {
            "name": version_name(spec["modelName"], version),
            "labels": {MODEL_LABEL: spec["modelName"],
                       RUN_UID_LABEL: run["metadata"]["uid"],
                       "flywheel.dev/run": run["metadata"]["name"]},
        },
        "spec": mv_spec.model_dump(exclude_none=True),
    }


def alias_target(mv: dict, now: str | None = None) -> dict:
    return {"version": mv["spec"]["version"], "modelVersion": mv["metadata"]["name"],
            "uri": mv["spec"]["artifact"]["uri"], "digest": mv["spec"]["artifact"]["digest"],
            "updateTime": now or now_iso()}


def failed_gates(promotion: dict, candidate: dict[str, float],
                 baseline: dict[str, float] | None) -> list[str]:
    """Every gate the candidate fails, in words; empty means promote."""
    failures = []
    for gate in promotion.get("gates") or []:
        metric, value = gate["metric"], candidate.get(gate["metric"])
        if value is None:
            failures.append(f"{metric} is missing (the gate needs it)")
        elif gate.get("min") is not None and value < gate["min"]:
            failures.append(f"{metric}={value:.4g} < min {gate['min']:g}")
        elif gate.get("max") is not None and value > gate["max"]:
            failures.append(f"{metric}={value:.4g} > max {gate['max']:g}")
    no_regression = promotion.get("noRegression") or {}
    tolerance = no_regression.get("tolerance", 0.0)
    for metric in no_regression.get("metrics") or [] if baseline else []:
        new, old = candidate.get(metric), baseline.get(metric)
        if old is None:
            continue
        if new is None:
            failures.append(f"{metric} is missing (noRegression needs it)")
            continue
        worse = (new - old) if better_lower(metric) else (old - new)
        if worse > tolerance:
            failures.append(f"{metric} regressed: {new:.4g} vs {old:.4g} (tolerance {tolerance:g})")
    return failures


def serving_patch(container: str, uri: str, digest: str) -> dict:
    """Strategic merge patch that points a Deployment's container at a model."""
    return {"spec": {"template": {
        "metadata": {"annotations": {DIGEST_ANNOTATION: digest}},
        "spec": {"containers": [{"name": container, "env": [{"name": URI_ENV, "value": uri}]}]},
    }}}


def serving_current(deployment: dict, container: str) -> tuple[str | None, str | None]:
    """The (uri, digest) a Deployment's template currently serves."""
    template = deployment["spec"]["template"]
    digest = ((template.get("metadata") or {}).get("annotations") or {}).get(DIGEST_ANNOTATION)
    for c in template["spec"]["containers"]:
        if c["name"] == container:
            uri = next((e.get("value") for e in c.get("env") or [] if e["name"] == URI_ENV), None)
            return uri, digest
    return None, digest
