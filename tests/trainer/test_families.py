"""Model families: the exact text in the loss per turn for each family's template, OpenAI ids
through a Mistral-style template, template refusals as file:line, tool-call parsing per
format, generic decoder-block discovery, the memory plan, and --show-examples."""

from __future__ import annotations

import json
import re

import pytest
from flywheel_trainer.chat import ChatFormat, parse_tool_calls
from flywheel_trainer.data import DataError, load_split, tokenize_conversation

from tests.trainer import families as fam

THINK = "<think>\n\n</think>\n\n"


def conversation(parallel: bool = False) -> list[dict]:
    """Two user questions, each answered through a tool (OpenAI style: ids, arguments as a
    string and as an object, content null, reasoning on the first call)."""
    first = [{"id": "call_abc123", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    if parallel:
        first.append({"id": "call_xyz789", "type": "function",
                      "function": {"name": "get_time", "arguments": {"city": "Oslo"}}})
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "reasoning_content": "Oslo it is.",
         "tool_calls": first},
        *[{"role": "tool", "tool_call_id": c["id"], "content": '{"temp": 3}'} for c in first],
        {"role": "assistant", "content": "3 degrees in Oslo."},
        {"role": "user", "content": "And the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_def456", "type": "function",
             "function": {"name": "get_time", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "call_def456", "content": "noon"},
        {"role": "assistant", "content": "It is noon."},
    ]


@pytest.fixture(scope="module")
def formats():
    return {name: ChatFormat(fam.build_tokenizer(name)) for name in fam.FAMILIES}


def loss_text(fmt: ChatFormat, messages: list[dict]) -> list[list[str]]:
    """Per document, the decoded runs of tokens in the loss."""
    out = []
    for ids, mask in tokenize_conversation(fmt, messages, fam.TOOLS):
        spans, cur = [], []
        for i, m in [*zip(ids, mask, strict=True), (None, 0)]:
            if m:
                cur.append(i)
            elif cur:
                spans.append(fmt.tokenizer.decode(cur, skip_special_tokens=False))
                cur = []
        out.append(spans)
    return out


def hermes(name: str, args: str = '{"city": "Oslo"}') -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def test_qwen3_trains_on_what_inference_generates(formats):
    # each turn after the last query carries the (empty) think block it is generated with;
    # once a new query follows, the template drops it, so the next turn starts a new document
    assert loss_text(formats["qwen3"], conversation()) == [
        ["<think>\nOslo it is.\n</think>\n\n" + hermes("get_weather") + "<|im_end|>",
         THINK + "3 degrees in Oslo.<|im_end|>"],
        [THINK + hermes("get_time") + "<|im_end|>"],
        [THINK + "It is noon.<|im_end|>"],
    ]
    # parallel calls: one turn, two tool_call blocks (arguments given as string and object)
    docs = loss_text(formats["qwen3"], conversation(parallel=True))
    assert docs[0][0] == ("<think>\nOslo it is.\n</think>\n\n" + hermes("get_weather") + "\n"
                          + hermes("get_time") + "<|im_end|>")


def test_qwen25_one_document_hermes_calls(formats):
    assert loss_text(formats["qwen2.5"], conversation(parallel=True)) == [[
        hermes("get_weather") + "\n" + hermes("get_time") + "<|im_end|>",
        "3 degrees in Oslo.<|im_end|>",
        hermes("get_time") + "<|im_end|>",
        "It is noon.<|im_end|>",
    ]]


def test_llama3_bare_json_with_parameters(formats):
    assert loss_text(formats["llama3"], conversation()) == [[
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
        "3 degrees in Oslo.<|eot_id|>",
        '{"name": "get_time", "parameters": {"city": "Oslo"}}<|eot_id|>',
        "It is noon.<|eot_id|>",
    ]]


def test_mistral_maps_openai_ids_consistently(formats):
    fmt = formats["mistral"]
    assert fmt.short_ids and fmt.stop_tokens == ["</s>"]
    docs = loss_text(fmt, conversation(parallel=True))
    # the template moves tools and the system prompt to the last user message, so every turn
    # is trained in the context inference gives it: one document each
    call = r'\{"name": "%s", "arguments": \{"city": "Oslo"\}, "id": "([A-Za-z0-9]{9})"\}'
    first = re.fullmatch(r"\[TOOL_CALLS\]\[" + call % "get_weather" + ", " + call % "get_time"
                         + r"\]</s>", docs[0][0])
    assert first, docs[0]
    assert docs[1:] == [["3 degrees in Oslo.</s>"], [docs[2][0]], ["It is noon.</s>"]]
    second = re.fullmatch(r"\[TOOL_CALLS\]\[" + call % "get_time" + r"\]</s>", docs[2][0])
    ids = [first.group(1), first.group(2), second.group(1)]
    assert len(set(ids)) == 3
    # each tool result answers its call under the same mapped id
    text = "".join(fmt.tokenizer.decode(i) for i, _ in
                   tokenize_conversation(fmt, conversation(parallel=True), fam.TOOLS))
    for i in ids:
        assert f'"call_id": "{i}"' in text
    assert "call_abc123" not in text
    # the system prompt goes with the last user message, never into the loss
    assert not any("Be brief." in s for d in docs for s in d)


def test_gpt_oss_harmony_channels_and_endings(formats):
    call = "<|channel|>commentary <|constrain|>json<|message|>{\"city\": \"Oslo\"}<|call|>"
    assert loss_text(formats["gpt-oss"], conversation()) == [
        ["<|channel|>analysis<|message|>Oslo it is.<|end|><|start|>assistant"
         " to=functions.get_weather" + call,
         "<|channel|>final<|message|>3 degrees in Oslo.<|return|>"],
        [" to=functions.get_time" + call, "<|channel|>final<|message|>It is noon.<|return|>"],
    ]
    assert formats["gpt-oss"].stop_tokens == ["<|return|>", "<|call|>"]


def test_template_refusals_are_invalid_lines(formats, tmp_path):
    double_user = conversation()
    double_user.insert(2, {"role": "user", "content": "Please."})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "tools": fam.TOOLS}) + "\n"
                            for m in (conversation(), double_user, conversation(True))))
    with pytest.raises(DataError) as err:
        load_split(str(path), formats["mistral"], 4096, skip_invalid=False)
    assert str(err.value) == (
        f"1 invalid line(s) in {path}:\n{path}:2: chat template: TemplateError: After the "
        "optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...")
    # a tool reply must answer an earlier call (read_conversations validates OpenAI ids)
    orphan = conversation()
    orphan[3]["tool_call_id"] = "call_nope"
    bad = tmp_path / "orphan.jsonl"
    bad.write_text(json.dumps({"messages": orphan, "tools": fam.TOOLS}) + "\n")
    with pytest.raises(DataError, match=re.escape(
            f"{bad}:1: messages[3].tool_call_id 'call_nope' answers no earlier tool call")):
        load_split(str(bad), formats["qwen3"], 4096, skip_invalid=False)
    split = load_split(str(path), formats["llama3"], 4096, skip_invalid=True)
    assert split.report["errors"] == [
        f"{path}:3: chat template: TemplateError: This model only supports single tool-calls "
        "at once!"]
    assert split.report["examples"] == 2 and split.report["invalid"] == 1


