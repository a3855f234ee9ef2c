"""Data: validation errors with file:line, quality filters, loss masks, packing."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from flywheel_trainer.chat import ChatFormat, normalize
from flywheel_trainer.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    load_split,
    pack,
    read_conversations,
    tokenize_conversation,
)

from hack import sample as toylib


def _good(seed=0, category="email"):
    return toylib.conversation(random.Random(seed), category)


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    parts = _good(2)  # OpenAI text content parts are accepted and joined
    text = parts["messages"][1]["content"]
    parts["messages"][1]["content"] = [{"type": "text", "text": text[:5]},
                                       {"type": "text", "text": text[5:]}]
    lines = [
        json.dumps(_good(1)),
        '{"messages": [ not json',
        json.dumps({"tools": []}),
        "",  # blank lines are ignored but still counted for numbering
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps(parts),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_conversations(str(path), skip_invalid=False)
    msg = str(err.value)
    assert "4 invalid line(s)" in msg
    assert f"{path}:2: invalid JSON" in msg
    assert f"{path}:3: `messages` must be a non-empty list" in msg
    assert f"{path}:5: messages[0].role must be one of" in msg
    assert f"{path}:6: no assistant message" in msg
    assert f"{path}:1:" not in msg and f"{path}:7:" not in msg

    convs, report = read_conversations(str(path), skip_invalid=True)
    assert [c.line for c in convs] == [1, 7]
    assert convs[1].messages[1]["content"] == text
    assert report["digest"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["invalid"] == 4 and report["skippedInvalid"] == 4


def test_a_line_longer_than_the_cap_is_a_file_line_error(tmp_path, monkeypatch):
    """A huge line (or a file without newlines) is read past in blocks, never held whole."""
    import io

    from flywheel_trainer.data import capped_lines

    good, cap = json.dumps(_good(1)), 100_000
    monkeypatch.setenv("FLYWHEEL_MAX_LINE_BYTES", str(cap))
    path = tmp_path / "long.jsonl"
    huge = json.dumps({**_good(2), "padding": "x" * 3_000_000})
    path.write_text("\n".join([good, huge, json.dumps(_good(3))]) + "\n")
    with pytest.raises(DataError) as err:
        read_conversations(str(path), skip_invalid=False)
    assert f"{path}:2: line longer than {cap} bytes (FLYWHEEL_MAX_LINE_BYTES)" in str(err.value)
    convs, report = read_conversations(str(path), skip_invalid=True)
    assert [c.line for c in convs] == [1, 3] and report["invalid"] == 1
    assert report["digest"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    # Every split of the blocks gives the same lines.
    data = b"ab\n" + b"x" * 10 + b"\nabcd\n\n" + b"y" * 25 + b"\nlast"
    for block in (1, 2, 3, 7, 100):
        digest = hashlib.sha256()
        lines = list(capped_lines(io.BytesIO(data), 4, digest, block))
        assert lines == [b"ab\n", None, b"abcd\n", b"\n", None, b"last"], block
        assert digest.digest() == hashlib.sha256(data).digest()


def test_quality_filters_are_counted(tmp_path, toy):
    good = _good(3)
    bad_args = _good(4)
    bad_args["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{not json"
    unknown = _good(5)
    unknown["messages"][2]["tool_calls"][0]["function"]["name"] = "launch_rocket"
    empty = _good(6)
    empty["messages"][4]["content"] = "   "
    long = _good(7)
    long["messages"][1]["content"] = "word " * 2000
    rows = [good, bad_args, unknown, empty, long, good, _good(8, "integration")]
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = load_split(str(path), toy.tokenizer, max_seq_length=1024, skip_invalid=False)
    f = split.report["filtered"]
    assert f["invalid_tool_arguments"] == 1
    assert f["unknown_tool"] == 1
    assert f["empty_assistant"] == 1
    assert f["too_long"] == 1
    assert f["duplicate"] == 1
    assert split.report["examples"] == 2
    assert split.report["categories"] == {"email": 1, "integration": 1}


def test_loss_mask_covers_assistant_tokens_only(toy):
    tok = toy.tokenizer
    conv = _good(9, "edit-workflow")
    [(ids, mask)] = tokenize_conversation(ChatFormat(tok), conv["messages"], conv["tools"])
    assert len(ids) == len(mask)
    # the masked tokens, decoded, are exactly the two assistant turns (tool call included)
    # each closed by the end-of-turn token
    spans = _loss_spans(tok, ids, mask)
    call = conv["messages"][2]["tool_calls"][0]["function"]
    args = json.loads(call["arguments"])
    assert len(spans) == 2
    assert spans[0].startswith("<tool_call>") and spans[0].endswith("</tool_call><|im_end|>")
    parsed = json.loads(spans[0][len("<tool_call>"):-len("</tool_call><|im_end|>")])
    assert parsed == {"name": call["name"], "arguments": args}
    assert spans[1] == conv["messages"][4]["content"] + "<|im_end|>"
    # nothing from system, user or tool turns is in the loss
    unmasked = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m],
                          skip_special_tokens=False)
    for m in conv["messages"]:
        if m["role"] != "assistant":
            assert m["content"] in unmasked
    # the same text and loss spans as the library computes from {% generation %} tags
    enc = tok.apply_chat_template(normalize(conv["messages"]), tools=conv["tools"], tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert tok.decode(enc["input_ids"]) == tok.decode(ids)
    assert _loss_spans(tok, enc["input_ids"], enc["assistant_masks"]) == spans


def _loss_spans(tok, ids, mask) -> list[str]:
    """The decoded runs of tokens in the loss."""
    spans, cur = [], []
    for i, m in [*zip(ids, mask, strict=True), (None, 0)]:
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return spans


def test_labels_shift_inside_documents_and_packing():
    a = Example([1, 2, 3, 4], [0, 0, 1, 1], "x")
    b = Example([5, 6, 7], [0, 1, 1], "y")
    assert a.labels() == [IGNORE_INDEX, 3, 4, IGNORE_INDEX]
    packs = pack([a, b, Example([8] * 6, [0, 1, 1, 1, 1, 1], "z")], max_seq_length=8, seed=0)
    assert sorted(len(p) for p in packs) == [6, 7]
    assert all(len(p) <= 8 for p in packs)
    batch = collate([p for p in packs if len(p) == 7], pad_id=0)
    row_pos = batch["position_ids"][0]
    assert len(row_pos) == 8 and batch["tokens"] == 7
    # positions restart for each document and for the padding tail
    assert row_pos.count(0) == 3
    # no label ever points across a document boundary
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    for t, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            assert row_pos[t + 1] == row_pos[t] + 1 and lab == ids[t + 1]
