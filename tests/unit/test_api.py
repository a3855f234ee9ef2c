"""API models: defaults, validation errors that name the field, CEL regexes (via Python re)."""

from __future__ import annotations

import re

import pytest
import yaml
from flywheel_operator import api
from pydantic import ValidationError

from .conftest_data import EXAMPLES, make_run, minimal_spec


def _error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


def test_minimal_spec_gets_defaults():
    spec = api.FineTuneRunSpec.model_validate(minimal_spec())
    assert spec.resources.nodes == 1 and spec.resources.gpusPerNode == 8
    assert spec.maxRestarts == 3 and spec.suspend is False and spec.preflight.enabled
    assert spec.hyperparameters.learningRate == 1.0e-5
    assert spec.dataset.requiredCategories == [] and spec.dataset.minExamplesPerCategory >= 0


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"resources": {"gpusPerNode": 9}}, "resources.gpusPerNode"),
        ({"resources": {"nodes": 0}}, "resources.nodes"),
        ({"maxRestarts": -1}, "maxRestarts"),
        ({"fsdp": {"activationCheckpointing": "some"}}, "fsdp.activationCheckpointing"),
        ({"modelName": "Flow_Agent"}, "modelName"),
        (
            {"tracking": {"comet": {"workspace": "a", "project": "b", "apiKey": "x"}}},
            "tracking.comet.apiKey",
        ),
        ({"env": [{"name": "COMET_API_KEY", "value": "x"}]}, "env"),
        ({"checkpoint": {"keep": 1}}, "checkpoint.keep"),
    ],
)
def test_validation_errors_name_the_field(patch, loc):
    data = minimal_spec()
    for key, value in patch.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    with pytest.raises(ValidationError) as exc:
        api.FineTuneRunSpec.model_validate(data)
    assert any(found.startswith(loc) for found in _error_locs(exc.value)), exc.value


def test_missing_required_fields_are_named():
    with pytest.raises(ValidationError) as exc:
        api.FineTuneRunSpec.model_validate({"baseModel": "hf://Qwen/Qwen3-0.6B"})
    assert {"modelName", "dataset", "output"} <= set(_error_locs(exc.value))


def test_spec_reuses_trainer_models():
    from flywheel_trainer import config as trainer

    fields = api.FineTuneRunSpec.model_fields
    for name, model in [
        ("dataset", trainer.Dataset),
        ("hyperparameters", trainer.Hyperparameters),
        ("fsdp", trainer.Fsdp),
        ("checkpoint", trainer.Checkpoint),
        ("output", trainer.Output),
        ("tracking", trainer.Tracking),
    ]:
        assert fields[name].annotation is model


def test_status_model_round_trip():
    status = api.FineTuneRunStatus.model_validate(
        {
            "phase": "Running",
            "attempt": 2,
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "AllPodsRunning",
                    "lastTransitionTime": "2026-11-26T12:00:00Z",
                }
            ],
            "progress": {"step": 10, "totalSteps": 100, "percent": "10%", "tokensPerSecond": 1.5e4},
            "attempts": [{"attempt": 1, "phase": "Failed", "gpuHours": 0.5}],
            "preflight": {"phase": "Succeeded", "categories": {"email": 12}, "tokens": 1000},
            "gpuHours": 1.25,
            "estimatedCost": 4.4,
        }
    )
    assert status.attempts[0].phase == "Failed"
    with pytest.raises(ValidationError):
        api.FineTuneRunStatus.model_validate({"phase": "Exploded"})


def test_every_field_has_a_description():
    missing = []
    for model in (
        api.FineTuneRunSpec,
        api.FineTuneRunStatus,
        api.ModelVersionSpec,
        api.ModelSpec,
        api.ModelStatus,
        api.FineTuneScheduleSpec,
        api.FineTuneScheduleStatus,
    ):
        stack = [model]
        seen = set()
        while stack:
            m = stack.pop()
            if m in seen:
                continue
            seen.add(m)
            for name, field in m.model_fields.items():
                if not field.description and name != "comet":
                    missing.append(f"{m.__name__}.{name}")
                for sub in _models_in(field.annotation):
                    stack.append(sub)
    assert not missing, missing


def _models_in(tp) -> list[type]:
    from pydantic import BaseModel

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in getattr(tp, "__args__", ()) for m in _models_in(arg)]


def test_examples_are_valid():
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "FineTuneRun":
                api.FineTuneRun.model_validate(doc)
            elif doc and doc.get("kind") == "FineTuneSchedule":
                api.FineTuneSchedule.model_validate(doc)


