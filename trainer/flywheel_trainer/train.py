"""The training loop.

One optimizer step consumes `globalBatchSize` packed sequences: each rank takes every
world-th sequence of the step's batch and runs them as `accum` micro-batches. The loss of a
step is the sum of token losses divided by the number of assistant tokens in the whole step
(all ranks, all micro-batches), so it does not depend on world size or accumulation. FSDP
averages gradients over ranks, hence the `* world_size` in the micro-batch loss.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import progress
from .card import CARD_FILE, CardInfo, card_files
from .chat import ChatFormat
from .checkpoint import CheckpointManager
from .config import TrainerConfig
from .data import IGNORE_INDEX, Pack, StepPlan, collate, load_split, pack, plan_steps
from .evaluate import eval_loss, tool_call_accuracy
from .export import export_hf
from .model import (
    flops_per_token,
    init_distributed,
    load_model,
    mfu,
    peak_flops,
    resolve_model_path,
    token_losses,
)
from .tracking import Tracker, write_summary

log = logging.getLogger("flywheel.train")


def lr_lambda(warmup: int, total: int):
    """Linear warmup to the peak, then cosine decay to zero."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class DataOrder:
    """Which packs each rank trains on at each step: a pure function of (seed, step), so a
    resumed run sees exactly the batches it would have seen."""

    def __init__(self, packs: list[Pack], plan: StepPlan, seed: int):
        self.packs, self.seed = packs, seed
        self.global_batch, self.steps_per_epoch = plan.global_batch, plan.steps_per_epoch

    def batch(self, step: int, rank: int, world: int) -> list[Pack]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.packs)))
        random.Random(self.seed + epoch).shuffle(order)
        chosen = order[i * self.global_batch:(i + 1) * self.global_batch]
        chosen += [-1] * (self.global_batch - len(chosen))  # last batch: empty fillers
        return [self.packs[j] if j >= 0 else Pack([]) for j in chosen[rank::world]]


