"""`make run`: the flywheel story on the local control plane, one "week" per invocation.

    make run            # the next week: week 1 the first time, then week 2, 3, ...
    make run WEEK=bad   # a bad week: the data lost a required category
    make run WEEK=2     # a given week (also `FLYWHEEL_WEEK=2` or `hack/run.py --week 2`)

Each week it builds (once, locally, nothing is downloaded) a tiny Qwen3-architecture model,
its tokenizer and that week's tool-calling data in three request categories, starts the
operator (unless `make operator` runs one), registers the `tiny-agent` Model (promotion gates
on tool-call accuracy, overall and per category, no per-category regression, a serving
Deployment) and applies a 2-node FineTuneRun on the `local` pool, where the local executor
really runs torchrun on this machine's CPU. It follows the run and prints what the model
learned (per-category tool-call accuracy, with deltas against production), the promotion
decision and where the model card is; then it asks the serving Deployment (hack/serving.py),
once it has fetched, verified and serves production's digest, one held-out request through
the OpenAI client, and prints the tool call it answers with beside the expected one.

Week 1 trains from scratch and is promoted. Week 2 and later train on more data, including a
phrasing users started to use; the new version is promoted only if its gates hold. The bad
week's data has no `edit-workflow` examples: preflight stops the run before any training and
production stays where it was. The eval set is the same held-out file every week (none of its
requests is in any week's training data), so versions are compared on the same questions.

`make run-schedule` (`hack/run.py --schedule`) applies the weekly `FineTuneSchedule` of
examples/finetuneschedule-local.yaml (dataset URIs with `{{ isoWeek }}`, pointing at this
week's snapshot of week 1's data), starts this week's run at once through the
`flywheel.dev/trigger` annotation, and follows it.
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
if str(ROOT) not in sys.path:  # `python hack/run.py` as well as `from hack import run`
    sys.path.insert(0, str(ROOT))
from hack import local_s3, serving  # noqa: E402
from hack.console import follow, metrics_table, say  # noqa: E402

KUBECONFIG = ROOT / ".cache" / "cluster" / "kubeconfig"
KUBECTL = ROOT / ".cache" / "bin" / "kubectl"
WORK = ROOT / ".cache" / "run"
NAMESPACE = "flywheel-demo"
MODEL = "tiny-agent"
CATEGORIES = ("edit-workflow", "email", "integration")

# ---- the sample: sized so the tiny model learns its task in about 3.5 minutes of training on
# 2 CPU cores (bench/sample_learning.py measures it without the cluster). Every argument value
# is one token, copied from the request: the model learns which word of the request fills
# which argument, in about 1000 steps of 4 packed sequences at a high learning rate. It learns
# that in one sudden drop of the loss, somewhere between steps 300 and 450 depending on the
# seed; the steps after it must still have a learning rate to settle (at 668 steps one seed in
# three stayed below the floor: bench/RESULTS.md).
VOCAB = 1000
EVAL_EXAMPLES = 60  # held out; the same file every week
EVAL_NEW_PHRASINGS = 0.1  # share of eval requests in the phrasing users start using in week 2
WEEK1_EXAMPLES = 4000  # x 3 epochs: 1002 steps
NEXT_WEEK_EXAMPLES = 4400  # week 2 and later: more data, with the new phrasing
# Week 2 and later train from production (model://tiny-agent@production): the model already
# copies arguments, so one epoch at a gentler peak rate refines it (bench/RESULTS.md).
NEXT_WEEK_EPOCHS = 1
NEXT_WEEK_LEARNING_RATE = 5.0e-3
PRODUCTION_REF = "model://tiny-agent@production"
NEXT_WEEK_NEW_PHRASINGS = 0.2
BAD_WEEK_LOST = "edit-workflow"  # the category the bad week's data lost
MIN_EXAMPLES = 50  # per required category, checked by preflight
HYPERPARAMETERS = {"epochs": 3, "learningRate": 2.0e-2, "globalBatchSize": 4,
                   "microBatchSize": 2, "maxSeqLength": 512, "warmupRatio": 0.05, "seed": 7}
FSDP = {"activationCheckpointing": "none"}  # a tiny model: recomputing costs more than it saves
GATES = {"overall": 0.75, "category": 0.5, "noRegressionTolerance": 0.1}


# ---- where the model, data and artifacts live: the one place that knows the store.
# Built locally under WORK, then published to the local S3 server (hack/local_s3.py, started
# by `make cluster-up`) under s3://flywheel/<namespace>/, where the runs read and write them
# with the keys of the `flywheel-s3` Secret they name, as on a real cluster.
BUCKET = "flywheel"


def store(*parts: str) -> Path:
    return WORK.joinpath(*parts)


def uri(location: Path | str) -> str:
    """A URI as is, a local path as file://."""
    return location if isinstance(location, str) else f"file://{location}"


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


