"""Pack isolation on the real (tiny) model, checkpoint discovery, summary size, MFU formula."""

from __future__ import annotations

import json
import random

import torch
from flywheel_trainer.chat import ChatFormat
from flywheel_trainer.checkpoint import complete_steps
from flywheel_trainer.contract import fit as summary_json
from flywheel_trainer.data import Example, Pack, collate, tokenize_conversation
from flywheel_trainer.model import flops_per_token

from hack import sample as toylib


def _example(tok, seed, category):
    conv = toylib.conversation(random.Random(seed), category)
    [(ids, mask)] = tokenize_conversation(ChatFormat(tok), conv["messages"], conv["tools"])
    return Example(ids, mask, category)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=torch.tensor(batch["input_ids"]),
                     position_ids=torch.tensor(batch["position_ids"]),
                     use_cache=False).logits[0]


def test_pack_isolation(toy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy.model_dir, attn_implementation="sdpa")
    model.eval()
    tok = toy.tokenizer
    a = _example(tok, 1, "email")
    b = _example(tok, 2, "integration")
    c = _example(tok, 3, "edit-workflow")
    n = len(a.input_ids)
    alone = _logits(model, collate([Pack([a])], pad_id=0))[:n]
    # the same document packed between two others, and after a different one
    for docs in ([b, a, c], [c, a]):
        batch = collate([Pack(docs)], pad_id=0)
        start = len(docs[0].input_ids)
        packed = _logits(model, batch)[start:start + n]
        assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()
    # control: without position resets the same tokens do see the other document
    batch = collate([Pack([b, a, c])], pad_id=0)
    batch["position_ids"] = [list(range(len(batch["input_ids"][0])))]
    start = len(b.input_ids)
    leaky = _logits(model, batch)[start:start + n]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_only_steps_with_a_complete_marker_are_trusted(tmp_path):
    import json

    def step(n: int, marker: dict | None) -> None:
        d = tmp_path / f"step-{n}"
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"xx")
        (d / ".metadata").write_bytes(b"m")
        if marker is not None:
            (d / ".complete").write_text(json.dumps({"step": n, "files": marker}))

    full = {"__0_0.distcp": 2, ".metadata": 1}
    step(2, full)
    step(4, full)
    step(6, None)  # DCP finished but the marker was never written: torn
    step(8, {**full, "__1_0.distcp": 5})  # an object the marker lists is gone: torn
    step(10, full)
    step(12, {"__0_0.distcp": 3, ".metadata": 1})  # a shard of another size: torn
    (tmp_path / "not-a-step").mkdir()
    assert complete_steps(str(tmp_path)) == [2, 4, 10]
    assert complete_steps(f"file://{tmp_path}") == [2, 4, 10]
    assert complete_steps(str(tmp_path / "missing")) == []


def test_summary_is_capped_at_4k():
    metrics = {"train_loss": 1.0, "eval_loss": 2.0, "tool_call_accuracy": 0.5}
    for i in range(200):
        metrics[f"eval_loss/category-{i:03d}"] = 1.234567
        metrics[f"tool_call_accuracy/category-{i:03d}"] = 0.5
    text = summary_json({"artifact": {"uri": "s3://b/m", "digest": "sha256:" + "0" * 64,
                                      "format": "huggingface-safetensors"},
                         "metrics": metrics, "steps": 10, "tokens": 100,
                         "throughput": {"tokensPerSecond": 1.0, "mfu": None},
                         "tracking": {"url": None, "experimentKey": "k" * 32}})
    assert len(text.encode()) <= 4096
    parsed = json.loads(text)
    assert parsed["truncated"] is True
    assert {"train_loss", "eval_loss", "tool_call_accuracy"} <= set(parsed["metrics"])
    assert parsed["artifact"]["digest"].startswith("sha256:")


def test_flops_per_token_matches_torchtitan_formula(toy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy.model_dir)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    seq = 1024
    expected = 6 * (n - emb) + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.head_dim) * seq
    assert flops_per_token(model, seq) == expected
    assert n - emb > 0
