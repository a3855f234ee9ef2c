"""Shared test data for the API/render unit tests."""

from __future__ import annotations

import copy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

_SPEC = {
    "baseModel": "hf://Qwen/Qwen3-32B",
    "modelName": "flow-agent",
    "dataset": {"train": "s3://data/flow/train.jsonl", "eval": "s3://data/flow/eval.jsonl"},
    "output": {"uri": "s3://models/flow-agent/"},
}


def minimal_spec() -> dict:
    return copy.deepcopy(_SPEC)


def make_run(name: str = "qwen-w48", namespace: str = "ml", **spec) -> dict:
    """A FineTuneRun body as kopf gives it."""
    return {
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": "FineTuneRun",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generation": 1,
            "uid": "6f1c2a9e-2b1d-4c0a-9d8e-0123456789ab",
        },
        "spec": {**minimal_spec(), **spec},
    }