# ---------------------------------------------------------------------------- assets


def build_base(work: Path) -> Path:
    """The tiny base model with its tokenizer, built once and reused."""
    model_dir = work / "base-model"
    if not (model_dir / "model.safetensors").exists():
        say("building a tiny Qwen3 model and its tokenizer (local, no download)")
        from hack import sample as toy

        tokenizer = toy.build_tokenizer(VOCAB)
        toy.build_model_dir(model_dir, vocab_size=len(tokenizer), tokenizer=tokenizer,
                            **toy.SAMPLE_MODEL)
    return model_dir


def build_data(work: Path, week: str) -> tuple[Path, Path]:
    """(train, eval) for a week: `1`, `2`, `3`, ... or `bad`. The eval set is shared."""
    from hack import sample as toy

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    eval_ = data / "eval.jsonl"
    if not eval_.exists():
        toy.write_dataset(eval_, EVAL_EXAMPLES, seed=2, new_phrasings=EVAL_NEW_PHRASINGS)
    train = data / f"week-{week}" / "train.jsonl"
    if not train.exists():
        train.parent.mkdir(exist_ok=True)
        held_out = toy.requests(eval_)
        if week == "1":
            toy.write_dataset(train, WEEK1_EXAMPLES, seed=1, exclude=held_out)
        elif week == "bad":
            toy.write_dataset(train, NEXT_WEEK_EXAMPLES, seed=99,
                              new_phrasings=NEXT_WEEK_NEW_PHRASINGS, exclude=held_out,
                              categories=[c for c in CATEGORIES if c != BAD_WEEK_LOST])
        else:
            toy.write_dataset(train, NEXT_WEEK_EXAMPLES, seed=int(week),
                              new_phrasings=NEXT_WEEK_NEW_PHRASINGS, exclude=held_out)
    return train, eval_


def build_assets(work: Path, week: str = "1") -> tuple[Path, Path, Path]:
    """(base model, train, eval) of a week."""
    model_dir = build_base(work)
    return (model_dir, *build_data(work, week))


def weekly_snapshot(train: Path, eval_: Path) -> Path:
    """This ISO week's snapshot, where the weekly schedule's `{{ isoWeek }}` URIs point."""
    year, week, _ = datetime.now(UTC).isocalendar()
    snapshot = train.parent.parent / f"{year}-w{week:02d}"
    snapshot.mkdir(exist_ok=True)
    shutil.copyfile(train, snapshot / "train.jsonl")
    shutil.copyfile(eval_, snapshot / "eval.jsonl")
    return snapshot.parent


# ---------------------------------------------------------------------------- manifests


