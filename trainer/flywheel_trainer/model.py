"""Distributed setup, model loading (meta device -> FSDP2 -> weights streamed from safetensors)
and parallelism, applied in one function (`parallelize`), torchtitan style."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import Fsdp


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def init_distributed() -> Dist:
    """NCCL + the local GPU when CUDA is available, gloo + CPU otherwise."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"  # gloo for the few CPU-side object collectives
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    return Dist(rank, local_rank, world, device, mesh)


NO_WEIGHTS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]


def resolve_model_path(uri: str, d: Dist | None = None, weights: bool = True,
                       digest: str | None = None) -> str:
    """A local directory holding the base model: `file://`, `pvc://` and plain paths as they
    are, `hf://org/name[@revision]` through the hub cache (HF_TOKEN from env), `s3://`/`gs://`
    copied to a local cache once per node (local rank 0 downloads, the rest wait).
    `weights=False` fetches only config and tokenizer files (preflight).

    `digest` (an exported artifact's `sha256:...`): each node's local rank 0 verifies the
    directory before it is returned (`fetch.verify_dir`; s3/gs copies are verified while they
    download, `fetch.fetch`, and reused when already verified), and every rank raises
    `fetch.DigestMismatch`, naming the first file that differs, when one node's copy does not
    match; a cached copy that does not match is discarded. Without weights only the files
    fetched are checked, through the artifact's manifest."""
    from . import fetch, storage

    patterns = None if weights else NO_WEIGHTS
    main_local = d is None or d.local_rank == 0
    local = storage.local_path(uri)
    if local is not None:
        if digest:
            _agree(d, _attempt(main_local, lambda: fetch.verify_dir(local, digest, patterns)))
        return local
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, revision = storage.parse_hf(uri)
        kw = {"revision": revision, "token": os.environ.get("HF_TOKEN"),
              "allow_patterns": patterns}
        path = None

        def download() -> None:
            nonlocal path
            path = snapshot_download(repo, **kw)
            if digest:
                fetch.verify_dir(path, digest, patterns)

        _agree(d, _attempt(main_local, download))
        return path or snapshot_download(repo, **kw)
    cache = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", "/tmp/flywheel-model"))
    target = cache / uri.replace("://", "/").strip("/")
    if not weights:
        target = target.with_name(target.name + "-noweights")

    def download() -> None:
        if digest and weights:  # verified while it downloads; nothing to do when it was
            fetch.fetch(uri, digest, target)
            (target / ".complete").touch()
            return
        if not (target / ".complete").exists():
            storage.download_dir(uri, str(target),
                                 patterns + [fetch.MANIFEST] if patterns and digest else patterns)
            (target / ".complete").touch()
        if digest:
            fetch.verify_dir(target, digest, patterns)

    _agree(d, _attempt(main_local, download,
                       discard=lambda: shutil.rmtree(target, ignore_errors=True)))
    return str(target)


def _attempt(run: bool, fn, discard=None) -> Exception | None:
    """Run `fn` (when `run`); the exception it raised, after `discard` on a digest mismatch."""
    if not run:
        return None
    from .fetch import DigestMismatch

    try:
        fn()
    except Exception as e:  # noqa: BLE001 - handed to every rank by _agree
        if discard is not None and isinstance(e, DigestMismatch):
            discard()
        return e
    return None


def _agree(d: Dist | None, error: Exception | None) -> None:
    """Wait for every node's local rank 0 (it downloads and verifies), then fail everywhere
    if any failed: the failing rank with its own error, the others naming it."""
    if d is None:
        if error is not None:
            raise error
        return
    from . import storage
    from .fetch import DigestMismatch

    errors: list = [None] * d.world_size
    mine = None if error is None else (isinstance(error, DigestMismatch),
                                       storage.redact(f"{type(error).__name__}: {error}"))
    dist.all_gather_object(errors, mine)
    if error is not None:
        raise error
    for rank, failed in enumerate(errors):
        if failed:
            mismatch, message = failed
            cls = DigestMismatch if mismatch else RuntimeError
            raise cls(f"base model on rank {rank}: {message}")