def forward_backward(model, batches: list[dict], d) -> tuple[float, float, int]:
    """Accumulate gradients over this rank's micro-batches. Each token's loss is divided by the
    step's assistant-token count over all ranks and micro-batches (times world size, because
    FSDP averages gradients over ranks). Returns (global loss sum, global loss tokens, global
    non-padding tokens)."""
    local = [sum(x != IGNORE_INDEX for row in b["labels"] for x in row) for b in batches]
    counts = torch.tensor([sum(local), sum(b["tokens"] for b in batches)],
                          dtype=torch.float64, device=d.device)
    dist.all_reduce(counts)
    n_loss_tokens = max(float(counts[0]), 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for b in batches:
        ce = token_losses(model, b, d.device)[0].sum()
        (ce * (d.world_size / n_loss_tokens)).backward()
        loss_sum += ce.detach().double()
    dist.all_reduce(loss_sum)
    return float(loss_sum), n_loss_tokens, int(counts[1])


def build_optimizer(model, hp, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW (fused on GPU); no weight decay on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weightDecay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=hp.learningRate, betas=(0.9, 0.95),
                             fused=on_gpu, foreach=None if on_gpu else True)


def _scalar(t) -> float:
    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def run(cfg: TrainerConfig) -> dict:
    d = init_distributed()
    progress.start(d.rank, d.world_size)
    hp = cfg.hyperparameters
    torch.manual_seed(hp.seed)
    tracker = Tracker(cfg, d.is_main)
    try:
        return _run(cfg, d, tracker)
    except Exception as e:
        if d.is_main:
            error = f"{type(e).__name__}: {e}"
            tracker.log_other("error", error)
            archive = tracker.end()
            write_summary({"error": error, "tracking": {
                "url": tracker.url, "experimentKey": tracker.key,
                **({"offlineArchive": archive} if archive else {})}})
        raise
    finally:
        progress.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainerConfig, d, tracker: Tracker) -> dict:
    from transformers import AutoTokenizer

    hp = cfg.hyperparameters
    progress.stage("loading-model")
    model_path = resolve_model_path(cfg.baseModel, d, digest=cfg.baseModelDigest)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    fmt = ChatFormat(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- data (fails here, before any training, on invalid lines)
    def gather(obj):
        out = [None] * d.world_size
        dist.all_gather_object(out, obj)
        return out

    def load(uri):  # every rank tokenizes a share, then all ranks have everything
        return load_split(uri, fmt, hp.maxSeqLength, cfg.dataset.skipInvalid,
                          d.rank, d.world_size, gather)

    progress.stage("tokenizing")
    train = load(cfg.dataset.train)
    evals = load(cfg.dataset.eval) if cfg.dataset.eval else None
    if not train.examples:
        raise ValueError(f"no usable training examples in {cfg.dataset.train}")
    packs = pack(train.examples, hp.maxSeqLength, hp.seed)
    plan = plan_steps(len(packs), hp, d.world_size, cfg.maxSteps)
    order = DataOrder(packs, plan, hp.seed)
    total_steps, accum, global_batch = plan.total_steps, plan.grad_accum, plan.global_batch
    report = {"train": train.report, "eval": evals.report if evals else None,
              "packs": len(packs), "globalBatchSize": global_batch, "gradAccum": accum,
              "totalSteps": total_steps}
    if d.is_main:
        log.info("data: %s", report)

    # ---- model, optimizer, schedule, checkpoints
    progress.stage("loading-model")
    model = load_model(model_path, d, cfg.fsdp, cfg.attnImplementation)
    optimizer = build_optimizer(model, hp, d.on_gpu)
    warmup = int(hp.warmupRatio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    ckpt = CheckpointManager(cfg.checkpoint_uri(), cfg.checkpoint.everySteps, cfg.checkpoint.keep,
                             model, optimizer, scheduler, run=cfg.runUid,
                             resume_from=cfg.resumeFrom)
    step = ckpt.load_latest()
    start_step = step
    tracker.log_params({**hp.model_dump(), **cfg.fsdp.model_dump(), "worldSize": d.world_size,
                        "gradAccum": accum, "effectiveGlobalBatchSize": global_batch,
                        "totalSteps": total_steps, "baseModel": cfg.baseModel,
                        **({"parentVersion": cfg.parentVersion} if cfg.parentVersion else {})})
    if start_step == 0:
        tracker.log_data_report(report)

    fpt = flops_per_token(model, hp.maxSeqLength)
    peak = peak_flops(d.device)
    tokens_total = ckpt.extra.get("tokens", 0)
    train_loss = ckpt.extra.get("loss")
    tps = None
    window_tokens, window_t0 = 0, time.perf_counter()
    measured_tokens, measured_time = 0, 0.0
    progress.training(total_steps, start_step, plan.steps_per_epoch,
                      lambda tps: mfu(tps, d.world_size, fpt, peak))

    # ---- train
    curve: list[dict] = []
    eval_every = max(1, total_steps // 5)
    t_start = time.time()
    model.train()
    while step < total_steps:
        t0 = time.perf_counter()
        micro = order.batch(step, d.rank, d.world_size)
        batches = [collate(micro[i:i + hp.microBatchSize], pad_id)
                   for i in range(0, len(micro), hp.microBatchSize)]
        loss_sum, n_loss_tokens, n_tokens = forward_backward(model, batches, d)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.maxGradNorm,
                                                   foreach=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = loss_sum / n_loss_tokens
        curve.append({"step": step, "train_loss": train_loss})  # for the model card's plot
        if evals is not None and evals.examples and step % eval_every == 0 and step < total_steps:
            curve[-1]["eval_loss"] = eval_loss(model, evals, d, hp.maxSeqLength,
                                               hp.microBatchSize, pad_id)[0]
            tracker.log_metrics({"eval_loss": curve[-1]["eval_loss"]}, step)
        tokens_total += n_tokens
        window_tokens += n_tokens
        if d.on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step > start_step + 1:  # the first step includes warm-up costs
            measured_tokens += n_tokens
            measured_time += dt
        if step % cfg.logEverySteps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_t0
            tps = window_tokens / elapsed if elapsed > 0 else None
            metrics = {"train_loss": train_loss, "lr": lr,
                       "grad_norm": _scalar(grad_norm), "tokens_per_s": tps,
                       "mfu": mfu(tps, d.world_size, fpt, peak),
                       "tokens": tokens_total}
            tracker.log_metrics(metrics, step)
            if d.is_main:
                log.info("step %d/%d %s", step, total_steps,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None))
            window_tokens, window_t0 = 0, time.perf_counter()
        if ckpt.should_save(step, total_steps):
            ckpt.extra = {"tokens": tokens_total, "loss": train_loss}
            ckpt.save(step)
            progress.checkpoint(step)
            window_t0 = time.perf_counter()
        progress.step(step, train_loss, n_tokens)
        _debug_delay()
    if measured_time > 0:
        tps = measured_tokens / measured_time

    # ---- evaluate, export, summarise
    metrics = {"train_loss": train_loss}
    warnings = []
    if evals is not None and evals.examples:
        progress.stage("evaluating")
        loss, per_cat = eval_loss(model, evals, d, hp.maxSeqLength, hp.microBatchSize, pad_id)
        acc, acc_cat, warning = tool_call_accuracy(model, fmt, evals.conversations, d,
                                                   cfg.evalMaxNewTokens,
                                                   cfg.evalMaxToolCallPrompts)
        warnings += [warning] if warning else []
        metrics["eval_loss"] = loss
        metrics.update({f"eval_loss/{c}": v for c, v in per_cat.items()})
        metrics["tool_call_accuracy"] = acc
        metrics.update({f"tool_call_accuracy/{c}": v for c, v in acc_cat.items()})
        metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                   for k, v in metrics.items()}
        tracker.log_metrics(metrics, step)
    progress.stage("exporting")
    summary, card = {}, None
    if d.is_main:  # the model card and its plot go into the artifact (inside the digest)
        splits = {"train": train, **({"eval": evals} if evals else {})}
        card = CardInfo(
            name=cfg.runName or "flywheel-run", base_model=cfg.baseModel,
            datasets={k: getattr(cfg.dataset, k) for k in splits},
            digests={k: v.report["digest"] for k, v in splits.items()},
            examples={k: v.report["examples"] for k, v in splits.items()},
            hyperparameters=hp.model_dump(), metrics=metrics, steps=step, tokens=tokens_total,
            world_size=d.world_size, device_hours=d.world_size * (time.time() - t_start) / 3600,
            tracking={"url": tracker.url, "experimentKey": tracker.key}, curve=curve,
            baseline=cfg.baseline, parent=cfg.parentVersion)
    artifact = export_hf(model, tokenizer, model_path, cfg.output.uri, d,
                         extra_files=card_files(card) if card else None)
    if d.is_main:
        archive = tracker.end()
        summary = {
            "artifact": {**artifact, "card": artifact["uri"].rstrip("/") + "/" + CARD_FILE},
            "metrics": metrics,
            "steps": step,
            "startStep": start_step,  # > 0: resumed from a checkpoint at that step
            "dataset": {
                "digests": {"train": train.report["digest"],
                            **({"eval": evals.report["digest"]} if evals else {})},
                "examples": {"train": train.report["examples"],
                             **({"eval": evals.report["examples"]} if evals else {})},
            },
            "tokens": tokens_total,
            **({"warnings": warnings} if warnings else {}),
            "throughput": {"tokensPerSecond": tps, "mfu": mfu(tps, d.world_size, fpt, peak),
                           "tokensPerSecondPerDevice": tps / d.world_size if tps else None},
            "tracking": {"url": tracker.url, "experimentKey": tracker.key,
                         **({"offlineArchive": archive} if archive else {})},
        }
        text = write_summary(summary)
        log.info("summary: %s", text)
    return summary


def _debug_delay() -> None:
    """Test hook: FLYWHEEL_DEBUG_STEP_DELAY_S slows each step so a test can kill mid-run."""
    delay = float(os.environ.get("FLYWHEEL_DEBUG_STEP_DELAY_S", "0") or 0)
    if delay:
        time.sleep(delay)
