"""End to end: FineTuneRuns that really train (torchrun on CPU via the local executor pool),
register a ModelVersion and resume after a kill. On a small slice of the sample data, so the
runs are short; whether the sample model learns, gets promoted and served is test_story.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hack import run as demo
from tests.conftest import ROOT, Cluster, wait_until

pytestmark = pytest.mark.cluster

TRAIN_TIMEOUT = 600


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    from hack import sample as toy

    work = tmp_path_factory.mktemp("assets")
    eval_ = toy.write_dataset(work / "eval.jsonl", 6, seed=2)
    train = toy.write_dataset(work / "train.jsonl", 48, seed=1, exclude=toy.requests(eval_))
    return demo.build_base(work), train, eval_


@pytest.fixture(scope="module")
def demo_ns(cluster: Cluster, operator) -> str:
    ns = f"e2e-{os.getpid()}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=30s")
    model = demo.model_manifest(ns)  # its runs are short: no version is served here
    model["spec"].pop("servingTargets")
    cluster.apply(model)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def start_run(cluster: Cluster, ns: str, name: str, assets, output: Path, **spec) -> None:
    model_dir, train, eval_ = assets
    run = demo.run_manifest(name, model_dir, train, eval_, output, namespace=ns)
    run["spec"].update(spec)
    run["spec"]["dataset"]["minExamplesPerCategory"] = 8
    # Three epochs of 5 steps: a kill after the first checkpoint (step 4) lands mid-run.
    run["spec"]["hyperparameters"].update(epochs=3, maxSeqLength=512, globalBatchSize=4,
                                          microBatchSize=1)
    run["spec"]["checkpoint"]["everySteps"] = 4
    cluster.apply(run)


def run_dir(status: dict) -> Path:
    """The run's own artifact directory (status.outputUri) on this machine."""
    assert status["outputUri"].startswith("file://"), status["outputUri"]
    return Path(status["outputUri"][len("file://"):])


def wait_done(cluster: Cluster, ns: str, name: str, seen: list | None = None) -> dict:
    """The run's final status; `seen` collects status.progress while it is Running."""
    def done():
        s = cluster.get("ftr", name, "-n", ns).get("status") or {}
        if seen is not None and s.get("phase") == "Running" and s.get("progress"):
            seen.append(s["progress"])
        return s.get("phase") in ("Succeeded", "Failed") and s

    return wait_until(done, timeout=TRAIN_TIMEOUT, interval=0.3, message=f"{name} finishes")


