"""Chat templates of any model family: what the loss covers, and what tool calls look like.

What the loss covers. For every assistant turn the loss covers exactly the text the model must
generate for that turn at inference time, and nothing else. At inference the server renders
the history with `add_generation_prompt=True` and the model continues from there; so the
turn's target is `render(history + [turn])` minus `render(history, add_generation_prompt=True)`,
up to and including the turn's last special token (its end-of-turn token: `<|im_end|>`,
`<|eot_id|>`, `</s>`, `<|call|>`, `<|return|>`, ...). That includes what the template adds to
a turn only while it is the last message (Qwen3's empty `<think>\\n\\n</think>\\n\\n`,
harmony's `<|return|>`) and excludes the system prompt, tools, user text and tool results.

Why per-turn rendering and not `{% generation %}` tags: no family's real template has those
tags, and several render a turn differently once later messages follow it (Qwen3 drops earlier
reasoning blocks, Mistral moves tools and the system prompt to the last user message, harmony
ends the last answer with `<|return|>` but earlier ones with `<|end|>`). One rendering of the
whole conversation therefore trains on text the model never produces. Per-turn rendering is
right for every template; to keep it cheap, consecutive turns share one document as long as
the next turn's prompt extends the document so far (then the document is exactly what inference
sees at each turn). Only where the template rewrites the history is a new document started; it
repeats the shared prefix (system prompt, tools) as context. Documents are packed like any
other example, so the cost is those repeated prefixes, not padding.

Tool calls: the data is OpenAI-style (`tool_calls` with ids, arguments as a JSON string or
object, `content: null`); `normalize` turns it into what HF templates expect and, where a
template only accepts Mistral's 9-character alphanumeric ids, maps every id to one consistently
within the conversation. The family's tool-call output format is detected by rendering a probe
conversation through the template (not from model names), and `parse_tool_calls` reads model
output in that format; a tokenizer that ships a transformers `response_template` is parsed by
`tokenizer.parse_response` instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class ChatError(ValueError):
    """A conversation the chat template cannot render (the caller adds `file:line`)."""


@dataclass
class Segment:
    text: str
    loss: bool


@dataclass
class Document:
    """One training sequence: context and loss segments, in order."""

    segments: list[Segment] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


# ----------------------------------------------------------------------------- normalisation


def short_id(salt: str, original: str) -> str:
    """A 9-character alphanumeric id, the same for the same (conversation, original id)."""
    n = int.from_bytes(hashlib.sha256(f"{salt}\0{original}".encode()).digest()[:8], "big")
    out = ""
    for _ in range(9):
        n, r = divmod(n, len(ALNUM))
        out += ALNUM[r]
    return out


def _arguments(a: Any) -> Any:
    return json.loads(a) if isinstance(a, str) else a


def normalize(messages: list[dict], short_ids: bool = False) -> list[dict]:
    """OpenAI-style messages -> the shape HF chat templates expect.

    Tool-call arguments become objects, `content: null` becomes "", empty `tool_calls` are
    dropped (templates test `'tool_calls' in message`), tool replies get the called function's
    `name` when missing (harmony needs it), reasoning is offered under every key templates read
    (`reasoning_content` for Qwen3, `thinking` for gpt-oss). With `short_ids`, every call id
    and `tool_call_id` is mapped to a 9-character alphanumeric id, consistently per conversation.
    """
    salt = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    names: dict[str, str] = {}
    last_name = None
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        reasoning = next((m[k] for k in REASONING_KEYS if isinstance(m.get(k), str)), None)
        for k in REASONING_KEYS:
            m.pop(k, None)
        if reasoning:
            m["reasoning_content"] = m["thinking"] = reasoning
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c["function"]
                call = {"type": "function", "function": {
                    "name": fn["name"], "arguments": _arguments(fn["arguments"])}}
                if c.get("id") is not None:
                    call["id"] = short_id(salt, c["id"]) if short_ids else c["id"]
                    names[c["id"]] = fn["name"]
                last_name = fn["name"]
                calls.append(call)
            m["tool_calls"] = calls
        else:
            m.pop("tool_calls", None)
        if m["role"] == "tool":
            tid = m.get("tool_call_id")
            if "name" not in m and (tid in names or last_name):
                m["name"] = names.get(tid, last_name)
            if tid is not None and short_ids:
                m["tool_call_id"] = short_id(salt, tid)
        out.append(m)
    return out


# ----------------------------------------------------------------------------- the format


PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_tool", "description": "Probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]


def _probe(call_id: str) -> list[dict]:
    return [
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "probe_tool", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "ok"},
        {"role": "assistant", "content": "pong"},
    ]


def detect_tool_format(turn: str) -> str | None:
    """The family's tool-call syntax, from how the template renders a probe call."""
    if "<tool_call>" in turn:
        return "hermes"  # Qwen2.5, Qwen3: <tool_call>{"name", "arguments"}</tool_call>
    if "[TOOL_CALLS]" in turn:
        return "mistral"  # [TOOL_CALLS][{"name", "arguments", "id"}] or [TOOL_CALLS]name[ARGS]{}
    if "to=functions." in turn:
        return "harmony"  # gpt-oss: to=functions.NAME<|channel|>...<|message|>{}<|call|>
    if '"parameters"' in turn:
        return "llama-json"  # Llama 3.x: bare {"name", "parameters"}
    return None


