"""How well `make run`'s sample model learns, without the cluster: the same assets as
hack/run.py (tokenizer, model, week 1's data, the held-out eval set), the trainer itself under
torchrun with make run's world size (2 ranks on this machine's CPU), and the trainer's own
held-out per-category tool-call accuracy (greedy) from its summary. Prints the training wall
time, and with --failures the greedy outputs of the eval requests it got wrong.

    nice -n 10 .venv/bin/python bench/sample_learning.py [--work DIR] [--set NAME=VALUE ...]
        [--failures] [--chain N [--next-set NAME=VALUE ...] [--week1-model DIR]]

--set overrides hack/run.py's sample knobs for an experiment, e.g. `--set WEEK1_EXAMPLES=2000`
or `--set 'HYPERPARAMETERS={"epochs": 4}'` (merged into the dict).

--chain N trains N consecutive weeks as the flywheel does from week 2 on: week 1 from the base
model (HYPERPARAMETERS), then week k = 2..N on week k's data starting FROM week k-1's exported
model (a Hugging Face directory, as `baseModel: file://...`), with HYPERPARAMETERS, epochs
NEXT_WEEK_EPOCHS, and the `--next-set NAME=VALUE` hyperparameters over them (e.g.
`--next-set epochs=1 --next-set learningRate=5e-3`). Each week trains under <work>/week-<k>/
(its exported model in out/); `--week1-model DIR` starts from an earlier week 1's model
instead of training it (its metrics are shown when DIR/../summary.json exists). Prints one line
per week (start model, steps, training and wall seconds, accuracy overall and per category,
FLOOR where it misses make run's floor) and a JSON line per week.
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


FLOOR = {"overall": 0.8, "category": 0.5}  # the sample's accuracy floor (tests/e2e/test_story.py)


def train(work: Path, base_model: Path, train_data: Path, eval_: Path,
          hyperparameters: dict | None, args) -> dict:
    """One training of the trainer under torchrun (2 ranks, make run's world size) in `work`;
    its exported model in work/out. Returns the result line's fields."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    spec = demo.run_manifest("sample", base_model, train_data, eval_, out)["spec"]
    config = {k: spec[k] for k in ("baseModel", "dataset", "hyperparameters", "output", "fsdp")
              if k in spec}
    if hyperparameters is not None:
        config["hyperparameters"] = hyperparameters
    if args.fsdp is not None:
        config["fsdp"] = args.fsdp
    if args.max_steps:
        config["maxSteps"] = args.max_steps
        config["dataset"]["eval"] = None
    config["checkpoint"] = {"everySteps": 100000, "keep": 2, "uri": f"file://{work}/ckpt/"}
    config["logEverySteps"] = 20 if args.max_steps else 100
    (work / "config.json").write_text(json.dumps(config))
    summary = work / "summary.json"
    subprocess.run(["rm", "-rf", str(out), str(work / "ckpt"), str(summary)], check=True)
    env = {**os.environ, "FLYWHEEL_SUMMARY_PATH": str(summary), "COMET_MODE": "disabled"}
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", "-m", "flywheel_trainer", "--config",
                    str(work / "config.json")], env=env, check=True)
    wall = time.monotonic() - t0
    subprocess.run(["rm", "-rf", str(work / "ckpt")], check=True)
    return {"wall_s": round(wall, 1), **result_fields(summary),
            "hyperparameters": config["hyperparameters"]}


def result_fields(summary: Path) -> dict:
    """steps, training seconds (tokens / measured tokens per second: the training loop alone,
    without start-up, evaluation and export), accuracy and losses from a trainer summary."""
    result = json.loads(summary.read_text())
    metrics = result["metrics"]
    tps = result["throughput"]["tokensPerSecond"] or 0
    return {"steps": result["steps"], "tokens_per_s": round(tps),
            "train_s": round(result["tokens"] / tps, 1) if tps else None,
            "tool_call_accuracy": metrics.get("tool_call_accuracy"),
            **{k: round(v, 3) for k, v in metrics.items()
               if v is not None and (k.startswith("tool_call_accuracy/") or k.endswith("loss"))}}


def week_line(week: int, start: str, r: dict) -> str:
    acc = r.get("tool_call_accuracy")
    cats = {c: r.get(f"tool_call_accuracy/{c}") for c in demo.CATEGORIES}
    below = (acc is None or acc < FLOOR["overall"]
             or any(v is None or v < FLOOR["category"] for v in cats.values()))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"week {week}  from {start:<8} steps {r.get('steps', '-'):>5}  "
            f"train {r.get('train_s') or '-':>6} s  wall {r.get('wall_s') or '-':>6} s  "
            f"accuracy {fmt(acc)}  "
            + "  ".join(f"{c} {fmt(v)}" for c, v in cats.items())
            + ("  FLOOR" if below else ""))


def chain(args, work: Path) -> int:
    """Week 1 from the base model, then weeks 2..N each from the week before's model."""
    later = {**demo.HYPERPARAMETERS, "epochs": demo.NEXT_WEEK_EPOCHS}
    for item in args.next_set:
        name, _, value = item.partition("=")
        later[name] = json.loads(value)
    print(f"weeks >= 2: {json.dumps(later)}", flush=True)
    lines, missed = [], 0
    base = demo.build_base(work)
    if args.week1_model:
        model = Path(args.week1_model).resolve()
        summary = model.parent / "summary.json"
        r = result_fields(summary) if summary.exists() else {}
        line = week_line(1, "base", r) + f"  (reused {model})"
    else:
        train_data, eval_ = demo.build_data(work, "1")
        r = train(work / "week-1", base, train_data, eval_, None, args)
        model = work / "week-1" / "out"
        line = week_line(1, "base", r)
    lines.append(line)
    missed += "FLOOR" in line
    print(line, flush=True)
    print(json.dumps({"week": 1, "from": "base", **r}), flush=True)
    for week in range(2, args.chain + 1):
        train_data, eval_ = demo.build_data(work, str(week))
        r = train(work / f"week-{week}", model, train_data, eval_, later, args)
        model = work / f"week-{week}" / "out"
        line = week_line(week, f"week-{week - 1}", r)
        lines.append(line)
        missed += "FLOOR" in line
        print(line, flush=True)
        print(json.dumps({"week": week, "from": f"week-{week - 1}", **r}), flush=True)
    print("\n".join(["", f"chain of {args.chain} weeks, weeks >= 2: {json.dumps(later)}",
                     *lines, f"weeks below the floor: {missed}"]), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sample-learning")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--failures", action="store_true")
    parser.add_argument("--week", default="1")
    parser.add_argument("--fsdp", type=json.loads, default=None, help="FSDP options (JSON)")
    parser.add_argument("--max-steps", type=int, default=None, help="timing only")
    parser.add_argument("--chain", type=int, default=None, metavar="N",
                        help="N weeks, each from the week before's model")
    parser.add_argument("--next-set", action="append", default=[], metavar="NAME=VALUE",
                        help="a hyperparameter of weeks >= 2 (JSON value)")
    parser.add_argument("--week1-model", default=None, metavar="DIR",
                        help="with --chain: week 1's exported model, not trained again")
    args = parser.parse_args()
    for item in args.set:
        name, _, value = item.partition("=")
        value = json.loads(value)
        current = getattr(demo, name)
        setattr(demo, name, {**current, **value} if isinstance(current, dict) else value)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.chain:
        return chain(args, work)
    model_dir, train_data, eval_ = demo.build_assets(work, args.week)
    r = train(work, model_dir, train_data, eval_, None, args)
    print(json.dumps(r))
    if args.failures:
        failures(work / "out", eval_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