def run_manifest(name: str, model_dir: Path | str, train: Path | str, eval_: Path | str,
                 output: Path | str, nodes: int = 2, namespace: str = NAMESPACE,
                 next_week: bool = False) -> dict:
    """The week's FineTuneRun; s3:// locations name the local S3 server's credentials Secret
    (the endpoint comes from the operator config, as a platform team would set it).
    `next_week`: continued training from production (NEXT_WEEK_HYPERPARAMETERS)."""
    on_s3 = any(uri(x).startswith("s3://") for x in (model_dir, train, eval_, output))
    return {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": uri(model_dir),
            "modelName": MODEL,
            "dataset": {"train": uri(train), "eval": uri(eval_),
                        "requiredCategories": list(CATEGORIES),
                        "minExamplesPerCategory": MIN_EXAMPLES},
            "hyperparameters": {**HYPERPARAMETERS, **({
                "epochs": NEXT_WEEK_EPOCHS, "learningRate": NEXT_WEEK_LEARNING_RATE}
                if next_week else {})},
            "fsdp": FSDP,
            "resources": {"nodes": nodes, "gpusPerNode": 1, "nodePool": "local"},
            "checkpoint": {"everySteps": 250, "keep": 2},
            "output": {"uri": uri(output).rstrip("/") + "/"},
            "tracking": {"comet": {"workspace": "local", "project": MODEL}},
            "maxRestarts": 2,
            **({"storage": {"s3": {"credentialsSecret": local_s3.SECRET_NAME}}} if on_s3 else {}),
        },
    }


def model_manifest(namespace: str = NAMESPACE) -> dict:
    """Promotion: tool-call accuracy above a floor overall and in every category, and no
    category worse than production's by more than the tolerance."""
    per_category = [f"tool_call_accuracy/{c}" for c in CATEGORIES]
    return {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": MODEL, "namespace": namespace},
        "spec": {
            "promotion": {
                "alias": "production",
                "gates": [{"metric": "tool_call_accuracy", "min": GATES["overall"]}]
                + [{"metric": m, "min": GATES["category"]} for m in per_category],
                "noRegression": {"metrics": per_category,
                                 "tolerance": GATES["noRegressionTolerance"]}},
            "servingTargets": [{"deployment": serving.NAME, "container": "server"}],
        },
    }


def schedule_manifest(model_dir: Path, data_dir: Path) -> dict:
    """examples/finetuneschedule-local.yaml with this checkout's paths filled in."""
    import yaml

    text = (ROOT / "examples" / "finetuneschedule-local.yaml").read_text()
    schedule = yaml.safe_load(text.replace("/tmp/flywheel/models/tiny-qwen3", str(model_dir))
                              .replace("/tmp/flywheel/data", str(data_dir))
                              .replace("/tmp/flywheel/artifacts", str(store("artifacts"))))
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


# ---------------------------------------------------------------------------- the story


def next_week(namespace: str = NAMESPACE) -> str:
    """Week 1 while the Model has no version, then one more week per registered version."""
    versions = get("mv", "-n", namespace, "-l", f"flywheel.dev/model={MODEL}")["items"]
    return str(len(versions) + 1)


def production(namespace: str) -> dict | None:
    model = get("model", MODEL, "-n", namespace)
    return ((model.get("status") or {}).get("aliases") or {}).get("production")