def test_tool_call_formats_are_detected_and_parsed(formats):
    assert {n: f.tool_format for n, f in formats.items()} == {
        "qwen3": "hermes", "qwen2.5": "hermes", "llama3": "llama-json", "mistral": "mistral",
        "gpt-oss": "harmony"}
    want = [{"name": "get_weather", "arguments": {"city": "Oslo"}},
            {"name": "get_time", "arguments": {"city": "Rome"}}]
    outputs = {
        "hermes": "<think>\n\n</think>\n\n" + hermes("get_weather") + "\n"
                  + hermes("get_time", '{"city": "Rome"}') + "<|im_end|>",
        "llama-json": '{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                      '{"name": "get_time", "parameters": {"city": "Rome"}}<|eot_id|>',
        "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}, '
                   '"id": "a1b2c3d4e"}, {"name": "get_time", "arguments": {"city": "Rome"}, '
                   '"id": "f5g6h7i8j"}]</s>',
        "harmony": '<|channel|>analysis<|message|>Both.<|end|><|start|>assistant to=functions.'
                   'get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Oslo"}'
                   '<|call|><|start|>assistant to=functions.get_time<|channel|>commentary json'
                   '<|message|>{"city": "Rome"}<|call|>',
    }
    for fmt, text in outputs.items():
        assert parse_tool_calls(text, fmt) == want, fmt
    # Mistral's newer syntax, an answer without calls, and broken JSON
    assert parse_tool_calls('[TOOL_CALLS]get_time[ARGS]{"city": "Rome"}</s>',
                            "mistral") == want[1:]
    assert parse_tool_calls("It is sunny.<|im_end|>", "hermes") == []
    assert parse_tool_calls("<tool_call>{oops</tool_call>", "hermes") is None
    assert parse_tool_calls("CALL get_time(Rome)", None) is None


