"""Evaluation: loss and tool-call accuracy, overall and per category.

Tool calls are parsed in the base model family's own format (see `chat.ChatFormat`); a chat
template whose tool-call format is unknown gives `None` accuracy and a warning, never 0.
Both work on a sharded model: every rank runs the same number of forwards (ranks without work
run a dummy one), because each FSDP forward all-gathers parameters collectively. Generation is
greedy with a KV cache, and stops when every rank's prompt is finished.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from .chat import ChatFormat, normalize
from .data import IGNORE_INDEX, Conversation, Pack, Split, collate, pack
from .model import token_losses


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
        ce, labels = token_losses(model, batch, d.device)
        ce = ce.double()
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


@torch.no_grad()
def greedy_generate(model, prompt: list[int], d, max_new_tokens: int, stop_ids: set[int],
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
            done = nxt in stop_ids
        flag = torch.tensor([0 if done else 1], device=d.device)
        dist.all_reduce(flag)
        if int(flag) == 0:
            break
        ids = torch.tensor([[nxt]], device=d.device)
        pos = pos[:, -1:] + 1
    return out


UNKNOWN_FORMAT = ("tool_call_accuracy: the base model's chat template uses a tool-call format "
                  "this trainer cannot parse (and its tokenizer has no response_template); "
                  "accuracy not measured")


@torch.no_grad()
def tool_call_accuracy(model, fmt: ChatFormat, convs: list[Conversation], d,
                       max_new_tokens: int, limit: int | None = None):
    """Exact match of generated tool calls (names + JSON arguments), parsed in the family's
    format. Returns (overall, {cat: acc}, warning); overall is None with a warning when the
    format is unknown."""
    tok = fmt.tokenizer
    if fmt.tool_format is None and not getattr(tok, "response_template", None):
        return None, {}, UNKNOWN_FORMAT
    prompts = tool_call_prompts(convs, limit)
    categories = sorted({p[3] for p in prompts})
    hits = torch.zeros(len(categories), dtype=torch.float64, device=d.device)
    totals = torch.zeros_like(hits)
    mine = prompts[d.rank::d.world_size]
    rounds = -(-len(prompts) // d.world_size)
    stop_ids = {tok.convert_tokens_to_ids(t) for t in fmt.stop_tokens}
    was_training = model.training
    model.eval()
    for r in range(rounds):
        active = r < len(mine)
        prompt = ""
        if active:
            msgs, tools, expected, cat = mine[r]
            prompt = fmt.apply(normalize(msgs, fmt.short_ids), tools, add_generation_prompt=True)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = [tok.eos_token_id]
        gen = greedy_generate(model, list(ids), d, max_new_tokens, stop_ids, active)
        if active:
            got = fmt.parse_tool_calls(tok.decode(gen, skip_special_tokens=False), prompt, tools)
            i = categories.index(cat)
            totals[i] += 1
            hits[i] += float(got == expected)
    dist.all_reduce(hits)
    dist.all_reduce(totals)
    model.train(was_training)
    per_cat = {c: float(hits[i] / totals[i]) for i, c in enumerate(categories) if totals[i] > 0}
    overall = float(hits.sum() / totals.sum()) if totals.sum() > 0 else float("nan")
    return overall, per_cat, None
