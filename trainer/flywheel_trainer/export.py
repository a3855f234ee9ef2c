"""Export: a consolidated Hugging Face directory written through fsspec, plus its digest.

Parameters are gathered one tensor at a time (`DTensor.full_tensor`, collective) and rank 0
writes them into safetensors shards of at most `shard_bytes`, so no rank ever holds the whole
model. Config, generation config and the tokenizer (with its chat template) go beside them.

Digest: `sha256:` + sha256 over the lines `<sha256 of file>  <name>\\n` of every top-level file
of the artifact directory, sorted by name (`sha256sum` format); subdirectories (checkpoints,
comet-offline) are not part of the artifact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist
from safetensors.torch import save as st_save
from torch.distributed.tensor import DTensor

from .data import local_path
from .model import _fqn

SHARD_BYTES = 5 * 1024**3


def _export_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.bfloat16


def digest_lines(named_hashes: dict[str, str]) -> str:
    body = "".join(f"{h}  {n}\n" for n, h in sorted(named_hashes.items()))
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


@torch.no_grad()
def export_hf(model, tokenizer, base_path: str, uri: str, d,
              shard_bytes: int = SHARD_BYTES, extra_files: dict[str, bytes] | None = None) -> dict:
    """Write the model to `uri`; returns {uri, digest, format} on rank 0 ({} elsewhere).
    `extra_files` (name -> bytes, e.g. the model card) go beside it, inside the digest."""
    dtype = _export_dtype(model.config)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = [(_fqn(k), v) for k, v in model.state_dict().items()
             if not (tied and _fqn(k) == "lm_head.weight")]
    # plan shards by size (same on every rank), then gather and write shard by shard
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in state:
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    fs, root = fsspec.core.url_to_fs(local_path(uri))
    root = root.rstrip("/")
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    if d.is_main:
        fs.makedirs(root, exist_ok=True)
    for i, shard in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {}
        for name, t in shard:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            if d.is_main:
                tensors[name] = full.to(device="cpu", dtype=dtype).contiguous()
                weight_map[name] = fname
        if d.is_main:
            blob = st_save(tensors, metadata={"format": "pt"})
            with fs.open(f"{root}/{fname}", "wb") as f:
                f.write(blob)
            hashes[fname] = hashlib.sha256(blob).hexdigest()
            del blob, tensors
    result: dict = {}
    if d.is_main:
        with tempfile.TemporaryDirectory() as tmp:
            config = model.config
            use_cache, config.use_cache = config.use_cache, True
            config.save_pretrained(tmp)
            config.use_cache = use_cache
            tokenizer.save_pretrained(tmp)
            gen = Path(base_path) / "generation_config.json"
            if gen.exists():
                shutil.copy(gen, Path(tmp) / "generation_config.json")
            if len(shards) > 1:
                total = sum(t.numel() * dtype.itemsize for _, t in state)
                (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            for name, data in (extra_files or {}).items():
                (Path(tmp) / name).write_bytes(data)
            for p in sorted(Path(tmp).iterdir()):
                data = p.read_bytes()
                with fs.open(f"{root}/{p.name}", "wb") as f:
                    f.write(data)
                hashes[p.name] = hashlib.sha256(data).hexdigest()
        # stale top-level files from an earlier export would change the digest: remove them
        for entry in fs.ls(root, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "file" and name not in hashes:
                fs.rm(entry["name"])
        result = {"uri": uri, "digest": digest_lines(hashes),
                  "format": "huggingface-safetensors"}
    dist.barrier()
    return result


def digest_dir(uri: str) -> str:
    """Recompute an artifact's digest from what is stored at `uri`."""
    fs, root = fsspec.core.url_to_fs(local_path(uri))
    hashes = {}
    for entry in fs.ls(root.rstrip("/"), detail=True):
        if entry["type"] == "file":
            with fs.open(entry["name"], "rb") as f:
                hashes[entry["name"].rstrip("/").rsplit("/", 1)[-1]] = hashlib.sha256(
                    f.read()).hexdigest()
    return digest_lines(hashes)
