"""Toy assets for tests and CPU benchmarks, built locally (nothing is downloaded).

- a byte-level BPE tokenizer trained with `tokenizers` on synthetic tool-calling chats, wrapped
  as `PreTrainedTokenizerFast` with a Qwen-style, tools-capable chat template;
- a randomly initialised Qwen3 model with tiny dimensions;
- synthetic `chat-tools` JSONL with categories.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>"]

# Qwen-style template; {% generation %} marks what the loss covers (content, tool calls, end).
CHAT_TEMPLATE = (
    "{%- if tools or messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}"
    "{%- if tools %}"
    "{{- '\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall functions inside <tool_call></tool_call> tags.' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message.content }}"
    "{%- for tc in message.tool_calls or [] %}"
    "{%- if loop.first and message.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}"
    "{{- tc.function.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}"
    "{{- '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOOLS = {
    "edit-workflow": {"type": "function", "function": {
        "name": "update_workflow", "description": "Rename or edit a workflow.",
        "parameters": {"type": "object", "properties": {
            "workflow_id": {"type": "string"}, "name": {"type": "string"}}}}},
    "email": {"type": "function", "function": {
        "name": "send_email", "description": "Send an e-mail.",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string"}, "subject": {"type": "string"}}}}},
    "integration": {"type": "function", "function": {
        "name": "connect_app", "description": "Connect a third-party app.",
        "parameters": {"type": "object", "properties": {"app": {"type": "string"}}}}},
}
WORDS = ["alpha", "beta", "gamma", "delta", "sales", "report", "weekly", "ops", "lead", "crm"]
APPS = ["slack", "github", "jira", "notion", "hubspot"]


def conversation(rng: random.Random, category: str) -> dict:
    """One synthetic tool-calling conversation of the given category."""
    tools = list(TOOLS.values())
    if category == "edit-workflow":
        wid, name = f"W{rng.randint(1, 99)}", f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        ask, fn, args = f"Rename workflow {wid} to {name}.", "update_workflow", {
            "workflow_id": wid, "name": name}
        done = f"Workflow {wid} is now called {name}."
    elif category == "email":
        to, subj = f"{rng.choice(WORDS)}{rng.randint(1, 99)}@example.com", rng.choice(WORDS)
        ask, fn, args = f"Email {to} about {subj}.", "send_email", {"to": to, "subject": subj}
        done = f"Sent the {subj} e-mail to {to}."
    else:
        app = f"{rng.choice(APPS)}-{rng.randint(1, 99)}"
        ask, fn, args = f"Connect {app} please.", "connect_app", {"app": app}
        done = f"{app} is connected."
    return {
        "category": category,
        "tools": tools,
        "messages": [
            {"role": "system", "content": "You are a workflow assistant."},
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": fn, "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'},
            {"role": "assistant", "content": done},
        ],
    }


def write_dataset(path: str | Path, n: int, seed: int,
                  categories=("edit-workflow", "email", "integration")) -> Path:
    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps(conversation(rng, categories[i % len(categories)])) + "\n")
    return path


def build_tokenizer(vocab_size: int = 600):
    """Byte-level BPE trained on synthetic chats, with the tools-capable chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = []
    for i in range(300):
        c = conversation(rng, list(TOOLS)[i % 3])
        corpus.append(json.dumps(c))
        corpus += [m["content"] or "" for m in c["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(path: str | Path, vocab_size: int, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                    seed: int = 0, tokenizer=None) -> Path:
    """A randomly initialised tiny Qwen3 saved with save_pretrained (+ tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=4096, tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
