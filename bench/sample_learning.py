"""How well `make run`'s sample model learns, without the cluster: the same assets as
hack/run.py (tokenizer, model, week 1's data, the held-out eval set), the trainer itself under
torchrun with make run's world size (2 ranks on this machine's CPU), and the trainer's own
held-out per-category tool-call accuracy (greedy) from its summary. Prints the training wall
time, and with --failures the greedy outputs of the eval requests it got wrong.

    nice -n 10 .venv/bin/python bench/sample_learning.py [--work DIR] [--set NAME=VALUE ...]
        [--failures]

--set overrides hack/run.py's sample knobs for an experiment, e.g. `--set WEEK1_EXAMPLES=2000`
or `--set 'HYPERPARAMETERS={"epochs": 4}'` (merged into the dict).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack import run as demo  # noqa: E402


def failures(model_dir: Path, eval_: Path) -> None:
    """Greedy outputs vs references for the eval requests the model gets wrong (1 process)."""
    import torch
    import torch.distributed as dist
    from flywheel_trainer.chat import ChatFormat, normalize
    from flywheel_trainer.data import Conversation
    from flywheel_trainer.evaluate import greedy_generate, tool_call_prompts
    from flywheel_trainer.model import Dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a one-process group on a store of its own: the port comes from the operating system
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    d = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), mesh=None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    fmt = ChatFormat(tok)
    convs = [Conversation(c["messages"], c["tools"], c["category"], i + 1)
             for i, c in enumerate(map(json.loads, eval_.read_text().splitlines()))]
    stop = {tok.convert_tokens_to_ids(t) for t in fmt.stop_tokens}
    for msgs, tools, expected, cat in tool_call_prompts(convs):
        prompt = fmt.apply(normalize(msgs), tools, add_generation_prompt=True)
        gen = greedy_generate(model, tok(prompt, add_special_tokens=False)["input_ids"], d, 96,
                              stop, True)
        text = tok.decode(gen, skip_special_tokens=False)
        if fmt.parse_tool_calls(text, prompt, tools) != expected:
            print(f"[{cat}] {msgs[-1]['content']}\n   want {json.dumps(expected)}\n"
                  f"   got  {text!r}")
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sample-learning")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--failures", action="store_true")
    parser.add_argument("--week", default="1")
    parser.add_argument("--fsdp", type=json.loads, default=None, help="FSDP options (JSON)")
    parser.add_argument("--max-steps", type=int, default=None, help="timing only")
    args = parser.parse_args()
    for item in args.set:
        name, _, value = item.partition("=")
        value = json.loads(value)
        current = getattr(demo, name)
        setattr(demo, name, {**current, **value} if isinstance(current, dict) else value)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, train, eval_ = demo.build_assets(work, args.week)
    out = work / "out"
    spec = demo.run_manifest("sample", model_dir, train, eval_, out)["spec"]
    config = {k: spec[k] for k in ("baseModel", "dataset", "hyperparameters", "output", "fsdp")
              if k in spec}
    if args.fsdp is not None:
        config["fsdp"] = args.fsdp
    if args.max_steps:
        config["maxSteps"] = args.max_steps
        config["dataset"]["eval"] = None
    config["checkpoint"] = {"everySteps": 100000, "keep": 2, "uri": f"file://{work}/ckpt/"}
    config["logEverySteps"] = 20 if args.max_steps else 100
    (work / "config.json").write_text(json.dumps(config))
    summary = work / "summary.json"
    subprocess.run(["rm", "-rf", str(out), str(work / "ckpt")], check=True)
    env = {**os.environ, "FLYWHEEL_SUMMARY_PATH": str(summary), "COMET_MODE": "disabled"}
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", "-m", "flywheel_trainer", "--config",
                    str(work / "config.json")], env=env, check=True)
    wall = time.monotonic() - t0
    result = json.loads(summary.read_text())
    metrics = result["metrics"]
    print(json.dumps({"wall_s": round(wall, 1), "steps": result["steps"],
                      "tokens_per_s": round(result["throughput"]["tokensPerSecond"] or 0),
                      "hyperparameters": config["hyperparameters"],
                      "tool_call_accuracy": metrics.get("tool_call_accuracy"),
                      **{k: round(v, 3) for k, v in metrics.items()
                         if v is not None and (k.startswith("tool_call_accuracy/")
                                               or k.endswith("loss"))}}))
    if args.failures:
        failures(out, eval_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
