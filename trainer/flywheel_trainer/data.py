"""`chat-tools` data: read and validate JSONL, filter, render through the chat template, pack.

Every line is one conversation: `{"messages": [...], "tools": [...], "category": "..."}` with
OpenAI-style messages (assistant `tool_calls` with ids, arguments as a JSON string or object,
`content: null` beside tool calls; `tool` replies with `tool_call_id`). `chat` renders them
through the base model's own chat template; the loss covers what the model generates for each
assistant turn and nothing else. A conversation becomes one or more documents, packed into
sequences whose position ids restart at 0 for every document; with `attention_mask=None`
Hugging Face models turn those resets into a document-isolated (block-diagonal causal) mask,
so tokens never attend across documents.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .chat import ChatError, ChatFormat
from .storage import open_uri

IGNORE_INDEX = -100
DEFAULT_CATEGORY = "uncategorized"
ROLES = {"system", "user", "assistant", "tool"}
FILTERS = ("invalid_tool_arguments", "unknown_tool", "empty_assistant", "duplicate", "too_long",
           "no_loss_tokens")


class DataError(ValueError):
    """Malformed input lines; the message lists `file:line: what is wrong` for each."""


#: Longest line read (bytes, without its newline); the operator sets it per cluster.
MAX_LINE_ENV = "FLYWHEEL_MAX_LINE_BYTES"
DEFAULT_MAX_LINE_BYTES = 16 * 2**20


def max_line_bytes() -> int:
    return int(os.environ.get(MAX_LINE_ENV) or DEFAULT_MAX_LINE_BYTES)


def capped_lines(f: BinaryIO, cap: int, digest: Any, block_size: int = 2**20):
    """The lines of a binary file (with their newline), every byte fed to `digest`; None in
    place of a line longer than `cap` bytes, which is read past in blocks and never held
    whole (a file without newlines cannot exhaust memory)."""
    buf, too_long = b"", False
    while block := f.read(block_size):
        digest.update(block)
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            piece = block[start:end + 1]
            yield None if too_long or len(buf) + len(piece) - 1 > cap else buf + piece
            buf, too_long, start = b"", False, end + 1
        if not too_long:
            buf += block[start:]
            if len(buf) > cap:
                buf, too_long = b"", True
    if too_long:
        yield None
    elif buf:
        yield buf


# ----------------------------------------------------------------------------- validation


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    category: str
    line: int


def _validate(obj: Any) -> str | None:
    """Return what is wrong with one parsed line, or None."""
    if not isinstance(obj, dict):
        return "line is not a JSON object"
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "`messages` must be a non-empty list"
    tools = obj.get("tools", [])
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        return "`tools` must be a list"
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"tools[{j}] must be {{'type': 'function', 'function': {{'name': ...}}}}"
    cat = obj.get("category")
    if cat is not None and (not isinstance(cat, str) or not cat):
        return "`category` must be a non-empty string"
    has_assistant = False
    call_ids: set[str] = set()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        role = m.get("role")
        if role not in ROLES:
            return f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}"
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                return f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}"
            m["content"] = content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            return f"messages[{i}].content must be a string, text parts or null"
        if role == "assistant":
            has_assistant = True
            calls = m.get("tool_calls")
            if calls is None:
                continue
            if not isinstance(calls, list):
                return f"messages[{i}].tool_calls must be a list"
            for k, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    return f"messages[{i}].tool_calls[{k}] needs function.name"
                if not isinstance(fn.get("arguments"), str | dict):
                    return (f"messages[{i}].tool_calls[{k}].function.arguments must be a JSON "
                            "string or an object")
                if c.get("id") is not None:
                    call_ids.add(c["id"])
        elif content is None:
            return f"messages[{i}] ({role}) needs a string content"
        elif role == "tool" and m.get("tool_call_id") is not None \
                and m["tool_call_id"] not in call_ids:
            return (f"messages[{i}].tool_call_id {m['tool_call_id']!r} answers no earlier "
                    "tool call")
    if not has_assistant:
        return "no assistant message"
    return None


def _quality_filter(conv: Conversation) -> str | None:
    """Return the name of the quality filter that drops this conversation, or None."""
    names = {t["function"]["name"] for t in conv.tools}
    for m in conv.messages:
        if m["role"] != "assistant":
            continue
        calls = m.get("tool_calls") or []
        if not calls and not (m.get("content") or "").strip():
            return "empty_assistant"
        for c in calls:
            args = c["function"]["arguments"]
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return "invalid_tool_arguments"
            if not isinstance(args, dict):
                return "invalid_tool_arguments"
            if c["function"]["name"] not in names:
                return "unknown_tool"
    return None


def read_conversations(uri: str, skip_invalid: bool) -> tuple[list[Conversation], dict]:
    """Read and validate a JSONL file. Raises DataError (every bad line, with file:line) unless
    `skip_invalid`; returns the conversations kept and a report with counts per filter."""
    errors: list[str] = []
    convs: list[Conversation] = []
    seen: set[str] = set()
    filtered: Counter[str] = Counter()
    lines = 0
    file_hash = hashlib.sha256()  # over the file's bytes
    cap = max_line_bytes()
    with open_uri(uri, "rb") as f:
        for lineno, data in enumerate(capped_lines(f, cap, file_hash), start=1):
            if data is None:
                lines += 1
                errors.append(f"{uri}:{lineno}: line longer than {cap} bytes ({MAX_LINE_ENV})")
                continue
            if not data.strip():
                continue
            lines += 1
            try:
                obj = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                errors.append(f"{uri}:{lineno}: not UTF-8: {e.reason} at byte {e.start}")
                continue
            except json.JSONDecodeError as e:
                errors.append(f"{uri}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
                continue
            problem = _validate(obj)
            if problem:
                errors.append(f"{uri}:{lineno}: {problem}")
                continue
            digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
            if digest in seen:
                filtered["duplicate"] += 1
                continue
            seen.add(digest)
            conv = Conversation(
                messages=obj["messages"],
                tools=obj.get("tools") or [],
                category=obj.get("category") or DEFAULT_CATEGORY,
                line=lineno,
            )
            reason = _quality_filter(conv)
            if reason:
                filtered[reason] += 1
                continue
            convs.append(conv)
    if errors and not skip_invalid:
        shown = "\n".join(errors[:20])
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} invalid line(s) in {uri}:\n{shown}{more}")
    report = {
        "uri": uri,
        "digest": "sha256:" + file_hash.hexdigest(),
        "lines": lines,
        "invalid": len(errors),
        "skippedInvalid": len(errors) if skip_invalid else 0,
        "errors": errors,
        "filtered": {k: filtered.get(k, 0) for k in FILTERS},
    }
    return convs, report


# ----------------------------------------------------------------------------- rendering


def tokenize_conversation(fmt: ChatFormat, messages: list[dict],
                          tools: list[dict]) -> list[tuple[list[int], list[int]]]:
    """One conversation -> its documents as (input_ids, loss mask); see `chat` for what the
    mask covers. Raises ChatError when the template cannot render it."""
    return [fmt.tokenize(doc) for doc in fmt.render(messages, tools)]


@dataclass
class Example:
    input_ids: list[int]
    mask: list[int]
    category: str
    line: int = 0

    def labels(self) -> list[int]:
        """Next-token targets inside this document (IGNORE_INDEX where not assistant)."""
        ids, m = self.input_ids, self.mask
        return [ids[t + 1] if m[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [
            IGNORE_INDEX
        ]


@dataclass
class Split:
    examples: list[Example]  # documents (a conversation gives one or more)
    conversations: list[Conversation]
    report: dict = field(default_factory=dict)


def load_split(uri: str, tokenizer, max_seq_length: int, skip_invalid: bool,
               rank: int = 0, world: int = 1, gather=None) -> Split:
    """Read, validate, filter and tokenize one JSONL file (`tokenizer`: a tokenizer or its
    ChatFormat). A conversation the chat template cannot render (Mistral's role alternation,
    Llama's one call per turn, ...) is an invalid line, reported as `file:line: what`.

    With `world > 1` each rank renders and tokenizes every world-th conversation and
    `gather` (an all-gather of Python objects) puts the pieces together, in file order.
    """
    fmt = tokenizer if isinstance(tokenizer, ChatFormat) else ChatFormat(tokenizer)
    convs, report = read_conversations(uri, skip_invalid=True)
    mine: dict[int, Any] = {}
    for i in range(rank, len(convs), world):
        try:
            docs = tokenize_conversation(fmt, convs[i].messages, convs[i].tools)
            mine[i] = [(array("i", ids), bytes(mask)) for ids, mask in docs]
        except ChatError as e:
            mine[i] = str(e)
    tokenized: dict[int, Any] = {}
    for part in (gather(mine) if world > 1 else [mine]):
        tokenized.update(part)
    errors = report["errors"]
    examples, kept, no_loss = [], [], []
    cats: Counter[str] = Counter()
    cat_tokens: Counter[str] = Counter()
    cat_loss: Counter[str] = Counter()
    tokens = loss_tokens = 0
    for i, conv in enumerate(convs):
        docs = tokenized[i]
        if isinstance(docs, str):
            errors.append(f"{uri}:{conv.line}: {docs}")
            continue
        docs = [(list(ids), list(mask)) for ids, mask in docs]
        if any(len(ids) > max_seq_length for ids, _ in docs):
            report["filtered"]["too_long"] += 1
            continue
        n_loss = sum(sum(mask[1:]) for _, mask in docs)
        if n_loss == 0:
            report["filtered"]["no_loss_tokens"] += 1
            no_loss.append(f"{uri}:{conv.line}")
            continue
        examples += [Example(ids, mask, conv.category, conv.line) for ids, mask in docs]
        kept.append(conv)
        n = sum(len(ids) for ids, _ in docs)
        cats[conv.category] += 1
        cat_tokens[conv.category] += n
        cat_loss[conv.category] += n_loss
        tokens += n
        loss_tokens += n_loss
    report["invalid"] = len(errors)
    report["skippedInvalid"] = len(errors) if skip_invalid else 0
    if errors and not skip_invalid:
        shown = "\n".join(errors[:20])
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} invalid line(s) in {uri}:\n{shown}{more}")
    report["errors"] = errors[:20]
    report.update(
        examples=len(kept),
        documents=len(examples),
        categories=dict(sorted(cats.items())),
        tokens=tokens,
        lossTokens=loss_tokens,
        lossShare={c: round(cat_loss[c] / cat_tokens[c], 4) for c in sorted(cats)},
        noLoss=no_loss[:20],
    )
    return Split(examples, kept, report)


# ----------------------------------------------------------------------------- packing


@dataclass
class Pack:
    docs: list[Example]

    def __len__(self) -> int:
        return sum(len(d.input_ids) for d in self.docs)


def pack(examples: list[Example], max_seq_length: int, seed: int) -> list[Pack]:
    """Shuffle (seeded) and pack examples first-fit into sequences of at most max_seq_length."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packs: list[Pack] = []
    room: list[int] = []
    for i in order:
        ex = examples[i]
        n = len(ex.input_ids)
        for j, r in enumerate(room):
            if n <= r:
                packs[j].docs.append(ex)
                room[j] -= n
                break
        else:
            packs.append(Pack([ex]))
            room.append(max_seq_length - n)
    return packs


def collate(packs: list[Pack], pad_id: int, pad_to_multiple: int = 8) -> dict:
    """Micro-batch of packs -> lists for input_ids / labels / position_ids (+ token counts).

    Position ids restart at 0 for every document and for the padding tail, which is what makes
    the model's mask block-diagonal. Returned as Python lists; the trainer makes tensors.
    """
    length = max(max((len(p) for p in packs), default=1), 1)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    ids, labels, pos = [], [], []
    real = 0
    for p in packs:
        row_ids, row_labels, row_pos = [], [], []
        for d in p.docs:
            row_ids += d.input_ids
            row_labels += d.labels()
            row_pos += list(range(len(d.input_ids)))
        real += len(row_ids)
        pad = length - len(row_ids)
        row_ids += [pad_id] * pad
        row_labels += [IGNORE_INDEX] * pad
        row_pos += list(range(pad))
        ids.append(row_ids)
        labels.append(row_labels)
        pos.append(row_pos)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "tokens": real}


# ----------------------------------------------------------------------------- step plan


@dataclass
class StepPlan:
    """How many optimizer steps a run takes: the one computation shared by preflight (the
    operator prices runs from it) and training."""

    grad_accum: int
    global_batch: int  # globalBatchSize rounded up to a multiple of micro-batch x world size
    steps_per_epoch: int
    total_steps: int


def plan_steps(n_packs: int, hp, world_size: int, max_steps: int | None = None) -> StepPlan:
    per_step = hp.microBatchSize * world_size
    accum = max(1, math.ceil(hp.globalBatchSize / per_step))
    global_batch = accum * per_step
    per_epoch = max(1, math.ceil(n_packs / global_batch))
    total = hp.epochs * per_epoch if n_packs else 0
    if max_steps:
        total = min(total, max_steps)
    return StepPlan(accum, global_batch, per_epoch, total)