class ChatFormat:
    """A tokenizer's chat template, probed once: id style, end-of-turn tokens, tool format."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
            | set(tokenizer.all_special_tokens), key=len, reverse=True)
        self.short_ids = False
        self.tool_format: str | None = None
        self.stop_tokens: list[str] = [tokenizer.eos_token] if tokenizer.eos_token else []
        docs = None
        for short in (False, True):  # OpenAI-style ids first; Mistral accepts only 9 alnum
            self.short_ids = short
            try:
                docs = self.render(_probe("a1B2c3D4e" if short else "call_probe_0"),
                                   PROBE_TOOLS)
                break
            except ChatError:
                continue
        if docs is None:  # a template without tools: probe a plain exchange
            self.short_ids = False
            docs = self.render([{"role": "user", "content": "ping"},
                                {"role": "assistant", "content": "pong"}], [])
        turns = [s.text for d in docs for s in d.segments if s.loss]
        for t in turns:
            end = self._end_token(t)
            if end and end not in self.stop_tokens:
                self.stop_tokens.append(end)
        if len(turns) == 2:
            self.tool_format = detect_tool_format(turns[0])

    # ---- rendering

    def apply(self, messages: list[dict], tools: list[dict], **kw) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, **kw)
        except Exception as e:  # jinja's raise_exception, or a template tripping on the data
            raise ChatError(f"chat template: {type(e).__name__}: {e}") from None

    def _end_token(self, turn: str) -> str | None:
        stripped = turn.rstrip()
        return next((s for s in self.specials if stripped.endswith(s)), None)

    def _turn(self, history: list[dict], turn: dict, tools: list[dict]) -> tuple[str, str]:
        """(prompt at inference, the turn's generated text including what follows its end)."""
        prompt = self.apply(history, tools, add_generation_prompt=True)
        full = self.apply(history + [turn], tools)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        # Templates without a generation prompt that rewrite the last user message once an
        # answer follows (Mistral puts the system prompt there only while it is last): the turn
        # is what `full` adds beyond the same history closed by an empty assistant message.
        empty = self.apply(history + [{"role": "assistant", "content": ""}], tools)
        n = 0
        while n < min(len(full), len(empty)) and full[n] == empty[n]:
            n += 1
        for s in self.specials:  # never start inside a special token
            i = full.find(s, max(0, n - len(s) + 1))
            if 0 <= i < n:
                n = i
                break
        return prompt, full[n:]

    def render(self, messages: list[dict], tools: list[dict]) -> list[Document]:
        """Per-turn rendering (see the module docstring): documents of context and loss text."""
        msgs = normalize(messages, self.short_ids)
        docs: list[Document] = []
        doc, text = Document(), ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt, turn = self._turn(msgs[:i], m, tools)
            if not prompt.startswith(text):  # the template rewrote the history: new document
                docs.append(doc)
                doc, text = Document(), ""
            end = self._end_token(turn)
            cut = turn.rstrip().rindex(end) + len(end) if end else len(turn)
            if prompt[len(text):]:
                doc.segments.append(Segment(prompt[len(text):], False))
            doc.segments.append(Segment(turn[:cut], True))
            if turn[cut:]:
                doc.segments.append(Segment(turn[cut:], False))
            text = prompt + turn
        docs.append(doc)
        return [d for d in docs if any(s.loss for s in d.segments)]

    def tokenize(self, doc: Document) -> tuple[list[int], list[int]]:
        """Token ids and loss mask, each segment tokenized on its own (as inference does at
        the prompt/generation boundary), so the mask is exact."""
        ids: list[int] = []
        mask: list[int] = []
        for s in doc.segments:
            part = self.tokenizer(s.text, add_special_tokens=False)["input_ids"]
            ids += part
            mask += [int(s.loss)] * len(part)
        return ids, mask

    # ---- tool-call output

    def parse_tool_calls(self, text: str, prompt: str, tools: list[dict]) -> list[dict] | None:
        """Tool calls in generated `text` as [{"name", "arguments"}]; None when unparseable.
        Uses the tokenizer's transformers `response_template` when it has one."""
        if getattr(self.tokenizer, "response_template", None):
            try:
                msg = self.tokenizer.parse_response(text, prefix=prompt, tools=tools or None)
            except Exception:
                return None
            return [{"name": c["function"]["name"], "arguments": _arguments(
                c["function"].get("arguments", {}))} for c in msg.get("tool_calls") or []]
        return parse_tool_calls(text, self.tool_format)


HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
HARMONY = re.compile(r"to=functions\.([^\s<]+).*?<\|message\|>(.*?)(?:<\|call\|>|$)", re.S)


def parse_tool_calls(text: str, fmt: str | None) -> list[dict] | None:
    """Parse tool calls in one of the known formats (see `detect_tool_format`)."""
    try:
        if fmt == "hermes":
            return [_call(json.loads(b)) for b in HERMES.findall(text)]
        if fmt == "harmony":
            return [{"name": n, "arguments": json.loads(a)} for n, a in HARMONY.findall(text)]
        if fmt == "mistral":
            calls = []
            for part in text.split("[TOOL_CALLS]")[1:]:
                part = part.strip()
                if part.startswith("["):
                    calls += [_call(c) for c in json.JSONDecoder().raw_decode(part)[0]]
                else:  # v11+: name[ARGS]{json}
                    name, _, rest = part.partition("[ARGS]")
                    args = json.JSONDecoder().raw_decode(rest)[0]
                    calls.append({"name": name.strip(), "arguments": args})
            return calls
        if fmt == "llama-json":
            body = text.strip()
            if not body.startswith("{"):
                return []
            calls, dec, pos = [], json.JSONDecoder(), 0
            while pos < len(body) and body[pos] == "{":
                obj, pos = dec.raw_decode(body, pos)
                calls.append(_call(obj))
                pos = len(body) - len(body[pos:].lstrip("; \n"))
            return calls
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def _call(obj: dict) -> dict:
    args = obj["arguments"] if "arguments" in obj else obj["parameters"]
    return {"name": obj["name"], "arguments": _arguments(args)}
