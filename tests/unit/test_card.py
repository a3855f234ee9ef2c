"""The model card (trainer/flywheel_trainer/card.py), without a cluster or torch."""

from __future__ import annotations

import json
import math

import pytest
from flywheel_operator.api import Run
from flywheel_operator.registry import model_version
from flywheel_trainer.card import (
    PLOT_FILE,
    CardInfo,
    card_files,
    card_metrics,
    front_matter,
    render,
)
from flywheel_trainer.contract import parse_summary

METRICS = {"train_loss": 0.21, "eval_loss": 0.3, "eval_loss/email": 0.25,
           "eval_loss/integration": 0.35, "tool_call_accuracy": 0.9,
           "tool_call_accuracy/email": 1.0, "tool_call_accuracy/integration": 0.8,
           "tool_call_accuracy/edit-workflow": None, "eval_loss/edit-workflow": math.nan}
DIGEST = "sha256:" + "ab" * 32


def info(**kw) -> CardInfo:
    return CardInfo(**{
        "name": "tiny-agent-week-2", "base_model": "file:///models/base",
        "datasets": {"train": "s3://data/w2/train.jsonl", "eval": "s3://data/eval.jsonl"},
        "digests": {"train": "sha256:" + "1" * 64, "eval": "sha256:" + "2" * 64},
        "examples": {"train": 900, "eval": 45},
        "hyperparameters": {"learningRate": 0.003, "epochs": 3},
        "metrics": METRICS, "steps": 120, "tokens": 4096, "world_size": 2,
        "device_hours": 0.05, "tracking": {"url": "https://www.comet.com/ws/p/abc",
                                           "experimentKey": "abc"},
        "curve": [{"step": 1, "train_loss": 3.0}, {"step": 60, "train_loss": 0.5,
                                                    "eval_loss": 0.6}],
        **kw})


def test_metadata_follows_the_hugging_face_card_conventions():
    meta = front_matter(render(info()))
    assert meta["base_model"] == "file:///models/base"
    assert meta["datasets"] == ["s3://data/eval.jsonl", "s3://data/w2/train.jsonl"]
    assert meta["library_name"] == "transformers"
    (entry,) = meta["model-index"]
    assert entry["name"] == "tiny-agent-week-2"
    configs = [r["dataset"]["config"] for r in entry["results"]]
    assert configs == ["all", "email", "integration"]  # one result per category with values
    for result in entry["results"]:
        assert result["task"]["type"] == "text-generation"
        assert result["dataset"]["name"] == "s3://data/eval.jsonl"


def test_model_index_holds_exactly_the_model_versions_metrics():
    """What the registry records for a run with this summary is what the card says."""
    summary = parse_summary(json.dumps({
        "artifact": {"uri": "s3://m/", "digest": DIGEST}, "steps": 120, "tokens": 4096,
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in METRICS.items()}}))
    run = Run.parse({"metadata": {"name": "r", "namespace": "ml", "uid": "u"},
                     "spec": {"modelName": "tiny-agent", "baseModel": "file:///models/base",
                              "dataset": {"train": "s3://data/w2/train.jsonl"},
                              "output": {"uri": "s3://models/tiny-agent/"}}})
    mv = model_version(run, summary, 1, None, "production")
    assert card_metrics(render(info())) == mv["spec"]["metrics"]


def test_body_names_data_digests_hyperparameters_run_and_experiment():
    text = render(info(baseline={"name": "tiny-agent-v1",
                                 "metrics": {"tool_call_accuracy/email": 0.7}}))
    assert "sha256:" + "1" * 64 in text and "sha256:" + "2" * 64 in text
    assert "| learningRate | 0.003 |" in text
    assert "`tiny-agent-week-2`" in text
    assert "https://www.comet.com/ws/p/abc" in text
    assert "GPU-hours: 0.0500" in text
    assert f"]({PLOT_FILE})" in text
    assert "production (`tiny-agent-v1`)" in text
    assert "| email | 1.0000 | 0.2500 | 0.7000 |" in text


def test_offline_experiment_points_at_the_archive():
    text = render(info(tracking={"experimentKey": "k123"}))
    assert "offline (experiment key `k123`" in text and "comet upload" in text


@pytest.mark.parametrize("baseline", [None, {"name": "v1", "metrics": {"tool_call_accuracy": 0.5}}])
def test_files_are_the_card_and_a_png_plot(baseline):
    files = card_files(info(baseline=baseline))
    assert set(files) == {"README.md", PLOT_FILE}
    assert files[PLOT_FILE].startswith(b"\x89PNG\r\n\x1a\n")
    assert files["README.md"].decode().startswith("---\n")


def test_front_matter_rejects_a_card_without_metadata():
    with pytest.raises(ValueError, match="YAML block"):
        front_matter("# just a title\n")
    with pytest.raises(ValueError, match="not closed"):
        front_matter("---\nbase_model: x\n")


def test_model_version_points_to_the_card():
    card = "s3://models/tiny-agent/run-1/README.md"
    summary = parse_summary(json.dumps({
        "artifact": {"uri": "s3://models/tiny-agent/run-1/", "digest": DIGEST, "card": card},
        "steps": 1, "tokens": 1, "metrics": {}}))
    run = Run.parse({"metadata": {"name": "run-1", "namespace": "ml", "uid": "u"},
                     "spec": {"modelName": "tiny-agent", "baseModel": "file:///models/base",
                              "dataset": {"train": "s3://data/train.jsonl"},
                              "output": {"uri": "s3://models/tiny-agent/"}}})
    assert model_version(run, summary, 1, None, "production")["spec"]["artifact"]["card"] == card


def test_the_attempt_config_carries_the_promoted_version_to_the_card(tmp_path):
    from flywheel_operator.render import trainer_config

    from hack import run as demo

    run = demo.run_manifest("week-2", tmp_path, tmp_path / "t.jsonl", tmp_path / "e.jsonl",
                            tmp_path / "out")
    run["metadata"]["uid"] = "0f0e"
    run = Run.parse(run)
    baseline = {"name": "tiny-agent-v1", "metrics": {"tool_call_accuracy": 0.9}}
    assert trainer_config(run, 1, baseline).baseline == baseline
    assert trainer_config(run, 1).baseline is None
