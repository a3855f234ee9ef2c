"""Per-GPU memory plan, from the model's config alone (no weights, no GPU).

What one rank holds at its peak, for this trainer (FSDP2 over all ranks, fp32 master
parameters, bf16 compute, AdamW, activation checkpointing as configured):

- sharded state: fp32 parameters, fp32 gradients and AdamW's two fp32 moments:
  16 bytes x parameters / world size;
- gathered blocks: two decoder blocks in bf16 (the one computing and the one prefetched),
  one block's unsharded gradient (bf16, then fp32 for the reduce-scatter), and the root
  module's embedding / output head, gathered (bf16) with their unsharded gradients;
- activations, for micro-batch x sequence length tokens per forward: a block without
  checkpointing keeps what its backward needs (bf16, flash/sdpa attention so no s^2 term):
  norms 4h, q/k/v 2(q + 2kv), attention output and o_proj input 2q + 2q, MLP 2h + 8i bytes per
  token, with `h` hidden, `q`/`kv` the query / key-value widths, `i` the MLP width; a
  checkpointed block keeps only its input (2h) and one block is recomputed at a time.
  `selective` checkpoints every other block (see `model.parallelize`), `full` every block;
- logits: bf16 logits, their fp32 copy, log-softmax and its gradient (12 bytes x vocab per
  token);
- a fixed 4 GB for the CUDA context, NCCL buffers and allocator fragmentation.

It is an estimate (the allocator's caching and temporary buffers vary), meant to refuse runs
that cannot fit before any GPU is used, not to promise the last gigabyte.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
OVERHEAD_BYTES = 4 * GB


@dataclass
class Shape:
    """What the estimate needs from a model config."""

    params: int
    embedding_params: int  # input embedding + untied output head (gathered by the root)
    block_params: int  # one decoder block
    layers: int
    hidden: int
    q_width: int
    kv_width: int
    mlp_width: int
    vocab: int


def shape_of(config) -> Shape:
    """Count parameters exactly by building a one-block copy of the model on the meta device
    (no memory, fast at any size): the rest plus `layers` times one block."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from .model import decoder_layers

    layers = config.num_hidden_layers
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if isinstance(getattr(one, "layer_types", None), list):
        one.layer_types = one.layer_types[:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        emb += head.weight.numel()
    block = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    params = sum(p.numel() for p in model.parameters()) + (layers - 1) * block
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return Shape(params, emb, block, layers, config.hidden_size, heads * head_dim,
                 kv_heads * head_dim, mlp, config.vocab_size)


def estimate(shape: Shape, seq_len: int, micro_batch: int, checkpointing: str,
             world_size: int) -> dict:
    """Peak bytes per GPU by component (see the module docstring), in GB, and the total."""
    tokens = seq_len * micro_batch
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.mlp_width
    per_token_block = 4 * h + 2 * (q + 2 * kv) + 4 * q + 2 * h + 8 * i
    full_block = tokens * per_token_block
    kept_input = tokens * 2 * h
    checkpointed = {"none": 0, "selective": shape.layers // 2, "full": shape.layers}[
        checkpointing]
    plain = shape.layers - checkpointed
    activations = plain * full_block + checkpointed * kept_input
    if checkpointed:
        activations += full_block  # the block being recomputed
    parts = {
        "shardedState": 16 * shape.params / world_size,
        "gatheredBlocks": 2 * 2 * shape.block_params + 6 * shape.block_params
        + 8 * shape.embedding_params,
        "activations": activations,
        "logits": 12 * tokens * shape.vocab,
        "overhead": OVERHEAD_BYTES,
    }
    out = {k: round(v / GB, 1) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / GB, 1)
    return out


def plan(config, seq_len: int, micro_batch: int, checkpointing: str, world_size: int,
         device_gb: float | None) -> tuple[dict, str | None]:
    """(the plan for the preflight result, a problem when it cannot fit or None)."""
    shape = shape_of(config)
    est = estimate(shape, seq_len, micro_batch, checkpointing, world_size)
    result = {"params": shape.params, "worldSize": world_size, "seqLength": seq_len,
              "microBatchSize": micro_batch, "activationCheckpointing": checkpointing,
              "perGpuGB": est, "deviceGB": device_gb}
    problem = None
    if device_gb is not None and est["total"] > device_gb:
        problem = (f"memory: the estimate is {est['total']} GB per GPU "
                   f"({shape.params / 1e9:.1f}B parameters, {world_size} GPU(s), seq "
                   f"{seq_len} x micro-batch {micro_batch}, activation checkpointing "
                   f"{checkpointing}) but the device has {device_gb} GB; use more GPUs, "
                   "a shorter maxSeqLength or full activation checkpointing")
    return result, problem
