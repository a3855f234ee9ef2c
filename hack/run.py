"""`make run`: the main job, end to end on the local control plane.

1. builds a tiny Qwen3-architecture model, tokenizer and a tool-calling dataset with three
   request categories locally (nothing is downloaded);
2. installs the CRDs, starts the operator (unless one is already running) and registers the
   `tiny-agent` Model with promotion gates and a serving Deployment;
3. applies a 2-node FineTuneRun on the `local` pool: the local executor really runs
   torchrun on this machine's CPU (gloo), one process per "node";
4. follows the run live, then shows the registered ModelVersion, the alias decision, the
   serving rollout, and where the artifacts and the Comet offline archive are.

Run it again for the next "weekly" version: each run gets a fresh name.

`make run-schedule` (`hack/run.py --schedule`) is the flywheel variant: it applies the weekly
`FineTuneSchedule` of examples/finetuneschedule-local.yaml (dataset URIs with `{{ isoWeek }}`),
starts this week's run at once through the `flywheel.dev/trigger` annotation, and follows it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KUBECONFIG = ROOT / ".cache" / "cluster" / "kubeconfig"
KUBECTL = ROOT / ".cache" / "bin" / "kubectl"
WORK = ROOT / ".cache" / "run"
NAMESPACE = "flywheel-demo"
MODEL = "tiny-agent"
CATEGORIES = ("edit-workflow", "email", "integration")


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run([str(KUBECTL), "--kubeconfig", str(KUBECONFIG), *args],
                          capture_output=True, text=True, input=input)
    if check and proc.returncode:
        raise SystemExit(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def get(*args: str) -> dict:
    return json.loads(kubectl("get", "-o", "json", *args))


def apply(obj: dict) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=make-run",
            "-f", "-", input=json.dumps(obj))


def build_assets(work: Path) -> tuple[Path, Path, Path]:
    """Tiny model + tokenizer and train/eval data, built once and reused."""
    model_dir, data_dir = work / "base-model", work / "data"
    if not (model_dir / "config.json").exists() or not (data_dir / "eval.jsonl").exists():
        say("building a tiny Qwen3 model, tokenizer and tool-calling dataset (local, no download)")
        from flywheel_trainer import toy

        data_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = toy.build_tokenizer()
        toy.build_model_dir(model_dir, vocab_size=len(tokenizer), tokenizer=tokenizer)
        toy.write_dataset(data_dir / "train.jsonl", 96, seed=1, categories=CATEGORIES)
        toy.write_dataset(data_dir / "eval.jsonl", 24, seed=2, categories=CATEGORIES)
    # This week's snapshot, where the weekly schedule's `{{ isoWeek }}` URIs point.
    year, week, _ = datetime.now(UTC).isocalendar()
    weekly = data_dir / f"{year}-w{week:02d}"
    weekly.mkdir(exist_ok=True)
    for split in ("train.jsonl", "eval.jsonl"):
        shutil.copyfile(data_dir / split, weekly / split)
    return model_dir, data_dir / "train.jsonl", data_dir / "eval.jsonl"


def run_manifest(name: str, model_dir: Path, train: Path, eval_: Path, output: Path,
                 nodes: int = 2) -> dict:
    return {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneRun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "baseModel": f"file://{model_dir}",
            "modelName": MODEL,
            "dataset": {"train": f"file://{train}", "eval": f"file://{eval_}",
                        "requiredCategories": list(CATEGORIES), "minExamplesPerCategory": 8},
            "hyperparameters": {"epochs": 1, "learningRate": 2.0e-3, "globalBatchSize": 8,
                                "microBatchSize": 2, "maxSeqLength": 512, "warmupRatio": 0.1,
                                "seed": 7},
            "resources": {"nodes": nodes, "gpusPerNode": 1, "nodePool": "local"},
            "checkpoint": {"everySteps": 4, "keep": 2},
            "output": {"uri": f"file://{output}/"},
            "tracking": {"comet": {"workspace": "local", "project": MODEL}},
            "maxRestarts": 2,
        },
    }


def model_manifest() -> dict:
    return {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": MODEL, "namespace": NAMESPACE},
        "spec": {
            "promotion": {"alias": "production",
                          "gates": [{"metric": "eval_loss", "max": 10.0}],
                          "noRegression": {"metrics": ["eval_loss"], "tolerance": 0.5}},
            "servingTargets": [{"deployment": f"{MODEL}-server", "container": "server"}],
        },
    }


def serving_deployment() -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{MODEL}-server", "namespace": NAMESPACE},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": f"{MODEL}-server"}},
            "template": {
                "metadata": {"labels": {"app": f"{MODEL}-server"}},
                "spec": {"nodeSelector": {"flywheel.dev/pool": "cpu"},
                         "containers": [{"name": "server", "image": "vllm/vllm-openai:v0.11"}]},
            },
        },
    }


def schedule_manifest(model_dir: Path, data_dir: Path) -> dict:
    """examples/finetuneschedule-local.yaml with this checkout's paths filled in."""
    import yaml

    text = (ROOT / "examples" / "finetuneschedule-local.yaml").read_text()
    schedule = yaml.safe_load(text.replace("/tmp/flywheel/models/tiny-qwen3", str(model_dir))
                              .replace("/tmp/flywheel/data", str(data_dir))
                              .replace("/tmp/flywheel/artifacts", str(WORK / "artifacts")))
    schedule["metadata"]["namespace"] = NAMESPACE
    return schedule