def report(name: str, status: dict, namespace: str = NAMESPACE) -> dict:
    """Print what the run produced; returns {ok, modelVersion, promoted, card, ...}."""
    if status["phase"] != "Succeeded":
        failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
        missing = (status.get("preflight") or {}).get("missingCategories") or []
        say(f"run {name} stopped: {failed.get('reason', '-')}: {status.get('message')}")
        if missing:
            print(f"  the data lost required categories: {', '.join(missing)}"
                  " (preflight stopped the run before any training)")
        prod = production(namespace)
        say("production unchanged: " + (f"version {prod['version']} ({prod['modelVersion']})"
                                        if prod else "no version yet"))
        return {"ok": False, "reason": failed.get("reason"), "missing": missing,
                "production": prod}
    from flywheel_trainer import storage
    from flywheel_trainer.card import CARD_FILE, PLOT_FILE
    from flywheel_trainer.export import digest_dir

    output = status["outputUri"]  # the run's own directory under spec.output.uri
    mv = get("mv", status["modelVersion"], "-n", namespace)
    parent = mv["spec"].get("parent")
    say("lineage: " + (f"{mv['metadata']['name']} <- trained from {parent['modelVersion']} "
                       f"({parent['ref']}, digest {parent['digest'][:19]}... verified)"
                       if parent else f"{mv['metadata']['name']} <- trained from the base "
                       f"model {mv['spec']['baseModel']}"))
    model = get("model", MODEL, "-n", namespace)
    comparison = mv["spec"].get("comparison")
    say(f"registered {mv['metadata']['name']}: what it learned (held-out eval, greedy)"
        + (f", vs {comparison['alias']} version {comparison['version']}" if comparison else ""))
    metrics = mv["spec"].get("metrics", {})
    print(metrics_table(metrics, comparison and comparison["deltas"], CATEGORIES))
    decision = next((c for c in (model.get("status") or {}).get("conditions", [])
                     if c["type"] == "Promoted"), None)
    aliases = (model.get("status") or {}).get("aliases", {})
    promoted = (aliases.get("production") or {}).get("modelVersion") == mv["metadata"]["name"]
    if decision:
        say(f"promotion: {'PROMOTED' if promoted else 'NOT promoted'} "
            f"({decision['reason']}: {decision['message']})")
    for alias, target in sorted(aliases.items()):
        print(f"  {alias:<11} -> version {target['version']}  {target['digest'][:23]}...")
    card = mv["spec"]["artifact"].get("card") or storage.join(output, CARD_FILE)
    local = WORK / "artifacts" / name  # copies to open here: the card, its plot, Comet's archive
    local.mkdir(parents=True, exist_ok=True)
    with local_s3.access(output):  # re-read from the store: the digest covers what is there
        actual = digest_dir(output)
        archives = [storage.join(output, "comet-offline", e["name"]) for e in
                    storage.listdir(storage.join(output, "comet-offline"))
                    if e["name"].endswith(".zip")]
        for uri in [card, storage.join(output, PLOT_FILE), *archives]:
            with storage.open_uri(uri, "rb") as src:
                (local / uri.rsplit("/", 1)[-1]).write_bytes(src.read())
    expected = mv["spec"]["artifact"]["digest"]
    say(f"artifacts: {output}  (digest {'matches' if actual == expected else 'MISMATCH'}, "
        "re-read from the store)")
    rel = local.relative_to(ROOT)
    say(f"model card: {rel / CARD_FILE}  (plot: {rel / PLOT_FILE}; copied from {card})")
    for path in archives:
        zip_name = rel / path.rsplit("/", 1)[-1]
        print(f"  Comet offline archive: {zip_name}\n    to upload it to Comet: "
              f"COMET_API_KEY=<your key> .venv/bin/comet upload {zip_name}")
    return {"ok": actual == expected, "modelVersion": mv, "promoted": promoted,
            "card": card, "production": aliases.get("production")}


def ask_served(namespace: str, eval_file: Path) -> dict | None:
    """Once the serving Deployment has rolled out production's digest, send it one held-out
    request with its tools (OpenAI client) and print the tool call it answers with."""
    prod = production(namespace)
    if not prod:
        return None
    say(f"serving: waiting for {serving.NAME} to fetch, verify and serve version "
        f"{prod['version']} (digest {prod['digest'][:23]}...)")
    pod = serving.rolled_out(get, namespace, prod["digest"])
    if pod is None:
        say(f"serving: {serving.NAME} did not roll out to version {prod['version']}: see "
            f"kubectl describe deployment {serving.NAME} -n {namespace}")
        return {"digest": None, "version": prod["version"]}
    request = serving.held_out_request(eval_file)
    call = serving.ask(pod, request)
    user = next(m["content"] for m in request["messages"] if m["role"] == "user")
    say(f"serving: pod {pod['metadata']['name']} ({pod['status']['podIP']}:{serving.PORT}) "
        f"answers with version {prod['version']}; a held-out request through the OpenAI client:")
    print(f"  request:  {user!r} ({request['category']}, {len(request['tools'])} tools)")
    print(f"  served:   {serving.show(call)}")
    print(f"  expected: {serving.show(request['expected'])}")
    return {"digest": serving.served_digest(pod), "version": prod["version"],
            "pod": pod["metadata"]["name"], "call": call, "request": request}


