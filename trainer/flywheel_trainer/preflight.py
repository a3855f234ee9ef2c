"""`--preflight`: check the data and plan the run, on CPU, without model weights.

Validates every line (errors as `file:line: what`), renders each conversation through the
base model's chat template, checks every example has loss tokens and fits `maxSeqLength`,
counts examples per category against `dataset.requiredCategories` /
`minExamplesPerCategory`, and computes total tokens and optimizer steps for the world size
(`--world-size`, else `$WORLD_SIZE`, else 1).

Output: one JSON object, printed as the last line on stdout and written (at most 4 KiB) to
`--output` or `$FLYWHEEL_SUMMARY_PATH` when set. Exit code 0 when `ok`, 1 otherwise.
"""

from __future__ import annotations

import json
import math
import os

from .config import TrainerConfig
from .data import DataError, load_split, pack
from .storage import preflight_result as check_run_storage

LIMIT = 4096


def plan(cfg: TrainerConfig, world_size: int) -> dict:
    from transformers import AutoTokenizer

    from .model import resolve_model_path

    hp, ds = cfg.hyperparameters, cfg.dataset
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.baseModel, weights=False))
    errors: list[str] = []
    train = load_split(ds.train, tokenizer, hp.maxSeqLength, skip_invalid=True)
    errors += train.report["errors"]
    evals = None
    if ds.eval:
        evals = load_split(ds.eval, tokenizer, hp.maxSeqLength, skip_invalid=True)
        errors += evals.report["errors"]
    invalid = train.report["invalid"] + (evals.report["invalid"] if evals else 0)
    cats = train.report["categories"]
    missing = {c: cats.get(c, 0) for c in ds.requiredCategories
               if cats.get(c, 0) < max(1, ds.minExamplesPerCategory)}
    per_step = hp.microBatchSize * world_size
    global_batch = math.ceil(hp.globalBatchSize / per_step) * per_step
    packs = len(pack(train.examples, hp.maxSeqLength, hp.seed))
    steps = hp.epochs * max(1, math.ceil(packs / global_batch)) if packs else 0
    if cfg.maxSteps:
        steps = min(steps, cfg.maxSteps)
    problems = []
    if invalid and not ds.skipInvalid:
        problems.append(f"{invalid} invalid line(s)")
    if not train.examples:
        problems.append("no usable training examples")
    if missing:
        problems.append(
            "categories below minExamplesPerCategory="
            f"{ds.minExamplesPerCategory}: " + ", ".join(f"{c} ({n})" for c, n in missing.items()))
    for r in (train.report, evals.report if evals else None):
        if r:
            r.pop("errors", None)
    return {
        "ok": not problems,
        "problems": problems,
        "errors": errors,
        "invalidLines": invalid,
        "train": train.report,
        "eval": evals.report if evals else None,
        "missingCategories": missing,
        "maxExampleTokens": max((len(e.input_ids) for e in train.examples), default=0),
        "totalTokens": train.report["tokens"] * hp.epochs,
        "lossTokens": train.report["lossTokens"] * hp.epochs,
        "packs": packs,
        "worldSize": world_size,
        "globalBatchSize": global_batch,
        "optimizerSteps": steps,
    }


def _fit(result: dict) -> str:
    text = json.dumps(result, separators=(",", ":"))
    while len(text.encode()) > LIMIT and result["errors"]:
        result["errors"] = result["errors"][:-1]
        result["errorsTruncated"] = True
        text = json.dumps(result, separators=(",", ":"))
    for key in ("eval", "train"):
        if len(text.encode()) > LIMIT and result.get(key):
            result[key] = {k: v for k, v in result[key].items() if k != "categories"}
            text = json.dumps(result, separators=(",", ":"))
    return text


def preflight(cfg: TrainerConfig, output: str | None, world_size: int | None = None) -> int:
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        result = check_run_storage(cfg) or plan(cfg, world)
    except (DataError, OSError, ValueError) as e:
        result = {"ok": False, "problems": [f"{type(e).__name__}: {e}"], "errors": []}
    text = _fit(result)
    path = output or os.environ.get("FLYWHEEL_SUMMARY_PATH")
    if path:
        with open(path, "w") as f:
            f.write(text)
    print(text, flush=True)
    return 0 if result["ok"] else 1
