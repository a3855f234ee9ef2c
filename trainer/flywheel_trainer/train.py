"""The trainer: one run on one rank, as a `Trainer` whose steps run in this order.

    run(cfg)        distributed setup, seed, progress server, experiment tracker; then
                    `Trainer(cfg, dist, tracker).run()`; on failure rank 0's summary is the error
    load_data()     the base model's tokenizer; train/eval splits tokenized (every rank a
                    share), packed into sequences, the step plan; fails here, before any
                    training, on invalid lines
    build_model()   model (FSDP2), optimizer, LR schedule, checkpoints: resumes from the
                    run's newest complete checkpoint (or `resumeFrom`)
    train()         the loop: one `train_step()` per optimizer step, with periodic eval loss,
                    metrics, checkpoints and progress
    evaluate()      final eval loss and greedy tool-call accuracy, overall and per category
    export()        Hugging Face weights with the model card and its plot beside them
    summarise()     rank 0's summary (contract.Summary): artifact, metrics, data, throughput

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
from .data import IGNORE_INDEX, Pack, Split, StepPlan, collate, load_split, pack, plan_steps
from .evaluate import eval_loss, tool_call_accuracy
from .export import export_hf
from .model import (
    Dist,
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


def run(cfg: TrainerConfig, exiting: bool = False) -> dict:
    """Train, evaluate and export one run; returns rank 0's summary ({} on other ranks). If a
    step fails, rank 0's summary carries the error (and where the experiment is).

    `exiting`: the process ends right after (`__main__`, with `os._exit`). A rank whose run
    is complete then leaves the process group to the process's end instead of tearing it
    down: gloo's teardown now and then aborts a finished rank (`terminate called without an
    active exception`, exit -6), which would fail an attempt whose work is all done."""
    d = init_distributed()
    progress.start(d.rank, d.world_size)
    torch.manual_seed(cfg.hyperparameters.seed)
    tracker = Tracker(cfg, d.is_main)
    summary = None
    try:
        # the Trainer (model, optimizer) is gone before the process group is destroyed
        summary = Trainer(cfg, d, tracker).run()
        return summary
    except Exception as e:
        if d.is_main:
            error = f"{type(e).__name__}: {e}"
            tracker.log_other("error", error)
            write_summary({"error": error, "tracking": _tracking(tracker, tracker.end())})
        raise
    finally:
        progress.stop()
        if dist.is_initialized():
            if summary is not None:  # every rank finished: they leave the group together
                dist.barrier()
            if summary is None or not exiting:
                dist.destroy_process_group()


def _tracking(tracker: Tracker, archive: str | None) -> dict:
    return {"url": tracker.url, "experimentKey": tracker.key,
            **({"offlineArchive": archive} if archive else {})}


class Trainer:
    """One rank's part of a run. The steps share what they build as attributes."""

    def __init__(self, cfg: TrainerConfig, d: Dist, tracker: Tracker):
        self.cfg, self.hp, self.d, self.tracker = cfg, cfg.hyperparameters, d, tracker
        self.step = self.start_step = 0
        self.tokens = 0  # non-padding tokens trained on, over all ranks (and earlier attempts)
        self.train_loss: float | None = None
        self.curve: list[dict] = []  # {"step", "train_loss"[, "eval_loss"]}: the card's plot
        self.tokens_per_s: float | None = None
        self.metrics: dict = {}
        self.warnings: list[str] = []

    def run(self) -> dict:
        self.load_data()
        self.build_model()
        self.train()
        self.evaluate()
        self.export()
        return self.summarise()

    # ---- data (fails here, before any training, on invalid lines)
    def load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, hp, d = self.cfg, self.hp, self.d
        progress.stage("loading-model")  # the tokenizer comes with the base model
        self.model_path = resolve_model_path(cfg.baseModel, d, digest=cfg.baseModelDigest)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.fmt = ChatFormat(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def gather(obj):
            out = [None] * d.world_size
            dist.all_gather_object(out, obj)
            return out

        def load(uri) -> Split:  # every rank tokenizes a share, then all ranks have everything
            return load_split(uri, self.fmt, hp.maxSeqLength, cfg.dataset.skipInvalid,
                              d.rank, d.world_size, gather)

        progress.stage("tokenizing")
        self.train_split = load(cfg.dataset.train)
        self.evals = load(cfg.dataset.eval) if cfg.dataset.eval else None
        if not self.train_split.examples:
            raise ValueError(f"no usable training examples in {cfg.dataset.train}")
        packs = pack(self.train_split.examples, hp.maxSeqLength, hp.seed)
        self.plan = plan_steps(len(packs), hp, d.world_size, cfg.maxSteps)
        self.order = DataOrder(packs, self.plan, hp.seed)
        self.data_report = {
            "train": self.train_split.report, "eval": self.evals.report if self.evals else None,
            "packs": len(packs), "globalBatchSize": self.plan.global_batch,
            "gradAccum": self.plan.grad_accum, "totalSteps": self.plan.total_steps}
        if d.is_main:
            log.info("data: %s", self.data_report)

    # ---- model, optimizer, schedule, checkpoints (resumes here)
    def build_model(self) -> None:
        cfg, hp, d, plan = self.cfg, self.hp, self.d, self.plan
        progress.stage("loading-model")
        self.model = load_model(self.model_path, d, cfg.fsdp, cfg.attnImplementation)
        self.optimizer = build_optimizer(self.model, hp, d.on_gpu)
        warmup = int(hp.warmupRatio * plan.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup, plan.total_steps))
        self.ckpt = CheckpointManager(cfg.checkpoint_uri(), cfg.checkpoint.everySteps,
                                      cfg.checkpoint.keep, self.model, self.optimizer,
                                      self.scheduler, run=cfg.runUid, resume_from=cfg.resumeFrom)
        self.step = self.start_step = self.ckpt.load_latest()
        self.tracker.log_params({
            **hp.model_dump(), **cfg.fsdp.model_dump(), "worldSize": d.world_size,
            "gradAccum": plan.grad_accum, "effectiveGlobalBatchSize": plan.global_batch,
            "totalSteps": plan.total_steps, "baseModel": cfg.baseModel,
            **({"parentVersion": cfg.parentVersion} if cfg.parentVersion else {})})
        if self.start_step == 0:
            self.tracker.log_data_report(self.data_report)
        fpt, peak = flops_per_token(self.model, hp.maxSeqLength), peak_flops(d.device)
        # MFU of a throughput; progress keeps it, so it holds values, not the Trainer
        self.mfu = lambda tokens_per_s: mfu(tokens_per_s, d.world_size, fpt, peak)
        self.tokens = self.ckpt.extra.get("tokens", 0)
        self.train_loss = self.ckpt.extra.get("loss")

    @property
    def has_eval(self) -> bool:
        return self.evals is not None and bool(self.evals.examples)

    def eval_loss(self) -> tuple[float, dict[str, float]]:
        return eval_loss(self.model, self.evals, self.d, self.hp.maxSeqLength,
                         self.hp.microBatchSize, self.pad_id)

    # ---- train
    def train(self) -> None:
        """Steps from the resumed one to the plan's total. Throughput is measured per logging
        window (for the metrics) and over every step but the first of this attempt, which pays
        warm-up costs (for the summary)."""
        cfg, d, total = self.cfg, self.d, self.plan.total_steps
        progress.training(total, self.start_step, self.plan.steps_per_epoch, self.mfu)
        eval_every = max(1, total // 5)
        window_tokens, window_t0 = 0, time.perf_counter()
        measured_tokens, measured_time = 0, 0.0
        self.t_start = time.time()
        self.model.train()
        while self.step < total:
            t0 = time.perf_counter()
            n_tokens, lr, grad_norm = self.train_step()
            if self.has_eval and self.step % eval_every == 0 and self.step < total:
                self.curve[-1]["eval_loss"] = self.eval_loss()[0]
                self.tracker.log_metrics({"eval_loss": self.curve[-1]["eval_loss"]}, self.step)
            self.tokens += n_tokens
            window_tokens += n_tokens
            if d.on_gpu:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if self.step > self.start_step + 1:  # the first step includes warm-up costs
                measured_tokens += n_tokens
                measured_time += dt
            if self.step % cfg.logEverySteps == 0 or self.step == total:
                elapsed = time.perf_counter() - window_t0
                self.tokens_per_s = window_tokens / elapsed if elapsed > 0 else None
                self.log_step(lr, grad_norm)
                window_tokens, window_t0 = 0, time.perf_counter()
            if self.ckpt.should_save(self.step, total):
                self.ckpt.extra = {"tokens": self.tokens, "loss": self.train_loss}
                self.ckpt.save(self.step)
                progress.checkpoint(self.step)
                window_t0 = time.perf_counter()
            progress.step(self.step, self.train_loss, n_tokens)
            _debug_delay()
        if measured_time > 0:
            self.tokens_per_s = measured_tokens / measured_time

    def train_step(self) -> tuple[int, float, torch.Tensor]:
        """One optimizer step; returns (tokens it trained on, its learning rate, grad norm)."""
        hp, d = self.hp, self.d
        micro = self.order.batch(self.step, d.rank, d.world_size)
        batches = [collate(micro[i:i + hp.microBatchSize], self.pad_id)
                   for i in range(0, len(micro), hp.microBatchSize)]
        loss_sum, n_loss_tokens, n_tokens = forward_backward(self.model, batches, d)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), hp.maxGradNorm,
                                                   foreach=True)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.train_loss = loss_sum / n_loss_tokens
        self.curve.append({"step": self.step, "train_loss": self.train_loss})
        return n_tokens, lr, grad_norm

    def log_step(self, lr: float, grad_norm: torch.Tensor) -> None:
        metrics = {"train_loss": self.train_loss, "lr": lr, "grad_norm": _scalar(grad_norm),
                   "tokens_per_s": self.tokens_per_s, "mfu": self.mfu(self.tokens_per_s),
                   "tokens": self.tokens}
        self.tracker.log_metrics(metrics, self.step)
        if self.d.is_main:
            log.info("step %d/%d %s", self.step, self.plan.total_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None))

    # ---- evaluate
    def evaluate(self) -> None:
        """Final metrics: train loss, and on an eval set its loss and greedy tool-call
        accuracy, overall and per category (NaN reported as None)."""
        metrics = {"train_loss": self.train_loss}
        if self.has_eval:
            progress.stage("evaluating")
            loss, per_cat = self.eval_loss()
            acc, acc_cat, warning = tool_call_accuracy(
                self.model, self.fmt, self.evals.conversations, self.d,
                self.cfg.evalMaxNewTokens, self.cfg.evalMaxToolCallPrompts)
            self.warnings += [warning] if warning else []
            metrics["eval_loss"] = loss
            metrics.update({f"eval_loss/{c}": v for c, v in per_cat.items()})
            metrics["tool_call_accuracy"] = acc
            metrics.update({f"tool_call_accuracy/{c}": v for c, v in acc_cat.items()})
            metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                       for k, v in metrics.items()}
            self.tracker.log_metrics(metrics, self.step)
        self.metrics = metrics

    # ---- export: weights, tokenizer, model card (rank 0 writes the card, inside the digest)
    def export(self) -> None:
        progress.stage("exporting")
        card = self.card() if self.d.is_main else None
        self.artifact = export_hf(self.model, self.tokenizer, self.model_path,
                                  self.cfg.output.uri, self.d,
                                  extra_files=card_files(card) if card else None)

    def splits(self) -> dict[str, Split]:
        return {"train": self.train_split, **({"eval": self.evals} if self.evals else {})}

    def card(self) -> CardInfo:
        cfg, d, splits = self.cfg, self.d, self.splits()
        return CardInfo(
            name=cfg.runName or "flywheel-run", base_model=cfg.baseModel,
            datasets={k: getattr(cfg.dataset, k) for k in splits},
            digests={k: v.report["digest"] for k, v in splits.items()},
            examples={k: v.report["examples"] for k, v in splits.items()},
            hyperparameters=self.hp.model_dump(), metrics=self.metrics, steps=self.step,
            tokens=self.tokens, world_size=d.world_size,
            device_hours=d.world_size * (time.time() - self.t_start) / 3600,
            tracking={"url": self.tracker.url, "experimentKey": self.tracker.key},
            curve=self.curve, baseline=cfg.baseline, parent=cfg.parentVersion)

    # ---- summarise (rank 0)
    def summarise(self) -> dict:
        if not self.d.is_main:
            return {}
        archive = self.tracker.end()
        splits, tps = self.splits(), self.tokens_per_s
        summary = {
            "artifact": {**self.artifact,
                         "card": self.artifact["uri"].rstrip("/") + "/" + CARD_FILE},
            "metrics": self.metrics,
            "steps": self.step,
            "startStep": self.start_step,  # > 0: resumed from a checkpoint at that step
            "dataset": {"digests": {k: v.report["digest"] for k, v in splits.items()},
                        "examples": {k: v.report["examples"] for k, v in splits.items()}},
            "tokens": self.tokens,
            **({"warnings": self.warnings} if self.warnings else {}),
            "throughput": {"tokensPerSecond": tps, "mfu": self.mfu(tps),
                           "tokensPerSecondPerDevice": tps / self.d.world_size if tps else None},
            "tracking": _tracking(self.tracker, archive),
        }
        text = write_summary(summary)
        log.info("summary: %s", text)
        return summary


def _debug_delay() -> None:
    """Test hook: FLYWHEEL_DEBUG_STEP_DELAY_S slows each step so a test can kill mid-run."""
    delay = float(os.environ.get("FLYWHEEL_DEBUG_STEP_DELAY_S", "0") or 0)
    if delay:
        time.sleep(delay)