def test_unknown_tool_format_gives_null_accuracy_with_a_warning():
    from flywheel_trainer.data import Conversation
    from flywheel_trainer.evaluate import tool_call_accuracy

    tok = fam.build_tokenizer("qwen2.5")
    tok.chat_template = (  # tool calls as CALL name(args): no known format
        "{%- for m in messages %}{{- m.role + ': ' + m.content }}"
        "{%- for tc in m.tool_calls or [] %}{{- 'CALL ' + tc.function.name + '(' +"
        " (tc.function.arguments | tojson) + ')' }}{%- endfor %}{{- '<|im_end|>' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    fmt = ChatFormat(tok)
    assert fmt.tool_format is None
    conv = Conversation(conversation(), fam.TOOLS, "x", 1)
    acc, per_cat, warning = tool_call_accuracy(None, fmt, [conv], None, 8)
    assert acc is None and per_cat == {} and "tool-call format" in warning


def test_tokenizer_response_template_is_preferred(formats):
    fmt = ChatFormat(fam.build_tokenizer("qwen2.5"))
    fmt.tool_format = None  # only the response template can parse now
    fmt.tokenizer.response_template = {
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {"content": {"content": "text"},
                   "tool_calls": {"open": "<tool_call>", "close": "</tool_call>",
                                  "content": "json", "repeats": True,
                                  "transform": {"type": "function", "function": "{content}"}}}}
    got = fmt.parse_tool_calls(hermes("get_weather") + "<|im_end|>",
                               "<|im_start|>assistant\n", fam.TOOLS)
    assert got == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "mistral"])
def test_decoder_blocks_found_without_class_names(arch):
    import torch
    from flywheel_trainer.model import decoder_layers
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, vocab_size=64, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=3, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    blocks = decoder_layers(model)
    assert blocks is model.model.layers and len(blocks) == 3
    blocks[0] = checkpoint_wrapper(blocks[0])  # still found once wrapped
    assert decoder_layers(model) is model.model.layers