def run_week(week: str, namespace: str = NAMESPACE, work: Path = WORK) -> dict:
    """One week of the story: build that week's data, train, register, report. Once a
    version is in production, the week trains from it (`model://tiny-agent@production`,
    resolved by the operator when the run starts), as the weekly flywheel does."""
    model_dir, train, eval_ = build_assets(work, week)
    name = f"{MODEL}-week-{week}-{datetime.now(UTC):%H%M%S}"
    base = f"s3://{BUCKET}/{namespace}"
    say(f"publishing the base model and week {week}'s data to {base}/ (the local S3 server)")
    model_uri = local_s3.upload(model_dir, f"{base}/base-model/")
    train_uri = local_s3.upload(train, f"{base}/data/week-{week}/train.jsonl")
    eval_uri = local_s3.upload(eval_, f"{base}/data/eval.jsonl")
    output = f"{base}/artifacts/"  # each run writes its own <run>-<uid8>/ under it
    local_s3.apply_secret(namespace)  # the keys, as a Secret the run names
    prod = production(namespace)
    run = run_manifest(name, PRODUCTION_REF if prod else model_uri, train_uri, eval_uri,
                       output, namespace=namespace,
                       next_week=bool(prod) and week != "1")
    apply(run)
    say(f"week {week}: applied FineTuneRun {name} (2 nodes x 1 device on the local pool), "
        f"training on {train_uri}, from "
        + (f"{PRODUCTION_REF} (now version {prod['version']})" if prod else model_uri))
    result = report(name, follow(get, name, namespace), namespace)
    return {"week": week, "name": name, **result, "served": ask_served(namespace, eval_)}


def setup(namespace: str = NAMESPACE) -> None:
    say("installing CRDs, the Model and its serving Deployment")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "-f", str(ROOT / "crds"))
    if not get("namespaces", "--field-selector", f"metadata.name={namespace}")["items"]:
        kubectl("create", "namespace", namespace)
        kubectl("wait", "--for=create", "serviceaccount/default", "-n", namespace)
    apply(serving.deployment(namespace))
    apply(model_manifest(namespace))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--week", default=os.environ.get("FLYWHEEL_WEEK")
                        or os.environ.get("WEEK") or "next",
                        help="1, 2, ..., bad, or next (default; env WEEK or FLYWHEEL_WEEK)")
    parser.add_argument("--schedule", action="store_true",
                        help="run this week's run of the weekly FineTuneSchedule")
    args = parser.parse_args()
    if args.week != "next" and args.week != "bad" and not args.week.isdigit():
        raise SystemExit(f"--week / WEEK: expected 1, 2, ..., bad or next, got {args.week!r}")
    WORK.mkdir(parents=True, exist_ok=True)
    setup()
    operator = start_operator()
    try:
        if not args.schedule:
            week = next_week() if args.week == "next" else args.week
            result = run_week(week)
            return 0 if result["ok"] or (week == "bad" and result["missing"]) else 1
        model_dir, train, eval_ = build_assets(WORK)
        schedule = schedule_manifest(model_dir, weekly_snapshot(train, eval_))
        apply(schedule)
        say(f"applied FineTuneSchedule {schedule['metadata']['name']} "
            f"({schedule['spec']['schedule']}, {schedule['spec']['timeZone']})")
        name = trigger_schedule(schedule["metadata"]["name"])
        run = get("ftr", name, "-n", NAMESPACE)
        say(f"triggered {name}: trains on {run['spec']['dataset']['train']}")
        result = report(name, follow(get, name, NAMESPACE))
        ask_served(NAMESPACE, eval_)
        print(kubectl("get", "fts", "-n", NAMESPACE))
        return 0 if result["ok"] else 1
    finally:
        if operator:
            os.killpg(operator.pid, signal.SIGTERM)
            operator.wait(timeout=30)
            (WORK / "operator.pid").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