def test_model_and_version_models():
    api.ModelVersionSpec.model_validate(
        {
            "modelName": "flow-agent",
            "version": 3,
            "artifact": {"uri": "s3://models/flow-agent/v3/", "digest": "sha256:" + "a" * 64},
            "baseModel": "hf://Qwen/Qwen3-32B",
            "sourceRun": {"name": "r", "uid": "u"},
            "dataset": {"train": "s3://d/t.jsonl", "digests": {"train": "sha256:" + "b" * 64}},
            "metrics": {"eval_loss": 1.2, "tool_call_accuracy/email": 0.9},
        }
    )
    spec = api.ModelSpec.model_validate(
        {
            "promotion": {
                "gates": [
                    {"metric": "eval_loss", "max": 2.0},
                    {"metric": "tool_call_accuracy/email", "min": 0.8},
                ]
            }
        }
    )
    assert spec.promotion.alias == "production"
    with pytest.raises(ValidationError):
        api.ModelSpec.model_validate({"promotion": {"gates": [{"metric": "x", "limit": 1}]}})


# ---------------------------------------------------------------- CEL regexes, checked with re
# RE2 and Python agree on these patterns (no backreferences or lookarounds).


@pytest.mark.parametrize(
    "uri",
    [
        "hf://Qwen/Qwen3-32B",
        "hf://Qwen/Qwen3-32B@main",
        "hf://gpt2",
        "hf://org/m@a1b2c3",
        "s3://models/base/",
        "gs://bucket/x",
        "file:///models/tiny",
        "pvc://models/qwen3",
    ],
)
def test_model_uri_accepted(uri):
    assert re.match(api.MODEL_URI_RE, uri)


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/model",
        "hf://",
        "s3://user:pass@bucket/x",
        "file://relative/path",
        "pvc://claim",
        "pvc:///path",
        "Qwen/Qwen3-32B",
        "s3://bucket/x?X-Amz-Signature=abc",
    ],
)
def test_model_uri_rejected(uri):
    assert not re.match(api.MODEL_URI_RE, uri)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://data/flow/2026-w48/train.jsonl",
        "file:///tmp/data/train.jsonl",
        "pvc://datasets/flow/train.jsonl",
        "s3://data/flow/{{ isoWeek }}/train.jsonl",
    ],
)
def test_data_uri_accepted(uri):
    assert re.match(api.DATA_URI_RE, uri)


@pytest.mark.parametrize(
    "uri",
    [
        "hf://datasets/x",
        "https://host/x.jsonl",
        "s3://AKIA:secret@data/x",
        "gs://bucket/x?token=abc",
        "/tmp/x.jsonl",
    ],
)
def test_data_uri_rejected(uri):
    assert not re.match(api.DATA_URI_RE, uri)


def _looks_secret(value: str) -> bool:
    token = re.match(api.TOKEN_RE, value) and all(
        re.search(c, value) for c in ("[A-Z]", "[a-z]", "[0-9]")
    )
    return bool(re.search(api.SECRET_RE, value) or token)


@pytest.mark.parametrize(
    "value",
    [
        "sk-proj-abcdefghijklmnop1234",
        "ghp_abcdefghijklmnopqrstuvwx",
        "hf_abcdefghijklmnopqrstuvwx",
        "AKIAABCDEFGHIJKLMNOP",
        "api_key=123",
        "password: hunter2",
        "Xk3mZp9QrT5vW2yB8nL4jH6s",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig",
        "-----BEGIN PRIVATE KEY-----",
    ],
)
def test_secret_values_detected(value):
    assert _looks_secret(value)


@pytest.mark.parametrize(
    "value",
    [
        "acme",
        "flow-agent",
        "edit-workflow",
        "nvidia.com/gpu",
        "h200",
        "ghcr.io/flywheel-dev/flywheel-trainer:0.1.0",
        "registry/x@sha256:" + "a" * 64,
        "s3://data/flow/2026-w48/train.jsonl",
        "tokenizer-v2",
        "Qwen3-32B-Instruct",
    ],
)
def test_ordinary_values_pass(value):
    assert not _looks_secret(value)


def test_status_written_by_lifecycle_fits_the_schema():
    """Unknown status keys would be pruned silently by the API server: keep them in the model."""
    from flywheel_operator import lifecycle

    run = make_run(resources={"nodes": 2, "gpusPerNode": 8})
    plan = lifecycle.decide(run, [], [])
    api.FineTuneRunStatus.model_validate(api.status_document(plan.status))