def trigger_schedule(name: str) -> str:
    """Start one run now; returns its name once the operator has created it."""
    value = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    kubectl("annotate", "fts", name, "-n", NAMESPACE, "--overwrite",
            f"flywheel.dev/trigger={value}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for run in get("ftr", "-n", NAMESPACE, "-l", f"flywheel.dev/schedule={name}")["items"]:
            if run["metadata"].get("annotations", {}).get("flywheel.dev/trigger") == value:
                return run["metadata"]["name"]
        time.sleep(1)
    raise SystemExit(f"schedule {name} did not start a run (see kubectl describe fts {name})")


def start_operator() -> subprocess.Popen | None:
    """Our own operator for this run, unless `make operator` is already running one."""
    pidfile = WORK / "operator.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), 0)
            say("using the operator that is already running")
            return None
        except (OSError, ValueError):
            pass
    log = open(WORK / "operator.log", "ab")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel_operator", "--standalone", "--all-namespaces",
         "--config", str(ROOT / "hack" / "operator-local.yaml"), "--metrics-port", "0",
         "--liveness", ""],
        env={**os.environ, "KUBECONFIG": str(KUBECONFIG)}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    pidfile.write_text(str(proc.pid))
    say(f"operator started (log: {WORK / 'operator.log'})")
    return proc


def follow(name: str, timeout: float = 900) -> dict:
    say(f"following FineTuneRun {NAMESPACE}/{name} (Ctrl-C stops watching, not the run)")
    last, deadline, tty = None, time.monotonic() + timeout, sys.stdout.isatty()
    while time.monotonic() < deadline:
        status = get("ftr", name, "-n", NAMESPACE).get("status") or {}
        progress = status.get("progress") or {}
        pre = (status.get("preflight") or {}).get("phase")
        if status.get("phase") == "Running" and progress.get("totalSteps"):
            # the live bar: stage, step/total, loss, tokens/s, ETA (status.progress)
            done = progress.get("step", 0) / progress["totalSteps"]
            line = (f"[{'#' * int(24 * done):.<24}] {progress.get('percent', '')} "
                    f"attempt {status.get('attempt')} {progress.get('stage', '')} step "
                    f"{progress.get('step')}/{progress['totalSteps']}"
                    + (f" loss {progress['loss']:.3f}" if progress.get("loss") else "")
                    + (f" {progress['tokensPerSecond']:.0f} tok/s"
                       if progress.get("tokensPerSecond") else "")
                    + (f" ETA {progress['eta'][11:19]}" if progress.get("eta") else ""))
        else:
            line = (f"phase={status.get('phase', '-'):<10} attempt={status.get('attempt', '-')}"
                    + (f" preflight={pre}" if pre else "")
                    + (f" step={progress.get('step')}/{progress.get('totalSteps')}"
                       if progress.get("step") is not None else "")
                    + (f"  {status['message']}" if status.get("message") else ""))
        if line != last:
            bar = line.startswith("[") and tty  # redraw the bar in place on a terminal
            if tty and not bar and (last or "").startswith("["):
                print()
            print(f"\r  {datetime.now(UTC):%H:%M:%S}  {line:<100}" if bar
                  else f"  {datetime.now(UTC):%H:%M:%S}  {line}", end="" if bar else "\n",
                  flush=True)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        time.sleep(1)
    raise SystemExit(f"run {name} did not finish within {timeout:.0f}s")