def default_attention(d: Dist) -> str:
    """Varlen flash attention on GPUs when flash-attn is installed (packed position ids become
    cu_seqlens), else sdpa with the block-diagonal mask Hugging Face builds from them."""
    if d.on_gpu:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def build_model(path: str, d: Dist, attn_implementation: str | None = None):
    """Create the model on the meta device (no memory, no init cost)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation or default_attention(d),
            dtype=torch.float32,
        )
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of repeated decoder blocks, found generically: the ModuleList whose blocks are
    of a class the model declares unsplittable (`_no_split_modules`: LlamaDecoderLayer,
    Qwen3DecoderLayer, MistralDecoderLayer, ...), else the longest ModuleList of one class."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best = None
    for _, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not len(module):
            continue
        kinds = {type(_unwrap(b)).__name__ for b in module}
        if len(kinds) != 1:
            continue
        if kinds & no_split:
            return module
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise ValueError(f"no stack of decoder blocks found in {type(model).__name__}")
    return best


def _unwrap(block):
    """A block without its checkpoint / torch.compile wrappers."""
    while True:
        inner = (getattr(block, "_checkpoint_wrapped_module", None)
                 or getattr(block, "_orig_mod", None))
        if inner is None:
            return block
        block = inner


def parallelize(model, d: Dist, fsdp: Fsdp):
    """Activation checkpointing, torch.compile, then fully_shard per decoder layer and the root.

    Parameters are kept in fp32; on GPU compute runs in bf16 with fp32 gradient reduction.
    """
    if fsdp.activationCheckpointing != "none":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            # selective: every other block (torchtitan's layer-wise selective AC)
            if fsdp.activationCheckpointing == "full" or i % 2 == 0:
                layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if fsdp.compile and d.on_gpu:
        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer)
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if d.on_gpu else torch.float32, reduce_dtype=torch.float32
    )
    layers = list(decoder_layers(model))
    for i, layer in enumerate(layers):
        # the last block's parameters are needed again right away by backward
        reshard = fsdp.reshardAfterForward and i < len(layers) - 1
        fully_shard(layer, mesh=d.mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=d.mesh, mp_policy=mp, reshard_after_forward=fsdp.reshardAfterForward)
    return model


def _fqn(name: str) -> str:
    """Strip wrapper prefixes (checkpoint wrapper, torch.compile) from a parameter name."""
    for junk in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    return name


def _safetensors_index(path: str) -> dict[str, str]:
    p = Path(path)
    idx = p / "model.safetensors.index.json"
    if idx.exists():
        return {k: str(p / v) for k, v in json.loads(idx.read_text())["weight_map"].items()}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            out.update({k: str(f) for k in sf.keys()})  # noqa: SIM118
    return out


@torch.no_grad()
def materialize_and_load(model, path: str, d: Dist) -> None:
    """Allocate the sharded parameters on the device and fill them from safetensors, one tensor
    at a time (each rank keeps only its shard; memory is bounded by the largest tensor)."""
    from safetensors import safe_open

    model.to_empty(device=d.device)
    index = _safetensors_index(path)
    handles: dict[str, object] = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, param in model.state_dict().items():
        key = _fqn(name)
        if key not in index:
            if tied and key == "lm_head.weight":
                continue  # shared with the input embedding
            raise KeyError(f"{key} missing from the checkpoint in {path}")
        f = index[key]
        if f not in handles:
            handles[f] = safe_open(f, "pt", device="cpu")
        full = handles[f].get_tensor(key).to(device=d.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            param.to_local().copy_(distribute_tensor(full, param.device_mesh,
                                                     param.placements).to_local())
        else:
            param.copy_(full)
    # non-persistent buffers (rotary inv_freq) were on meta: rebuild them from the config
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(d.device))
            module.attention_scaling = getattr(fresh, "attention_scaling", 1.0)


def load_model(path: str, d: Dist, fsdp: Fsdp, attn_implementation: str | None = None):
    """Meta-device model -> parallelize -> materialise and load weights from `path`."""
    model = build_model(path, d, attn_implementation)
    parallelize(model, d, fsdp)
    materialize_and_load(model, path, d)
    model.train()
    return model


def token_losses(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass shared by training and evaluation: a collated micro-batch ->
    (per-token cross-entropy in fp32, flat labels); 0 where the label is IGNORE_INDEX."""
    import torch.nn.functional as F

    from .data import IGNORE_INDEX

    ids = torch.tensor(batch["input_ids"], device=device)
    labels = torch.tensor(batch["labels"], device=device).flatten()
    pos = torch.tensor(batch["position_ids"], device=device)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX,
                         reduction="none")
    return ce, labels


def flops_per_token(model, seq_len: int) -> float:
    """torchtitan's estimate: 6 * (params - embedding params) + 12 * layers * heads * head_dim *
    seq_len (the attention term)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for p in model.get_input_embeddings().parameters())
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 6 * (params - embedding) + 12 * cfg.num_hidden_layers * heads * head_dim * seq_len


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "B200": 2250e12}


def mfu(tokens_per_s: float | None, world_size: int, fpt: float,
        peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOPs per device over the device's bf16 peak."""
    if not tokens_per_s or not peak:
        return None
    return tokens_per_s / world_size * fpt / peak


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None