@pytest.fixture(scope="module")
def uninterrupted(cluster, demo_ns, assets, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("out") / "uninterrupted"
    start_run(cluster, demo_ns, "uninterrupted", assets, output)
    seen: list[dict] = []
    status = wait_done(cluster, demo_ns, "uninterrupted", seen)
    return {"status": status, "output": output, "progress": seen, "namespace": demo_ns,
            "artifact": run_dir(status)}


def test_run_trains_and_registers(cluster, demo_ns, uninterrupted):
    from flywheel_trainer.export import digest_dir

    status = uninterrupted["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["attempt"] == 1
    # Preflight planned exactly what the trainer then did.
    assert status["preflight"]["phase"] == "Succeeded"
    assert status["preflight"]["steps"] == status["progress"]["step"]
    assert status["preflight"]["tokens"] == status["progress"]["tokens"]
    assert status["gpuHours"] > 0
    mv = cluster.get("mv", status["modelVersion"], "-n", demo_ns)
    # The registered digest is the digest of the files actually at the artifact URI: the
    # run's own directory under spec.output.uri, <run>-<uid8>/.
    uid8 = cluster.get("ftr", "uninterrupted", "-n", demo_ns)["metadata"]["uid"][:8]
    assert uninterrupted["artifact"] == uninterrupted["output"] / f"uninterrupted-{uid8}"
    assert mv["spec"]["artifact"]["uri"] == status["outputUri"]
    assert mv["spec"]["artifact"]["digest"] == digest_dir(mv["spec"]["artifact"]["uri"])
    assert (uninterrupted["artifact"] / "model.safetensors").exists()
    metrics = mv["spec"]["metrics"]
    for category in demo.CATEGORIES:
        assert f"eval_loss/{category}" in metrics
        assert f"tool_call_accuracy/{category}" in metrics
    assert metrics["train_loss"] > 0
    # The experiment key is stable per run and is what the trainer used.
    assert mv["spec"]["tracking"]["experimentKey"] == status["experimentKey"]
    archives = list((uninterrupted["artifact"] / "comet-offline").glob("*.zip"))
    assert archives, "the trainer leaves a Comet offline archive beside the outputs"

    assert (uninterrupted["artifact"] / "README.md").exists(), "the model card is exported"
    model = cluster.get("model", demo.MODEL, "-n", demo_ns)
    assert model["status"]["aliases"]["latest"]["modelVersion"] == mv["metadata"]["name"]


def test_progress_shows_in_status_while_it_trains(uninterrupted):
    seen = uninterrupted["progress"]
    training = [p for p in seen if p.get("stage") == "training"]
    assert training, seen
    total = training[-1]["totalSteps"]
    # Seen mid-run: a training step short of the end while the run was still Running (how
    # many snapshots land depends on the machine's speed, so no count is asserted).
    assert any(0 < p["step"] < total for p in training), seen
    assert [p["step"] for p in training] == sorted(p["step"] for p in training), seen
    assert any(p.get("eta") and p.get("tokensPerSecond") and p.get("loss") for p in training)
    assert all(p.get("heartbeatTime") for p in training)
    status = uninterrupted["status"]
    assert status["progress"]["percent"] == "100%" and status["progress"]["stage"] == "done"
    assert status["lastCheckpoint"]["step"] >= 4
    assert status["lastCheckpoint"]["uri"].startswith(status["checkpointUri"])


def trainer_pids(ns: str, pod_prefix: str, index: int) -> list[int]:
    """Processes the local executor started for the pod of `index` (torchrun + workers)."""
    pattern = f"{ROOT}/.cache/executor/{ns}/{pod_prefix}-{index}-"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_trainer_resumes_as_attempt_two_with_the_same_weights(
        cluster, demo_ns, assets, uninterrupted, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "interrupted"
    start_run(cluster, demo_ns, "interrupted", assets, output)

    # Wait for the first complete checkpoint, then kill node 1's trainer processes.
    wait_until(lambda: list(output.glob("*/checkpoints/step-*/.complete")),
               timeout=TRAIN_TIMEOUT, interval=0.05, message="first checkpoint")
    pids = trainer_pids(demo_ns, "interrupted-a1", 1)
    assert pids, "node 1's trainer is running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    status = wait_done(cluster, demo_ns, "interrupted")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["attempt"] == 2, "the kill failed attempt 1; attempt 2 finished the run"
    assert time.monotonic() > killed_at
    logs = sorted((ROOT / ".cache" / "executor" / demo_ns).glob("interrupted-a2-0-*/output.log"))
    assert logs and "resumed from checkpoint" in logs[-1].read_text().lower()

    # The same weights as the uninterrupted run (the model cards differ: run names, attempts).
    weights = (run_dir(status) / "model.safetensors").read_bytes()
    assert weights == (uninterrupted["artifact"] / "model.safetensors").read_bytes()


def test_a_stalled_trainer_is_restarted_from_its_checkpoint(
        cluster, operator, assets, uninterrupted, tmp_path_factory):
    # Its own namespace: the executor's test hook gives every pod there the trainer's switch
    # to stop stepping after step 4 (the first checkpoint), in attempt 1 only.
    ns = f"e2e-hang-{os.getpid()}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=30s")
    hook = ROOT / ".cache" / "executor" / "env" / f"{ns}.json"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(json.dumps({"FLYWHEEL_DEBUG_STOP_AT_STEP": "4",
                                "FLYWHEEL_DEBUG_STOP_ATTEMPT": "1"}))
    try:
        output = tmp_path_factory.mktemp("out") / "hang"
        start_run(cluster, ns, "hang", assets, output, stallTimeoutSeconds=20)
        status = wait_done(cluster, ns, "hang")
        assert status["phase"] == "Succeeded", status.get("message")
        assert [a["reason"] for a in status["attempts"]] == ["Stalled", "Completed"]
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert stalled["status"] == "False"  # attempt 2 trained
        events = cluster.get("events", "-n", ns, "--field-selector",
                             "involvedObject.name=hang")["items"]
        stall = [e["message"] for e in events if e["reason"] == "Stalled"]
        assert stall and "stage training, step 4/" in stall[0], stall
        assert "rank 0 step 4" in stall[0] and "rank 1 step 4" in stall[0]
        # The same weights as the uninterrupted run (the model cards differ: run names).
        weights = (run_dir(status) / "model.safetensors").read_bytes()
        assert weights == (uninterrupted["artifact"] / "model.safetensors").read_bytes()
    finally:
        hook.unlink(missing_ok=True)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_two_runs_on_one_output_both_train_and_register(cluster, demo_ns, assets,
                                                        uninterrupted, tmp_path_factory):
    """Next week's run copied from this week's, with only the data changed: it trains its own
    steps on its own data, and version 1's artifact stays byte for byte what it registered."""
    from flywheel_trainer.export import digest_dir

    from hack import sample as toy

    model_dir, _, eval_ = assets
    other = toy.write_dataset(tmp_path_factory.mktemp("week2") / "train.jsonl", 48, seed=5,
                              exclude=toy.requests(eval_))
    first = cluster.get("mv", uninterrupted["status"]["modelVersion"], "-n", demo_ns)
    start_run(cluster, demo_ns, "same-output", (model_dir, other, eval_),
              uninterrupted["output"])
    status = wait_done(cluster, demo_ns, "same-output")
    assert status["phase"] == "Succeeded", status.get("message")
    second = cluster.get("mv", status["modelVersion"], "-n", demo_ns)
    # Its own steps, from step 0: it did not resume from the first run's checkpoints.
    assert status["attempt"] == 1
    assert status["progress"]["step"] == status["preflight"]["steps"]
    logs = sorted((ROOT / ".cache" / "executor" / demo_ns).glob("same-output-a1-0-*/output.log"))
    assert logs and "resumed from checkpoint" not in logs[-1].read_text()
    # Its own data, side by side with the first version under the same output.uri.
    assert (second["spec"]["dataset"]["digests"]["train"]
            != first["spec"]["dataset"]["digests"]["train"])
    assert second["spec"]["artifact"]["uri"] != first["spec"]["artifact"]["uri"]
    for mv in (first, second):
        assert mv["spec"]["artifact"]["uri"].startswith(f"file://{uninterrupted['output']}/")
        # Registered bytes never change: each digest is still what is on the store.
        assert digest_dir(mv["spec"]["artifact"]["uri"]) == mv["spec"]["artifact"]["digest"]


def test_a_run_trains_from_the_production_version(cluster, demo_ns, assets, uninterrupted,
                                                  tmp_path_factory):
    """model://MODEL@production: resolved when the run starts, digest verified by the
    trainer, and the new version names its parent. A learning rate of 1e-9 leaves the
    weights where they started, which shows where that was."""
    from safetensors.torch import load_file

    parent = cluster.get("mv", uninterrupted["status"]["modelVersion"], "-n", demo_ns)
    version = parent["spec"]["version"]
    cluster.kubectl("patch", "model", demo.MODEL, "-n", demo_ns, "--type=merge", "-p",
                    json.dumps({"spec": {"pinnedAliases": {"production": version}}}))
    wait_until(lambda: (cluster.get("model", demo.MODEL, "-n", demo_ns).get("status") or {})
               .get("aliases", {}).get("production", {}).get("version") == version,
               message="production points at the parent")
    output = tmp_path_factory.mktemp("out") / "child"
    start_run(cluster, demo_ns, "child", assets, output,
              baseModel=f"model://{demo.MODEL}@production",
              hyperparameters={**demo.HYPERPARAMETERS, "learningRate": 1e-9})
    status = wait_done(cluster, demo_ns, "child")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["baseModel"]["modelVersion"] == parent["metadata"]["name"]
    assert status["baseModel"]["digest"] == parent["spec"]["artifact"]["digest"]
    child = cluster.get("mv", status["modelVersion"], "-n", demo_ns)
    assert child["spec"]["parent"] == {
        "modelVersion": parent["metadata"]["name"], "version": version,
        "digest": parent["spec"]["artifact"]["digest"],
        "ref": f"model://{demo.MODEL}@production"}
    columns = cluster.kubectl("get", "mv", child["metadata"]["name"], "-n", demo_ns).stdout
    assert parent["metadata"]["name"] in columns  # kubectl get mv shows the lineage
    assert f"Parent version: `{parent['metadata']['name']}`" in (
        run_dir(status) / "README.md").read_text()
    # It started from the parent's weights, not from the base model's.
    grown = load_file(run_dir(status) / "model.safetensors")
    start = load_file(uninterrupted["artifact"] / "model.safetensors")
    base = load_file(assets[0] / "model.safetensors")
    for name, tensor in grown.items():
        assert torch.allclose(tensor.float(), start[name].float(), atol=1e-5), name
    assert any(not torch.allclose(t.float(), base[n].float(), atol=1e-3)
               for n, t in grown.items() if n in base)


def test_deleting_a_run_keeps_its_model_version(cluster, demo_ns, uninterrupted):
    name = uninterrupted["status"]["modelVersion"]
    cluster.kubectl("delete", "ftr", "uninterrupted", "-n", demo_ns, "--timeout=60s")
    wait_until(lambda: not cluster.get("jobs", "-n", demo_ns, "-l",
                                       "flywheel.dev/run=uninterrupted")["items"],
               message="the run's Job is garbage-collected")
    assert cluster.get("mv", name, "-n", demo_ns)["spec"]["sourceRun"]["name"] == "uninterrupted"
