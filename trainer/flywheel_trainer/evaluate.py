"""Evaluation: loss and tool-call accuracy, overall and per category.

Both work on a sharded model: every rank runs the same number of forwards (ranks without work
run a dummy one), because each FSDP forward all-gathers parameters collectively. Generation is
greedy with a KV cache, and stops when every rank's prompt is finished.
"""

from __future__ import annotations

import json
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE_INDEX, Conversation, Pack, Split, _hf_messages, collate, pack

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@torch.no_grad()
def eval_loss(model, split: Split, d, max_seq_length: int, micro_batch: int, pad_id: int):
    """Mean assistant-token loss overall and per category. Returns (overall, {cat: loss})."""
    categories = sorted({e.category for e in split.examples})
    cat_index = {c: i for i, c in enumerate(categories)}
    packs = pack(split.examples, max_seq_length, seed=0)
    mine = packs[d.rank::d.world_size]
    rounds = -(-len(packs) // (d.world_size * micro_batch)) if packs else 0
    sums = torch.zeros(len(categories) + 1, dtype=torch.float64, device=d.device)
    counts = torch.zeros_like(sums)
    was_training = model.training
    model.eval()
    for r in range(rounds):
        chunk = mine[r * micro_batch:(r + 1) * micro_batch] or [Pack([])]
        batch = collate(chunk, pad_id)
        cats = []
        for p in chunk:
            row = [cat_index[doc.category] for doc in p.docs for _ in doc.input_ids]
            cats.append(row + [len(categories)] * (len(batch["input_ids"][0]) - len(row)))
        ids = torch.tensor(batch["input_ids"], device=d.device)
        labels = torch.tensor(batch["labels"], device=d.device)
        pos = torch.tensor(batch["position_ids"], device=d.device)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                             ignore_index=IGNORE_INDEX, reduction="none").double()
        valid = (labels.flatten() != IGNORE_INDEX).double()
        cat_t = torch.tensor(cats, device=d.device).flatten()
        sums.index_add_(0, cat_t, ce * valid)
        counts.index_add_(0, cat_t, valid)
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    model.train(was_training)
    per_cat = {c: float(sums[i] / counts[i]) for i, c in enumerate(categories) if counts[i] > 0}
    total = float(sums[:-1].sum() / counts[:-1].sum()) if counts[:-1].sum() > 0 else float("nan")
    return total, per_cat


def tool_call_prompts(convs: list[Conversation], limit: int | None = None):
    """(messages before an assistant tool-call turn, tools, expected calls, category)."""
    out = []
    for conv in convs:
        for i, m in enumerate(conv.messages):
            if m["role"] == "assistant" and m.get("tool_calls"):
                expected = [
                    {"name": c["function"]["name"], "arguments": _args(c["function"]["arguments"])}
                    for c in m["tool_calls"]
                ]
                out.append((conv.messages[:i], conv.tools, expected, conv.category))
    return out[:limit] if limit is not None else out


def _args(a):
    return json.loads(a) if isinstance(a, str) else a


def parse_tool_calls(text: str) -> list[dict] | None:
    """Tool calls in generated text (`<tool_call>{"name":..,"arguments":..}</tool_call>`)."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
            calls.append({"name": obj["name"], "arguments": _args(obj.get("arguments", {}))})
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
    return calls


@torch.no_grad()
def greedy_generate(model, prompt: list[int], d, max_new_tokens: int, eos_id: int,
                    active: bool) -> list[int]:
    """Greedy decoding in lockstep with the other ranks (FSDP all-gathers are collective)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt], device=d.device)
    pos = torch.arange(len(prompt), device=d.device)[None]
    out: list[int] = []
    done = not active
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        if not done:
            out.append(nxt)
            done = nxt == eos_id
        flag = torch.tensor([0 if done else 1], device=d.device)
        dist.all_reduce(flag)
        if int(flag) == 0:
            break
        ids = torch.tensor([[nxt]], device=d.device)
        pos = pos[:, -1:] + 1
    return out


@torch.no_grad()
def tool_call_accuracy(model, tokenizer, convs: list[Conversation], d, max_new_tokens: int,
                       limit: int | None = None):
    """Exact match of generated tool calls (names + JSON arguments). (overall, {cat: acc})."""
    prompts = tool_call_prompts(convs, limit)
    categories = sorted({p[3] for p in prompts})
    hits = torch.zeros(len(categories), dtype=torch.float64, device=d.device)
    totals = torch.zeros_like(hits)
    mine = prompts[d.rank::d.world_size]
    rounds = -(-len(prompts) // d.world_size)
    was_training = model.training
    model.eval()
    for r in range(rounds):
        active = r < len(mine)
        if active:
            msgs, tools, expected, cat = mine[r]
            ids = tokenizer.apply_chat_template(
                _hf_messages(msgs), tools=tools or None, add_generation_prompt=True,
                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = [tokenizer.eos_token_id]
        gen = greedy_generate(model, list(ids), d, max_new_tokens, tokenizer.eos_token_id, active)
        if active:
            got = parse_tool_calls(tokenizer.decode(gen, skip_special_tokens=False))
            i = categories.index(cat)
            totals[i] += 1
            hits[i] += float(got == expected)
    dist.all_reduce(hits)
    dist.all_reduce(totals)
    model.train(was_training)
    per_cat = {c: float(hits[i] / totals[i]) for i, c in enumerate(categories) if totals[i] > 0}
    overall = float(hits.sum() / totals.sum()) if totals.sum() > 0 else float("nan")
    return overall, per_cat
