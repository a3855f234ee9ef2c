"""Distributed checkpoints (torch.distributed.checkpoint), in the manner of torchtitan's
components/checkpoint.py, saved and loaded directly against the store (storage.py).

Layout: `<checkpoint.uri>/step-<N>/` holds one DCP checkpoint: model and optimizer (sharded),
LR scheduler, the data position (the step; the data order is a pure function of seed and step)
and every rank's RNG state. Object stores have no atomic rename, so DCP's `.metadata` alone
does not prove a step complete: after every rank's shards and DCP's `.metadata` are on the
store, rank 0 writes `.complete` last, listing each object of the step and its size. A step is
trusted only when its `.complete` exists and every object it lists is there with that size;
anything else is a torn write and ignored (and cleared before that step is written again).
After each save the newest `keep` complete steps are kept; older ones lose `.complete` first.

A run owns its checkpoints: `.complete` records the run's uid, and a run resumes only from
steps it wrote itself (its directory is its own anyway, see config.run_scoped). Another run's
checkpoint is used only when the run names it in `resumeFrom` (a deliberate warm start).
"""

from __future__ import annotations

import json
import logging
import re

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import storage

log = logging.getLogger("flywheel.checkpoint")
STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = ".complete"


def _steps(uri: str) -> dict[int, str]:
    """Every step directory under `uri` (complete or not): step -> its URI."""
    return {int(m.group(1)): storage.join(uri, e["name"]) for e in storage.listdir(uri)
            if e["type"] == "directory" and (m := STEP_DIR.match(e["name"]))}


def is_complete(step_uri: str, run: str | None = None) -> bool:
    """The step's marker exists and every object it lists is on the store with its size;
    with `run`, the marker must also name that run (a step another run wrote is not ours)."""
    files = {e["name"]: e["size"] for e in storage.listdir(step_uri) if e["type"] == "file"}
    if MARKER not in files:
        return False
    try:
        with storage.open_uri(storage.join(step_uri, MARKER), "rb") as f:
            marker = json.loads(f.read())
        listed = marker["files"]
    except (OSError, ValueError, KeyError):
        return False
    if run is not None and marker.get("run") != run:
        log.warning("ignoring checkpoint %s: written by run %s, not this run (%s)",
                    step_uri, marker.get("run"), run)
        return False
    return all(files.get(name) == size for name, size in listed.items())


def complete_steps(uri: str, run: str | None = None) -> list[int]:
    """Steps under `uri` that are complete on the store (and `run`'s), oldest first."""
    return sorted(step for step, path in _steps(uri).items() if is_complete(path, run))


def mark_complete(step_uri: str, step: int, run: str | None = None) -> None:
    """Write the step's marker, last: it lists every object of the step and its size, and the
    run that wrote it."""
    files = {e["name"]: e["size"] for e in storage.listdir(step_uri)
             if e["type"] == "file" and e["name"] != MARKER}
    if ".metadata" not in files:
        raise OSError(f"{step_uri}: DCP's .metadata is missing after the save")
    storage.pipe(storage.join(step_uri, MARKER), json.dumps(
        {"step": step, "files": files, "run": run}, sort_keys=True).encode())


def warm_start_step(uri: str) -> str:
    """The step directory `resumeFrom` names: itself when it is a complete step, else the
    newest complete step under it. A clear error when there is none."""
    uri = uri.rstrip("/")
    if STEP_DIR.match(uri.rsplit("/", 1)[-1]) and is_complete(uri):
        return uri
    steps = complete_steps(uri)
    if not steps:
        raise FileNotFoundError(f"resumeFrom {uri}: no complete checkpoint there (a step-N "
                                f"directory with its {MARKER} marker, or a directory of them)")
    return storage.join(uri, f"step-{steps[-1]}")


class CheckpointManager:
    def __init__(self, uri: str, every_steps: int, keep: int, model, optimizer, scheduler,
                 run: str | None = None, resume_from: str | None = None):
        self.uri = uri.rstrip("/")
        self.run, self.resume_from = run, resume_from
        self.every = every_steps
        self.keep = max(2, keep)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rank = dist.get_rank()
        self.extra: dict = {}  # tokens seen and last loss, restored with the step

    def _path(self, step: int) -> str:
        return storage.join(self.uri, f"step-{step}")

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
        path = self._path(step)
        done = is_complete(path, self.run) if self.rank == 0 else None
        flag = [done]
        dist.broadcast_object_list(flag, src=0)  # one rank decides, all agree
        if flag[0]:
            return
        if self.rank == 0 and step in _steps(self.uri):
            storage.rm(path, recursive=True)  # a torn write of this step: start clean
        dist.barrier()
        dcp.save(self._state(step), storage_writer=storage.dcp_writer(path))
        # dcp.save returns on every rank only after all shards and `.metadata` are written
        if self.rank == 0:
            mark_complete(path, step, self.run)
            self._purge(step)
        dist.barrier()
        log.info("saved checkpoint step %d to %s", step, path)

    def _purge(self, newest: int) -> None:
        keep = set(complete_steps(self.uri, self.run)[-self.keep:])
        for step, path in sorted(_steps(self.uri).items()):
            if step not in keep and step <= newest:
                marker = storage.join(path, MARKER)
                if storage.exists(marker):
                    storage.rm(marker)  # untrusted first, so a half-removed step is ignored
                storage.rm(path, recursive=True)

    def load_latest(self) -> int:
        """Restore the run's newest complete checkpoint, else the `resume_from` one; returns
        its step (0 when there is none)."""
        path = None
        if self.rank == 0:
            steps = complete_steps(self.uri, self.run)
            path = (self._path(steps[-1]) if steps
                    else warm_start_step(self.resume_from) if self.resume_from else None)
        flag = [path]
        dist.broadcast_object_list(flag, src=0)  # every rank loads the same step
        path = flag[0]
        if not path:
            return 0
        state = self._state(0)
        dcp.load(state, storage_reader=storage.dcp_reader(path))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.last_epoch = int(state["scheduler"]["last_epoch"])
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        torch.set_rng_state(state[f"rng/rank{self.rank}"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state[f"cuda_rng/rank{self.rank}"])
        step = int(state["train"]["step"])
        log.info("resumed from checkpoint step %d at %s", step, path)
        loss = float(state["train"]["loss"])
        self.extra = {"tokens": int(state["train"]["tokens"]),
                      "loss": None if loss != loss else loss}
        return step
