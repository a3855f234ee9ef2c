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

The store (`writer`, `reader`): DCP's own on local paths. On S3 the data bypasses s3fs's
file objects (one request at a time per file, each byte copied several times on one thread):
each rank writes FLYWHEEL_CKPT_THREADS files at once (default 4), cut into parts of
FLYWHEEL_S3_PART_MB (8) that botocore moves from a thread pool, FLYWHEEL_S3_CONCURRENCY (8) per
file in flight, through buffers kept between checkpoints (threads x (concurrency + 1) parts,
288 MiB); a load reads each file in offset order, as many parts ahead. Bodies carry CRC32, no
SHA-256 payload signature (the AWS SDKs' HTTPS default; FLYWHEEL_S3_SIGN_PAYLOAD=1 signs).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import botocore.config
import botocore.session
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.fsspec_filesystem import (
    FsspecReader,
    FsspecWriter,
    _FileSystem,  # the fsspec base
)
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
        dcp.save(self._state(step), storage_writer=writer(path))
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
        dcp.load(state, storage_reader=reader(path))
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


# ----------------------------------------------------------------------------- the store
def _knob(name: str, default: int) -> int:
    return max(1, int(os.environ.get(name) or default))


_FREE: dict[int, list[bytearray]] = {}  # part buffers kept warm between checkpoints
_POOLS: dict[int, ThreadPoolExecutor] = {}  # and the threads that move them


def _buffer(size: int) -> bytearray:
    with contextlib.suppress(IndexError):
        return _FREE.setdefault(size, []).pop()
    return bytearray(size)


class _S3Files(_FileSystem):
    """DCP's filesystem on S3: data streams through botocore's thread-safe client from a pool
    (`_Upload`, `_Download`); existence, rename, removal and listing through s3fs."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        opts = storage.storage_options(uri)
        self.init_path(uri, **opts)
        self.part = _knob("FLYWHEEL_S3_PART_MB", 8) * 2**20
        self.concurrency = _knob("FLYWHEEL_S3_CONCURRENCY", 8)
        self.keep = _knob("FLYWHEEL_CKPT_THREADS", 4) * (self.concurrency + 1)
        s3cfg = {**opts.get("config_kwargs", {}).get("s3", {}),
                 "payload_signing_enabled": os.environ.get("FLYWHEEL_S3_SIGN_PAYLOAD") == "1"}
        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=opts.get("endpoint_url"),
            region_name=opts.get("client_kwargs", {}).get("region_name"),
            config=botocore.config.Config(s3=s3cfg, max_pool_connections=self.keep,
                                          retries={"mode": "standard", "max_attempts": 5}))
        self.pool = _POOLS.get(self.keep) or _POOLS.setdefault(
            self.keep, ThreadPoolExecutor(self.keep, "flywheel-s3"))
        self.ranges: dict[str, list[tuple[int, int]]] = {}  # what a load reads, per file

    def give(self, buf: bytearray) -> None:
        if len(buf) == self.part and len(_FREE.setdefault(self.part, [])) < self.keep:
            _FREE[self.part].append(buf)

    def get(self, where: dict, view: memoryview, start: int) -> None:
        rng = f"bytes={start}-{start + len(view) - 1}"
        with self.client.get_object(**where, Range=rng)["Body"] as body:
            got = 0
            while got < len(view):
                n = body.readinto(view[got:])
                if not n:
                    raise OSError(f"{where['Key']}: short read at byte {start + got}")
                got += n

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        bucket, _, key = str(path).split("://", 1)[-1].partition("/")
        where = {"Bucket": bucket, "Key": key}
        if "r" in mode:
            with contextlib.closing(_Download(self, where, self.ranges.get(str(path)))) as s:
                yield s
            return
        upload = _Upload(self, where)
        try:
            yield upload
            upload.commit()
        except BaseException:
            upload.abort()  # no object, no pending parts
            raise


class _Upload(io.RawIOBase):
    """Write-only: each full part uploads while the next fills (`concurrency` in flight);
    a stream that fits in one part is one PUT."""

    def __init__(self, files: _S3Files, where: dict) -> None:
        super().__init__()
        self.fs, self.where, self.pos, self.n = files, where, 0, 0
        self.buf, self.upload_id, self.parts = _buffer(files.part), None, []
        self.slots = threading.Semaphore(files.concurrency)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            k = min(len(view), self.fs.part - self.n)
            self.buf[self.n:self.n + k] = view[:k]
            self.n, view = self.n + k, view[k:]
            if self.n == self.fs.part:
                self._send()
        self.pos += size
        return size

    def _send(self) -> None:
        if self.upload_id is None:
            self.upload_id = self.fs.client.create_multipart_upload(**self.where)["UploadId"]
        del self.buf[self.n:]
        self.slots.acquire()
        self.parts.append(self.fs.pool.submit(self._part, len(self.parts) + 1, self.buf))
        self.buf, self.n = _buffer(self.fs.part), 0

    def _part(self, number: int, body: bytearray) -> dict:
        try:
            out = self.fs.client.upload_part(**self.where, UploadId=self.upload_id,
                                             PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            self.fs.give(body)
            self.slots.release()

    def commit(self) -> None:
        if self.upload_id is None:
            del self.buf[self.n:]
            self.fs.client.put_object(**self.where, Body=self.buf)
            return
        if self.n:
            self._send()
        parts = [f.result() for f in self.parts]
        self.fs.client.complete_multipart_upload(**self.where, UploadId=self.upload_id,
                                                 MultipartUpload={"Parts": parts})
        self.fs.give(self.buf)

    def abort(self) -> None:
        for f in self.parts:
            with contextlib.suppress(Exception):
                f.result()
        if self.upload_id is not None:
            self.fs.client.abort_multipart_upload(**self.where, UploadId=self.upload_id)


class _Download(io.RawIOBase):
    """Read-only, over the ranges a load announced (else the whole object), in order: close
    ranges merge up to a part; each span arrives in parts fetched in parallel, `concurrency`
    parts ahead of the one being deserialised. Other reads get a GET of their own."""

    def __init__(self, files: _S3Files, where: dict, ranges) -> None:
        super().__init__()
        self.fs, self.where, self.pos, self.fetched = files, where, 0, {}
        if not ranges:  # DCP's .metadata: read whole
            ranges = [(0, files.client.head_object(**where)["ContentLength"])]
        self.spans: list[list[int]] = []
        for off, length in sorted(ranges):
            last = self.spans[-1] if self.spans else None
            if last and off - last[1] <= 2**16 and off + length - last[0] <= files.part:
                last[1] = max(last[1], off + length)
            else:
                self.spans.append([off, off + length])
        self.starts = [s for s, _ in self.spans]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:  # DCP's views seek from the start
        self.pos = offset + (self.pos if whence == 1 else 0)
        return self.pos

    def _span(self, i: int) -> list[bytearray]:
        for j in [j for j in self.fetched if j < i]:  # loads read forward: free what is behind
            self._drop(j)
        ahead, j, part = 0, i, self.fs.part
        while j < len(self.spans) and (j == i or ahead < self.fs.concurrency):
            start, end = self.spans[j]
            if j not in self.fetched:
                bufs = [_buffer(part) for _ in range(start, end, part)]
                self.fetched[j] = bufs, [self.fs.pool.submit(
                    self.fs.get, self.where, memoryview(b)[:min(part, end - o)], o)
                    for b, o in zip(bufs, range(start, end, part), strict=True)]
            ahead, j = ahead + len(self.fetched[j][0]), j + 1
        for f in self.fetched[i][1]:
            f.result()
        return self.fetched[i][0]

    def _drop(self, j: int) -> None:
        bufs, futures = self.fetched.pop(j)
        for b, f in zip(bufs, futures, strict=True):
            with contextlib.suppress(Exception):
                f.result()
            self.fs.give(b)

    def readinto(self, b) -> int:
        out, done, part = memoryview(b).cast("B"), 0, self.fs.part
        while done < len(out):
            i = bisect.bisect_right(self.starts, self.pos) - 1
            if i < 0 or self.pos >= self.spans[i][1]:  # not announced: a GET of its own
                self.fs.get(self.where, out[done:], self.pos)
                self.pos += len(out) - done
                return len(out)
            c, at = divmod(self.pos - self.spans[i][0], part)
            k = min(len(out) - done, self.spans[i][1] - self.pos, part - at)
            out[done:done + k] = memoryview(self._span(i)[c])[at:at + k]
            done, self.pos = done + k, self.pos + k
        return done

    def read(self, n: int | None = -1) -> bytes:
        buf = bytearray(max(0, self.spans[-1][1] - self.pos) if n is None or n < 0 else n)
        return bytes(buf[:self.readinto(buf)])

    def close(self) -> None:
        for j in list(self.fetched):
            self._drop(j)
        super().close()


class _S3Reader(FsspecReader):
    def read_data(self, plan, planner):
        # each file's items in offset order, announced to its stream so that it reads ahead
        info = self.storage_data
        items = sorted(plan.items, key=lambda r: (info[r.storage_index].relative_path,
                                                  info[r.storage_index].offset))
        self.fs.ranges = {}
        for r in items:
            md = info[r.storage_index]
            path = str(self.fs.concat_path(self.path, md.relative_path))
            self.fs.ranges.setdefault(path, []).append((md.offset, md.length))
        return super().read_data(dataclasses.replace(plan, items=items), planner)


def writer(uri: str):
    """DCP's writer: FileSystemWriter on local paths; on object stores FLYWHEEL_CKPT_THREADS
    files per rank written at once (fsync means nothing there), through `_S3Files` on S3."""
    local = storage.local_path(uri)
    if local is not None:
        return dcp.FileSystemWriter(local)
    w = FsspecWriter(uri, sync_files=False, thread_count=_knob("FLYWHEEL_CKPT_THREADS", 4),
                     **storage.storage_options(uri))
    if storage.scheme(uri) == "s3":
        w.fs = _S3Files(uri)
    return w


def reader(uri: str):
    local = storage.local_path(uri)
    if local is not None:
        return dcp.FileSystemReader(local)
    if storage.scheme(uri) != "s3":
        return FsspecReader(uri, **storage.storage_options(uri))
    r = _S3Reader(uri, **storage.storage_options(uri))
    r.fs = _S3Files(uri)
    return r
