"""Shared test data for the API/render unit tests."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from flywheel_operator.api import FineTuneRunStatus, Run, status_document
from pydantic import BaseModel

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


UID = "6f1c2a9e-2b1d-4c0a-9d8e-0123456789ab"


def make_body(name: str = "qwen-w48", namespace: str = "ml", uid: str = UID, **spec) -> dict:
    """A FineTuneRun body as kopf gives it."""
    return {
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": "FineTuneRun",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generation": 1,
            "uid": uid,
            "resourceVersion": "1",
        },
        "spec": {**minimal_spec(), **spec},
    }


def make_run(name: str = "qwen-w48", namespace: str = "ml",
             status: dict | BaseModel | None = None, uid: str = UID, **spec) -> Run:
    """A FineTuneRun as the reconciler parses it (`Run.parse`). A status model (a plan's) goes
    through the document it is written as, as the next reconcile reads it back."""
    if isinstance(status, BaseModel):
        status = status_document(status)
    return Run.parse({**make_body(name, namespace, uid, **spec), "status": status or {}})


def with_status(run: Run, status: dict | BaseModel) -> Run:
    """`run` with the status a plan wrote (through its written document, as read back)."""
    if isinstance(status, BaseModel):
        status = status_document(status)
    return dataclasses.replace(run, status=FineTuneRunStatus.model_validate(status))
