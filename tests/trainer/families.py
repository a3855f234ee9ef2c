"""Model-family fixtures: chat templates written for these tests that reproduce how each
family's real template behaves (not copies of them), tokenizers and tiny models built locally.

- qwen3: tools in the system turn, `<tool_call>` JSON, tool results as `<tool_response>` in a
  user turn, an empty `<think>` block on an assistant turn after the last user query only while
  it is the last message (earlier turns' reasoning dropped once a new query follows).
- qwen2.5: the same Hermes-style calls, no think blocks, a default system prompt.
- llama3: tools in the first user message, bare JSON calls with "parameters", one call per
  turn, results as role `ipython` (string content JSON-quoted), `<|eot_id|>` / `<|eom_id|>`.
- mistral: tools just before the last user message, the system prompt with the last user
  message only while it is last, `[TOOL_CALLS]` JSON, ids of exactly 9 alphanumerics, strict
  user/assistant alternation, no generation prompt.
- gpt-oss: harmony (channels, `to=functions.NAME`, `<|call|>`, `<|return|>` for the last
  answer and `<|end|>` otherwise, analysis kept only on the last turn or beside tool calls).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nCall a function as <tool_call>\\n{\"name\": <name>, \"arguments\": "
    "<args>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + m.content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + m.content }}{%- endif %}"
    "{%- for tc in m.tool_calls or [] %}"
    "{%- if not loop.first or m.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}"
    "{{- tc.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

QWEN25 = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call as <tool_call>\\n{\"name\": <name>, "
    "\"arguments\": <args>}\\n</tool_call>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for tc in m.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}"
    "{{- tc.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 01 Jan 2025\\n\\n' }}"
    "{{- system + '<|eot_id|>' }}"
    "{%- if tools %}"
    "{%- if messages[0].role != 'user' %}"
    "{{- raise_exception('Cannot put tools in the first user message without one!') }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, "
    "respond with a JSON for a function call.\\n\\nRespond in the format {\"name\": function "
    "name, \"parameters\": dictionary of argument name and its value}.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- messages[0].content | trim + '<|eot_id|>' }}"
    "{%- set messages = messages[1:] %}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if 'tool_calls' in m %}"
    "{%- if m.tool_calls | length != 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}"
    "{%- endif %}"
    "{%- set call = m.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + call.name + '\", \"parameters\": ' + (call.arguments | tojson) + '}' }}"
    "{%- if builtin_tools is defined %}{{- '<|eom_id|>' }}{%- else %}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- elif m.role == 'tool' or m.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if m.content is mapping or m.content is iterable %}{{- m.content | tojson }}"
    "{%- else %}{{- m.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

MISTRAL = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set users = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{%- set ns = namespace(index=0) %}"
    "{%- for m in loop_messages %}"
    "{%- if not (m.role == 'tool' or m.tool_calls is defined) %}"
    "{%- if (m.role == 'user') != (ns.index % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set ns.index = ns.index + 1 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for m in loop_messages %}"
    "{%- if m.role == 'user' %}"
    "{%- if tools and m == users[-1] %}"
    "{{- '[AVAILABLE_TOOLS][' }}"
    "{%- for t in tools %}{{- t | tojson }}{%- if not loop.last %}{{- ', ' }}{%- endif %}"
    "{%- endfor %}"
    "{{- '][/AVAILABLE_TOOLS]' }}"
    "{%- endif %}"
    "{%- if loop.last and system is defined %}"
    "{{- '[INST]' + system + '\\n\\n' + m.content + '[/INST]' }}"
    "{%- else %}{{- '[INST]' + m.content + '[/INST]' }}{%- endif %}"
    "{%- elif m.tool_calls is defined %}"
    "{{- '[TOOL_CALLS][' }}"
    "{%- for tc in m.tool_calls %}"
    "{%- if tc.id is not defined or tc.id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}"
    "{%- set out = tc.function | tojson %}"
    "{{- out[:-1] + ', \"id\": \"' + tc.id + '\"}' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- elif m.role == 'assistant' %}{{- m.content + eos_token }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if m.tool_call_id is not defined or m.tool_call_id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}"
    "{{- '[TOOL_RESULTS]{\"content\": ' + (m.content | tojson) + ', \"call_id\": \"'"
    " + m.tool_call_id + '\"}[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception('Only user, assistant and tool roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

GPT_OSS = (
    "{%- set ns = namespace(last_user=-1, call='') %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{{- '<|start|>system<|message|>You are a helpful model.\\nReasoning: medium\\n\\n"
    "# Valid channels: analysis, commentary, final.' }}"
    "{%- if tools %}{{- ' Calls to these tools must go to the commentary channel: "
    "\\'functions\\'.' }}{%- endif %}"
    "{{- '<|end|>' }}"
    "{%- if messages[0].role == 'system' or tools %}"
    "{{- '<|start|>developer<|message|>' }}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '# Instructions\\n\\n' + messages[0].content + '\\n\\n' }}{%- endif %}"
    "{%- if tools %}{{- '# Tools\\n\\n## functions\\n\\nnamespace functions {\\n\\n' }}"
    "{%- for t in tools %}{{- '// ' + t.function.description + '\\ntype ' + t.function.name"
    " + ' = (_: ' + (t.function.parameters | tojson) + ') => any;\\n\\n' }}{%- endfor %}"
    "{{- '} // namespace functions' }}{%- endif %}"
    "{{- '<|end|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'user' %}{{- '<|start|>user<|message|>' + m.content + '<|end|>' }}"
    "{%- elif m.role == 'assistant' and m.tool_calls is defined %}"
    "{%- if m.tool_calls | length > 1 %}"
    "{{- raise_exception('Harmony takes one tool call per assistant message') }}{%- endif %}"
    "{%- if m.thinking and loop.index0 > ns.last_user %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' }}"
    "{%- endif %}"
    "{%- set tc = m.tool_calls[0].function %}{%- set ns.call = tc.name %}"
    "{{- '<|start|>assistant to=functions.' + tc.name + '<|channel|>commentary "
    "<|constrain|>json<|message|>' + (tc.arguments | tojson) + '<|call|>' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if m.thinking and loop.last and not add_generation_prompt %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' }}"
    "{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + m.content }}"
    "{%- if loop.last and not add_generation_prompt %}{{- '<|return|>' }}"
    "{%- else %}{{- '<|end|>' }}{%- endif %}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|start|>functions.' + (m.name or ns.call) + ' to=assistant<|channel|>commentary"
    "<|message|>' + m.content + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

# family -> (template, special tokens, bos, eos, pad, model architecture)
FAMILIES = {
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                      "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
                      "</think>"], None, "<|im_end|>", "<|endoftext|>", "qwen3"),
    "qwen2.5": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                         "</tool_call>", "<tool_response>", "</tool_response>"],
                None, "<|im_end|>", "<|endoftext|>", "qwen2"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
                        "<|finetune_right_pad_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "llama"),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                          "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                          "[/TOOL_RESULTS]", "<pad>"], "<s>", "</s>", "<pad>", "mistral"),
    "gpt-oss": (GPT_OSS, ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>",
                          "<|message|>", "<|channel|>", "<|constrain|>", "<|call|>",
                          "<|return|>"], None, "<|return|>", "<|endoftext|>", "llama"),
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Perth", "Rome"]


def _call(cid: str, name: str, city: str, as_string: bool = True) -> dict:
    args = {"city": city}
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def tool_chat(rng: random.Random, parallel: bool = False, two_calls: bool = False,
              reasoning: bool = False) -> dict:
    """User -> tool call(s) (OpenAI-style ids) -> result(s) -> answer -> second question ->
    answer. `two_calls`: two calls in sequence; `parallel`: two calls in one turn."""
    a, b = rng.sample(CITIES, 2)
    n = rng.randint(100, 999)
    msgs = [{"role": "system", "content": "You answer travel questions."},
            {"role": "user", "content": f"Weather in {a}?"}]
    first = {"role": "assistant", "content": None,
             "tool_calls": [_call(f"call_{n}a", "get_weather", a)]}
    if reasoning:
        first["reasoning_content"] = f"The user wants {a}."
    if parallel:
        first["tool_calls"].append(_call(f"call_{n}b", "get_time", a, as_string=False))
    msgs.append(first)
    for c in first["tool_calls"]:
        msgs.append({"role": "tool", "tool_call_id": c["id"], "content": f'{{"ok": "{a}"}}'})
    if two_calls:
        msgs.append({"role": "assistant", "content": None,
                     "tool_calls": [_call(f"call_{n}c", "get_time", b)]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{n}c", "content": '"noon"'})
    msgs += [{"role": "assistant", "content": f"Sunny in {a}."},
             {"role": "user", "content": "Thanks!"},
             {"role": "assistant", "content": "You are welcome."}]
    return {"messages": msgs, "tools": TOOLS, "category": "parallel" if parallel else "single"}


def write_data(path: Path, n: int, seed: int, parallel: bool = True) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps(tool_chat(rng, parallel=parallel and i % 3 == 2,
                                         two_calls=i % 3 == 1, reasoning=i % 2 == 0)) + "\n")
    return path


def build_tokenizer(family: str):
    """A small byte-level BPE with the family's special tokens and fixture template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, bos, eos, pad, _ = FAMILIES[family]
    rng = random.Random(0)
    corpus = [json.dumps(tool_chat(rng, parallel=i % 2 == 0)) for i in range(60)]
    corpus += [json.dumps(TOOLS)] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=pad)
    fast.chat_template = template
    return fast


def build_model_dir(path: Path, family: str, tokenizer) -> Path:
    """A tiny randomly initialised model of the family's architecture (+ tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = FAMILIES[family][5]
    cfg = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=2048, tie_word_embeddings=arch != "llama",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
