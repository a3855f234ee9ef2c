"""Distributed checkpoints (torch.distributed.checkpoint), in the manner of torchtitan's
components/checkpoint.py.

Layout: `<checkpoint.uri>/step-<N>/` holds one DCP checkpoint: model and optimizer (sharded),
LR scheduler, the data position (the step; the data order is a pure function of seed and step)
and every rank's RNG state. DCP writes `.metadata` last, after all ranks wrote their shards,
so a step is trusted only when its `.metadata` exists; anything else is a torn write and
ignored. After each save the newest `keep` complete steps are kept and everything older goes.
"""

from __future__ import annotations

import logging
import re

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger("flywheel.checkpoint")
STEP_DIR = re.compile(r"^step-(\d+)$")


def _fs(uri: str):
    from .data import local_path

    return fsspec.core.url_to_fs(local_path(uri))


def complete_steps(uri: str) -> list[int]:
    """Steps under `uri` whose DCP metadata exists, oldest first."""
    fs, root = _fs(uri)
    if not fs.exists(root):
        return []
    steps = []
    for entry in fs.ls(root, detail=False):
        m = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m and fs.exists(f"{entry.rstrip('/')}/.metadata"):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _storage(uri: str, write: bool):
    """DCP writer/reader: the plain filesystem one for local paths, fsspec for the rest."""
    from .data import local_path

    uri = local_path(uri)
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return dcp.FileSystemWriter(path) if write else dcp.FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return FsspecWriter(uri) if write else FsspecReader(uri)


class CheckpointManager:
    def __init__(self, uri: str, every_steps: int, keep: int, model, optimizer, scheduler):
        self.uri = uri.rstrip("/")
        self.every = every_steps
        self.keep = max(2, keep)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rank = dist.get_rank()
        self.extra: dict = {}  # tokens seen and last loss, restored with the step

    def _path(self, step: int) -> str:
        return f"{self.uri}/step-{step}"

    def _state(self, step: int) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "scheduler": {"last_epoch": torch.tensor(self.scheduler.last_epoch)},
            "train": {
                "step": torch.tensor(step),
                "tokens": torch.tensor(int(self.extra.get("tokens", 0))),
                "loss": torch.tensor(float(self.extra.get("loss") or float("nan")),
                                     dtype=torch.float64),
            },
            f"rng/rank{self.rank}": torch.get_rng_state(),
            **({f"cuda_rng/rank{self.rank}": torch.cuda.get_rng_state()}
               if torch.cuda.is_available() else {}),
        }

    def should_save(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    def save(self, step: int) -> None:
        if step in complete_steps(self.uri):
            return
        dcp.save(self._state(step), storage_writer=_storage(self._path(step), write=True))
        dist.barrier()
        if self.rank == 0:
            self._purge(step)
        dist.barrier()
        log.info("saved checkpoint step %d to %s", step, self._path(step))

    def _purge(self, newest: int) -> None:
        fs, root = _fs(self.uri)
        keep = set(complete_steps(self.uri)[-self.keep:])
        for entry in fs.ls(root, detail=False):
            m = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m and int(m.group(1)) not in keep and int(m.group(1)) <= newest:
                fs.rm(entry, recursive=True)

    def load_latest(self) -> int:
        """Restore the newest complete checkpoint; returns its step (0 when there is none)."""
        steps = complete_steps(self.uri)
        if not steps:
            return 0
        step = steps[-1]
        state = self._state(step)
        dcp.load(state, storage_reader=_storage(self._path(step), write=False))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.last_epoch = int(state["scheduler"]["last_epoch"])
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        torch.set_rng_state(state[f"rng/rank{self.rank}"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state[f"cuda_rng/rank{self.rank}"])
        log.info("resumed from checkpoint step %d at %s", step, self._path(step))
        loss = float(state["train"]["loss"])
        self.extra = {"tokens": int(state["train"]["tokens"]),
                      "loss": None if loss != loss else loss}
        return int(state["train"]["step"])
