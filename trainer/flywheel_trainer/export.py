"""Export: a consolidated Hugging Face directory streamed to the store, plus its digest.

Parameters are gathered one tensor at a time (`DTensor.full_tensor`, collective) and rank 0
streams each straight into its safetensors shard on the store (the shard's header is known
from the shapes before any tensor is gathered), so neither a rank nor the upload ever holds a
whole shard, let alone the model: S3 gets a multipart upload, part by part. Config,
generation config, the tokenizer (with its chat template) and any `extra_files` go beside.

Digest: `sha256:` + sha256 over the lines `<sha256 of file>  <name>\\n` of every top-level file
of the artifact directory, sorted by name (`sha256sum` format), each file hashed from exactly
the bytes uploaded; subdirectories (checkpoints, comet-offline) are not part of the artifact.
That listing itself is uploaded last as the manifest `.flywheel-sha256sums` (`fetch.MANIFEST`,
outside the digest: sha256 of the manifest is the digest), so `fetch` can name the file that
differs. `digest_dir` recomputes the digest by reading the artifact back from the store.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import storage
from .fetch import MANIFEST, RESERVED, digest_lines, manifest_body
from .model import _fqn

SHARD_BYTES = 5 * 1024**3
FORMAT = "huggingface-safetensors"
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}


def _export_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.bfloat16


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """The safetensors prefix (u64 length + JSON header, padded to 8 bytes) for tensors of
    `dtype` laid out back to back in the order given."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _side_files(model, tokenizer, base_path: str, tmp: Path) -> None:
    """Config (use_cache on for inference), tokenizer and generation config into `tmp`."""
    config = model.config
    use_cache, config.use_cache = config.use_cache, True
    config.save_pretrained(tmp)
    config.use_cache = use_cache
    tokenizer.save_pretrained(tmp)
    gen = Path(base_path) / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, tmp / "generation_config.json")


@torch.no_grad()
def export_hf(model, tokenizer, base_path: str, uri: str, d,
              shard_bytes: int = SHARD_BYTES,
              extra_files: dict[str, bytes] | None = None) -> dict:
    """Write the model to `uri`; returns {uri, digest, format} on rank 0 ({} elsewhere).
    `extra_files` (name -> content) are written beside it and covered by the digest; the
    manifest (the digest's preimage) is written last."""
    if reserved := sorted(set(extra_files or ()) & set(RESERVED)):
        raise ValueError(f"extra_files: {reserved} are reserved names")
    dtype = _export_dtype(model.config)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = [(_fqn(k), v) for k, v in model.state_dict().items()
             if not (tied and _fqn(k) == "lm_head.weight")]
    # plan shards by size (same on every rank), then gather and stream shard by shard
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in state:
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    if d.is_main:
        storage.makedirs(uri)
    for i, shard in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        writer = storage.write_hashed(storage.join(uri, fname)) if d.is_main else None
        with writer or contextlib.nullcontext() as out:
            if out:
                out.write(safetensors_header([(n, tuple(t.shape)) for n, t in shard], dtype))
            for name, t in shard:
                full = t.full_tensor() if isinstance(t, DTensor) else t  # collective
                if out:
                    out.write(full.to(device="cpu", dtype=dtype).contiguous().reshape(-1)
                              .view(torch.uint8).numpy())
                    weight_map[name] = fname
                del full
        if out:
            hashes[fname] = out.hexdigest()
    result: dict = {}
    if d.is_main:
        with tempfile.TemporaryDirectory() as tmp:
            _side_files(model, tokenizer, base_path, Path(tmp))
            if len(shards) > 1:
                total = sum(t.numel() * dtype.itemsize for _, t in state)
                (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            for name, content in (extra_files or {}).items():
                (Path(tmp) / name).write_bytes(content)
            for p in sorted(Path(tmp).iterdir()):
                hashes[p.name] = storage.upload_hashed(str(p), storage.join(uri, p.name))
        # stale top-level files from an earlier export would change the digest: remove them
        for entry in storage.listdir(uri):
            if entry["type"] == "file" and entry["name"] not in (*hashes, MANIFEST):
                storage.rm(storage.join(uri, entry["name"]))
        storage.pipe(storage.join(uri, MANIFEST), manifest_body(hashes).encode())
        result = {"uri": uri, "digest": digest_lines(hashes), "format": FORMAT}
    dist.barrier()
    return result


def digest_dir(uri: str) -> str:
    """Recompute an artifact's digest by reading every top-level file back from `uri` (the
    manifest aside)."""
    return digest_lines({e["name"]: storage.sha256(storage.join(uri, e["name"]))
                         for e in storage.listdir(uri)
                         if e["type"] == "file" and e["name"] not in RESERVED})