def report(name: str, status: dict, output: Path) -> int:
    if status["phase"] != "Succeeded":
        say(f"run {name} failed: {status.get('message')}")
        print(kubectl("describe", "ftr", name, "-n", NAMESPACE))
        return 1
    from flywheel_trainer.export import digest_dir

    mv = get("mv", status["modelVersion"], "-n", NAMESPACE)
    model = get("model", MODEL, "-n", NAMESPACE)
    say(f"registered {mv['metadata']['name']}")
    print(kubectl("get", "mv,model", "-n", NAMESPACE))
    metrics = mv["spec"].get("metrics", {})
    for key in sorted(metrics):
        print(f"  {key:<40} {metrics[key]:.4f}")
    comparison = mv["spec"].get("comparison")
    if comparison:
        print(f"  deltas vs {comparison['alias']} (version {comparison['version']}): "
              + ", ".join(f"{k} {v:+.4f}" for k, v in comparison["deltas"].items()
                          if "/" not in k))
    decision = next((c for c in (model.get("status") or {}).get("conditions", [])
                     if c["type"] == "Promoted"), None)
    if decision:
        say(f"promotion: {decision['reason']}: {decision['message']}")
    aliases = (model.get("status") or {}).get("aliases", {})
    for alias, target in sorted(aliases.items()):
        print(f"  {alias:<11} -> version {target['version']}  {target['digest'][:23]}...")
    actual = digest_dir(f"file://{output}/")
    expected = mv["spec"]["artifact"]["digest"]
    say(f"artifacts: {output}  (digest {'matches' if actual == expected else 'MISMATCH'})")
    archive = sorted((output / "comet-offline").glob("*.zip")) if (
        output / "comet-offline").exists() else []
    for path in archive:
        print(f"  Comet offline archive: {path}\n    upload with: comet upload {path}")
    time.sleep(2)
    deployment = get("deployment", f"{MODEL}-server", "-n", NAMESPACE)
    template = deployment["spec"]["template"]
    served = template["metadata"].get("annotations", {}).get("flywheel.dev/model-digest")
    say(f"serving: Deployment {MODEL}-server serves digest {str(served)[:23]}..."
        f" (generation {deployment['metadata']['generation']})")
    return 0 if actual == expected else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", action="store_true",
                        help="run this week's run of the weekly FineTuneSchedule")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir, train, eval_ = build_assets(WORK)
    say("installing CRDs")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "-f", str(ROOT / "crds"))
    if not get("namespaces", "--field-selector", f"metadata.name={NAMESPACE}")["items"]:
        kubectl("create", "namespace", NAMESPACE)
        kubectl("wait", "--for=create", "serviceaccount/default", "-n", NAMESPACE)
    apply(serving_deployment())
    apply(model_manifest())
    operator = start_operator()
    name = f"{MODEL}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    output = WORK / "artifacts" / name
    try:
        if args.schedule:
            schedule = schedule_manifest(model_dir, train.parent)
            apply(schedule)
            say(f"applied FineTuneSchedule {schedule['metadata']['name']} "
                f"({schedule['spec']['schedule']}, {schedule['spec']['timeZone']})")
            name = trigger_schedule(schedule["metadata"]["name"])
            run = get("ftr", name, "-n", NAMESPACE)
            output = Path(run["spec"]["output"]["uri"].removeprefix("file://").rstrip("/"))
            say(f"triggered {name}: trains on {run['spec']['dataset']['train']}")
        else:
            apply(run_manifest(name, model_dir, train, eval_, output))
            say(f"applied FineTuneRun {name}: 2 nodes x 1 GPU on the local pool")
        status = follow(name)
        code = report(name, status, output)
        if args.schedule:
            print(kubectl("get", "fts", "-n", NAMESPACE))
        return code
    finally:
        if operator:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(timeout=30)
            (WORK / "operator.pid").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