def qwen3_32b():
    """Qwen3-32B's published dimensions (no download)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                       num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=False, max_position_embeddings=40960)


def test_memory_plan_refuses_one_gpu_and_accepts_the_flagship_shape():
    from flywheel_trainer.memory import plan

    cfg = qwen3_32b()
    one, problem = plan(cfg, 8192, 1, "selective", 1, 141)
    assert one["params"] == pytest.approx(32.8e9, rel=0.01)
    total = one["perGpuGB"]["total"]
    assert total > 141 and one["perGpuGB"]["shardedState"] == pytest.approx(524, rel=0.01)
    assert problem.startswith(f"memory: the estimate is {total} GB per GPU")
    assert "the device has 141 GB" in problem
    flagship, problem = plan(cfg, 8192, 1, "selective", 32, 141)  # 4 nodes x 8 H200
    assert problem is None and flagship["perGpuGB"]["total"] < 141
    # without activation checkpointing the same run does not fit; full checkpointing fits more
    assert plan(cfg, 8192, 1, "none", 32, 141)[1] is not None
    assert plan(cfg, 8192, 1, "full", 32, 141)[0]["perGpuGB"]["total"] < flagship[
        "perGpuGB"]["total"]
    # unchecked without a device size
    assert plan(cfg, 8192, 1, "selective", 1, None)[1] is None


def test_show_examples_loss_share_and_no_loss_lines(tmp_path, capsys):
    from flywheel_trainer.__main__ import main

    tok = fam.build_tokenizer("qwen3")
    model_dir = fam.build_model_dir(tmp_path / "m", "qwen3", tok)
    # a template without tool support renders no tool-call turn: that line has no loss token
    path = tmp_path / "train.jsonl"
    only_call = conversation()[:4]
    rows = [{"messages": conversation(), "tools": fam.TOOLS, "category": "weather"},
            {"messages": only_call, "tools": fam.TOOLS, "category": "calls"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"baseModel": str(model_dir), "dataset": {"train": str(path)},
           "output": {"uri": str(tmp_path / "out")},
           "hyperparameters": {"maxSeqLength": 2048, "globalBatchSize": 2}}
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    rc = main(["--config", str(cfg_path), "--preflight", "--show-examples", "1",
               "--device-memory-gb", "141"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert rc == 0, result
    shown = out[:out.rindex("\n{")]
    assert f"==== {path}:1 [weather] document 1/3" in shown
    assert ("<|im_start|>assistant\n«<think>\nOslo it is.\n</think>\n\n" + hermes("get_weather")
            + "<|im_end|>»\n<|im_start|>user\n<tool_response>") in shown
    assert "«" + THINK + "It is noon.<|im_end|>»" in shown
    assert "«" not in shown.split("<|im_start|>assistant")[0]  # system, tools, user: no loss
    train = result["train"]
    assert set(train["lossShare"]) == {"calls", "weather"}
    assert all(0 < v < 0.5 for v in train["lossShare"].values())
    assert result["memory"]["deviceGB"] == 141 and result["memory"]["perGpuGB"]["total"] < 141

    tok.chat_template = fam.QWEN25.replace("{%- for tc in m.tool_calls or [] %}",
                                           "{%- for tc in [] %}").replace(
        "{%- elif m.role == 'assistant' %}", "{%- elif m.role == 'assistant' and m.content %}")
    tok.save_pretrained(model_dir)
    rc = main(["--config", str(cfg_path), "--preflight", "--device-memory-gb", "0.001"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1
    assert result["train"]["noLoss"] == [f"{path}:2"]
    assert any(p.startswith("no token in the loss") and f"{path}:2" in p
               for p in result["problems"])
    assert any(p.startswith("memory: the estimate is") and "the device has 0.001 GB" in p
               for p in result["problems"])


def test_two_rank_training_per_family(tmp_path):
    """2-rank CPU runs, one per family fixture (its template and architecture), on multi-turn
    tool data with OpenAI-style ids, with evaluation parsing the family's tool calls."""
    import subprocess
    import sys

    from tests.trainer.conftest import kill_group, run_env

    configs = []
    for name in fam.FAMILIES:
        work = tmp_path / name
        work.mkdir()
        tok = fam.build_tokenizer(name)
        model_dir = fam.build_model_dir(work / "base", name, tok)
        parallel = name in ("qwen3", "qwen2.5", "mistral")  # the others take one call a turn
        train = fam.write_data(work / "train.jsonl", 6, seed=1, parallel=parallel)
        evals = fam.write_data(work / "eval.jsonl", 2, seed=2, parallel=False)
        cfg = {"baseModel": str(model_dir), "dataset": {"train": str(train), "eval": str(evals)},
               "hyperparameters": {"learningRate": 1e-3, "globalBatchSize": 4,
                                   "maxSeqLength": 1024, "warmupRatio": 0.0, "epochs": 2},
               "fsdp": {"activationCheckpointing": "selective"},
               "output": {"uri": str(work / "out")}, "maxSteps": 2,
               "evalMaxNewTokens": 12, "evalMaxToolCallPrompts": 2}
        path = work / "config.json"
        path.write_text(json.dumps(cfg))
        configs.append(str(path))
    log = tmp_path / "log.txt"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--standalone", "tests/trainer/train_many.py", *configs],
            env=run_env(tmp_path), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            kill_group(proc)
    assert rc == 0, log.read_text()[-6000:]
    for name in fam.FAMILIES:
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["steps"] == 2, (name, s)
        assert 0 < s["metrics"]["train_loss"] < 20 and s["metrics"]["eval_loss"] > 0
        # the family's tool-call format was recognised: a measured accuracy, no warning
        assert isinstance(s["metrics"]["tool_call_accuracy"], float), (name, s)
        assert "warnings" not in s
        assert (tmp_path / name / "out" / "model.safetensors").exists()
