"""The contract between trainer and operator (flywheel_trainer.contract): each document the
trainer writes is read back by the operator's own code into what users see."""

from __future__ import annotations

import json

from flywheel_operator import observe, registry
from flywheel_operator.api import LastCheckpoint
from flywheel_operator.attempts import preflight_result, preflight_status
from flywheel_operator.config import OperatorConfig
from flywheel_operator.objects import JobSummary, PodSummary
from flywheel_trainer import contract
from flywheel_trainer.progress import Reporter

from .conftest_data import make_run

DIGEST = "sha256:" + "ab" * 32


def test_a_summary_round_trips_into_a_model_version(tmp_path):
    summary = {"artifact": {"uri": "s3://m/out/run-6f1c2a9e/", "digest": DIGEST,
                            "format": "huggingface-safetensors",
                            "card": "s3://m/out/run-6f1c2a9e/README.md"},
               "metrics": {"eval_loss": 0.5, "tool_call_accuracy/email": 0.9,
                           "train_loss": float("nan")},
               "steps": 12, "startStep": 4, "tokens": 3456,
               "dataset": {"digests": {"train": "abc"}, "examples": {"train": 48}},
               "throughput": {"tokensPerSecond": 100.0, "mfu": None},
               "tracking": {"url": None, "experimentKey": "k" * 32}}
    path = tmp_path / "termination-log"
    text = contract.write_message(summary, str(path))  # what rank 0 writes
    assert path.read_text() == text and len(text.encode()) <= contract.MESSAGE_LIMIT
    parsed = contract.parse_summary(text)  # what the operator reads
    assert (parsed.steps, parsed.startStep, parsed.tokens) == (12, 4, 3456)
    mv = registry.model_version(make_run(), parsed, 1, None, "production")
    assert mv["spec"]["artifact"] == summary["artifact"]
    assert mv["spec"]["metrics"] == {"eval_loss": 0.5, "tool_call_accuracy/email": 0.9}
    assert mv["spec"]["dataset"]["digests"] == {"train": "abc"}


def test_a_preflight_result_round_trips_into_status():
    errors = [f"train.jsonl:{i}: not JSON" for i in range(500)]
    result = {"ok": False, "problems": ["train.jsonl:3: not JSON"], "errors": errors,
              "invalidLines": 1, "train": {"examples": 96, "categories": {"email": 96},
                                           "tokens": 1000, "lossShare": {"email": 0.4}},
              "missingCategories": {"crm": 0}, "totalTokens": 3000, "optimizerSteps": 12,
              "memory": {"params": 123}}
    text = contract.fit(result)  # 500 errors do not fit in 4 KiB: some are dropped
    assert len(text.encode()) <= contract.MESSAGE_LIMIT and json.loads(text)["truncated"]
    pod = PodSummary("pre-0", component="preflight", phase="Failed", message=text)
    read = preflight_result([pod], JobSummary("pre", component="preflight"))
    status = preflight_status(read, make_run().spec, OperatorConfig())
    assert status.examples == 96 and status.steps == 12 and status.parameters == 123
    assert status.missingCategories == ["crm"]
    assert "train.jsonl:3: not JSON" in status.problems


def test_a_progress_document_round_trips_into_status():
    clock = iter(range(1_800_000_000, 1_800_001_000, 5))
    reporter = Reporter(0, 2, attempt=1, clock=lambda: next(clock))
    reporter.training(total_steps=100, start_step=0, steps_per_epoch=50)
    for step in range(1, 4):
        reporter.step(step, 1.5, 1000)
    reporter.checkpoint(2)
    doc = contract.Progress.model_validate(reporter.snapshot())  # what the poller checks
    assert doc.stage == contract.TRAINING and doc.step == 3 and doc.totalSteps == 100
    polled = observe.Polled(attempt=1, doc=doc.model_dump(exclude_unset=True),
                            fetched_at="2027-01-15T08:00:00Z", polled_at="2027-01-15T08:00:00Z")
    status = observe.progress_status(polled, None)
    assert (status.stage, status.step, status.totalSteps, status.percent) == (
        "training", 3, 100, "3%")
    assert observe.last_checkpoint(polled, "s3://ck/run-1/") == LastCheckpoint(
        step=2, time=doc.lastCheckpoint.time, uri="s3://ck/run-1/step-2")
