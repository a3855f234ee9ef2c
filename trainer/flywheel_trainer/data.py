"""`chat-tools` data: read and validate JSONL, filter, render through the chat template, pack.

Every line is one conversation: `{"messages": [...], "tools": [...], "category": "..."}` with
OpenAI-style messages (assistant `tool_calls`, `tool` replies). The loss covers assistant tokens
only (tool calls included). Examples are packed into sequences whose position ids restart at 0
for every document; with `attention_mask=None` Hugging Face models turn those resets into a
document-isolated (block-diagonal causal) mask, so tokens never attend across documents.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .storage import open_uri

IGNORE_INDEX = -100
DEFAULT_CATEGORY = "uncategorized"
ROLES = {"system", "user", "assistant", "tool"}
FILTERS = ("invalid_tool_arguments", "unknown_tool", "empty_assistant", "duplicate", "too_long",
           "no_loss_tokens")


class DataError(ValueError):
    """Malformed input lines; the message lists `file:line: what is wrong` for each."""


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
                    return f"messages[{i}].tool_calls[{k}].function.arguments must be a string"
        elif content is None:
            return f"messages[{i}] ({role}) needs a string content"
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
    file_hash = hashlib.sha256()
    with open_uri(uri, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            file_hash.update(data)  # the digest is over the file's bytes
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
        "errors": errors[:20],
        "filtered": {k: filtered.get(k, 0) for k in FILTERS},
    }
    return convs, report


# ----------------------------------------------------------------------------- rendering


def _hf_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the shape HF chat templates expect (tool-call arguments as dicts)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
                calls.append({"type": "function", "function": fn})
            m["tool_calls"] = calls
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def _render(tokenizer, messages, tools, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **kw)


def has_generation_tags(tokenizer) -> bool:
    tpl = tokenizer.chat_template or ""
    return "generation" in tpl and "endgeneration" in tpl


def tokenize_conversation(tokenizer, messages: list[dict], tools: list[dict],
                          use_generation_tags: bool | None = None) -> tuple[list[int], list[int]]:
    """Render one conversation through the tokenizer's chat template, with tools.

    Returns (input_ids, assistant_mask). When the template marks assistant output with
    `{% generation %}` the library computes the mask; otherwise each assistant turn's span is
    found by rendering the conversation prefix with and without that turn.
    """
    messages = _hf_messages(messages)
    if use_generation_tags is None:
        use_generation_tags = has_generation_tags(tokenizer)
    if use_generation_tags:
        enc = tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return list(enc["input_ids"]), [int(x) for x in enc["assistant_masks"]]
    text = _render(tokenizer, messages, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], tools)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ValueError("chat template is not prefix-stable; add {% generation %} tags")
        start, end = len(before), len(upto)
        eos = tokenizer.eos_token
        if eos and eos in text[start:end]:  # the turn ends at its end-of-turn token
            end = text.rindex(eos, start, end) + len(eos)
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


@dataclass
class Example:
    input_ids: list[int]
    mask: list[int]
    category: str

    def labels(self) -> list[int]:
        """Next-token targets inside this document (IGNORE_INDEX where not assistant)."""
        ids, m = self.input_ids, self.mask
        return [ids[t + 1] if m[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [
            IGNORE_INDEX
        ]


@dataclass
class Split:
    examples: list[Example]
    conversations: list[Conversation]
    report: dict = field(default_factory=dict)


def load_split(uri: str, tokenizer, max_seq_length: int, skip_invalid: bool,
               rank: int = 0, world: int = 1, gather=None) -> Split:
    """Read, validate, filter and tokenize one JSONL file.

    With `world > 1` each rank renders and tokenizes every world-th conversation and
    `gather` (an all-gather of Python objects) puts the pieces together, in file order.
    """
    convs, report = read_conversations(uri, skip_invalid)
    mine = {}
    for i in range(rank, len(convs), world):
        ids, mask = tokenize_conversation(tokenizer, convs[i].messages, convs[i].tools)
        mine[i] = (array("i", ids), bytes(mask))
    tokenized: dict[int, tuple] = {}
    for part in (gather(mine) if world > 1 else [mine]):
        tokenized.update(part)
    examples, kept = [], []
    cats: Counter[str] = Counter()
    tokens = loss_tokens = 0
    for i, conv in enumerate(convs):
        ids, mask = list(tokenized[i][0]), list(tokenized[i][1])
        if len(ids) > max_seq_length:
            report["filtered"]["too_long"] += 1
            continue
        if sum(mask[1:]) == 0:
            report["filtered"]["no_loss_tokens"] += 1
            continue
        examples.append(Example(ids, mask, conv.category))
        kept.append(conv)
        cats[conv.category] += 1
        tokens += len(ids)
        loss_tokens += sum(mask[1:])
    report.update(
        examples=len(examples),
        categories=dict(sorted(cats.items())),
        tokens=tokens,
        lossTokens=loss_tokens,
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
