"""`--preflight`: check the data and plan the run, on CPU, without model weights.

Validates every line (errors as `file:line: what`), renders each conversation through the
base model's chat template (`chat`: a conversation the template refuses is an invalid line),
fails naming `file:line` for every conversation with no token in the loss, checks every example
fits `maxSeqLength`, counts examples per category against `dataset.requiredCategories` /
`minExamplesPerCategory`, reports per category the share of tokens in the loss, computes total
tokens and optimizer steps for the world size (`--world-size`, else `$WORLD_SIZE`, else 1;
`data.plan_steps`, as training does) and plans per-GPU memory (`memory`) against the device's
memory (`deviceMemoryGB` in the config or `--device-memory-gb`; unchecked when neither is set).

`--show-examples N` first prints the first N training conversations as rendered text with
every span in the loss between `«` and `»` (coloured instead on a terminal).

Output: one JSON object (contract.PreflightResult), printed as the last line on stdout and
written (at most 4 KiB, contract.fit) to `--output` or `$FLYWHEEL_SUMMARY_PATH` when set.
Exit code 0 when `ok`, 1 otherwise.
"""

from __future__ import annotations

import os
import sys

from .config import TrainerConfig
from .contract import Env, write_message
from .data import DataError, Split, load_split, pack, plan_steps
from .storage import preflight_result as check_run_storage


def show_examples(split: Split, tokenizer, n: int, out=None) -> None:
    """Print the documents of the first `n` conversations, loss spans in « » (or colour)."""
    out = out or sys.stdout
    colour = out.isatty()
    lines = [c.line for c in split.conversations[:n]]
    for line in lines:
        docs = [e for e in split.examples if e.line == line]
        for k, ex in enumerate(docs):
            print(f"==== {split.report['uri']}:{line} [{ex.category}] document {k + 1}/"
                  f"{len(docs)}", file=out)
            parts, run, in_loss = [], [], False
            for tok, m in [*zip(ex.input_ids, ex.mask, strict=True), (None, None)]:
                if m != in_loss or tok is None:
                    text = tokenizer.decode(run, skip_special_tokens=False)
                    if in_loss:
                        text = f"\x1b[1;32m{text}\x1b[0m" if colour else f"«{text}»"
                    parts.append(text)
                    run, in_loss = [], bool(m)
                run.append(tok)
            print("".join(parts), file=out)
    print(file=out, flush=True)


def plan(cfg: TrainerConfig, world_size: int, show: int = 0) -> dict:
    from transformers import AutoTokenizer

    from .chat import ChatFormat
    from .model import resolve_model_path

    hp, ds = cfg.hyperparameters, cfg.dataset
    path = resolve_model_path(cfg.baseModel, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fmt = ChatFormat(tokenizer)
    train = load_split(ds.train, fmt, hp.maxSeqLength, skip_invalid=True)
    errors: list[str] = list(train.report["errors"])
    evals = None
    if ds.eval:
        evals = load_split(ds.eval, fmt, hp.maxSeqLength, skip_invalid=True)
        errors += evals.report["errors"]
    if show:
        show_examples(train, tokenizer, show)
    invalid = train.report["invalid"] + (evals.report["invalid"] if evals else 0)
    cats = train.report["categories"]
    missing = {c: cats.get(c, 0) for c in ds.requiredCategories
               if cats.get(c, 0) < max(1, ds.minExamplesPerCategory)}
    packs = len(pack(train.examples, hp.maxSeqLength, hp.seed))
    steps = plan_steps(packs, hp, world_size, cfg.maxSteps)
    problems = []
    if invalid and not ds.skipInvalid:
        problems.append(f"{invalid} invalid line(s)")
    no_loss = train.report["noLoss"] + (evals.report["noLoss"] if evals else [])
    if no_loss:
        problems.append("no token in the loss (no assistant output the template renders): "
                        + ", ".join(no_loss[:5]) + (" ..." if len(no_loss) > 5 else ""))
    if not train.examples:
        problems.append("no usable training examples")
    if missing:
        problems.append(
            "categories below minExamplesPerCategory="
            f"{ds.minExamplesPerCategory}: " + ", ".join(f"{c} ({n})" for c, n in missing.items()))
    memory, problem = _memory(cfg, path, world_size)
    if problem:
        problems.append(problem)
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
        "globalBatchSize": steps.global_batch,
        "optimizerSteps": steps.total_steps,
        "memory": memory,
    }


def _memory(cfg: TrainerConfig, path: str, world_size: int) -> tuple[dict, str | None]:
    from transformers import AutoConfig

    from .memory import plan as memory_plan

    hp = cfg.hyperparameters
    try:
        return memory_plan(AutoConfig.from_pretrained(path), hp.maxSeqLength,
                           hp.microBatchSize, cfg.fsdp.activationCheckpointing, world_size,
                           cfg.deviceMemoryGB)
    except Exception as e:  # an architecture the estimate does not understand: say so
        return {"error": f"no memory estimate: {type(e).__name__}: {e}"[:300]}, None


def preflight(cfg: TrainerConfig, output: str | None, world_size: int | None = None,
              show_examples: int = 0) -> int:
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        result = check_run_storage(cfg) or plan(cfg, world, show_examples)
    except (DataError, OSError, ValueError) as e:
        result = {"ok": False, "problems": [f"{type(e).__name__}: {e}"], "errors": []}
    text = write_message(result, output or os.environ.get(Env.SUMMARY_PATH))
    print(text, flush=True)
    return 0 if result["ok"] else 1
