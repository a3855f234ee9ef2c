"""End to end: FineTuneRuns that really train (torchrun on CPU via the local executor pool),
register a ModelVersion and resume after a kill. On a small slice of the sample data, so the
runs are short; whether the sample model learns, gets promoted and served is test_story.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hack import run as demo
from tests.conftest import ROOT, Cluster, wait_until

pytestmark = pytest.mark.cluster

TRAIN_TIMEOUT = 600


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    from flywheel_trainer import toy

    work = tmp_path_factory.mktemp("assets")
    eval_ = toy.write_dataset(work / "eval.jsonl", 6, seed=2)
    train = toy.write_dataset(work / "train.jsonl", 48, seed=1, exclude=toy.requests(eval_))
    return demo.build_base(work), train, eval_


@pytest.fixture(scope="module")
def demo_ns(cluster: Cluster, operator) -> str:
    ns = f"e2e-{os.getpid()}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=30s")
    for obj in (demo.serving_deployment(ns), demo.model_manifest(ns)):
        cluster.apply(obj)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def start_run(cluster: Cluster, ns: str, name: str, assets, output: Path) -> None:
    model_dir, train, eval_ = assets
    run = demo.run_manifest(name, model_dir, train, eval_, output, namespace=ns)
    run["spec"]["dataset"]["minExamplesPerCategory"] = 8
    # Three epochs of 5 steps: a kill after the first checkpoint (step 4) lands mid-run.
    run["spec"]["hyperparameters"].update(epochs=3, maxSeqLength=512, globalBatchSize=4,
                                          microBatchSize=1)
    run["spec"]["checkpoint"]["everySteps"] = 4
    cluster.apply(run)


def wait_done(cluster: Cluster, ns: str, name: str) -> dict:
    return wait_until(
        lambda: (s := cluster.get("ftr", name, "-n", ns).get("status") or {}).get("phase")
        in ("Succeeded", "Failed") and s,
        timeout=TRAIN_TIMEOUT, interval=1, message=f"{name} finishes")


@pytest.fixture(scope="module")
def uninterrupted(cluster, demo_ns, assets, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("out") / "uninterrupted"
    start_run(cluster, demo_ns, "uninterrupted", assets, output)
    status = wait_done(cluster, demo_ns, "uninterrupted")
    return {"status": status, "output": output}


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
    # The registered digest is the digest of the files actually at the artifact URI.
    assert mv["spec"]["artifact"]["uri"] == f"file://{uninterrupted['output']}/"
    assert mv["spec"]["artifact"]["digest"] == digest_dir(mv["spec"]["artifact"]["uri"])
    assert (uninterrupted["output"] / "model.safetensors").exists()
    metrics = mv["spec"]["metrics"]
    for category in demo.CATEGORIES:
        assert f"eval_loss/{category}" in metrics
        assert f"tool_call_accuracy/{category}" in metrics
    assert metrics["train_loss"] > 0
    # The experiment key is stable per run and is what the trainer used.
    assert mv["spec"]["tracking"]["experimentKey"] == status["experimentKey"]
    archives = list((uninterrupted["output"] / "comet-offline").glob("*.zip"))
    assert archives, "the trainer leaves a Comet offline archive beside the outputs"

    assert (uninterrupted["output"] / "README.md").exists(), "the model card is exported"
    model = cluster.get("model", demo.MODEL, "-n", demo_ns)
    assert model["status"]["aliases"]["latest"]["modelVersion"] == mv["metadata"]["name"]


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
    wait_until(lambda: list((output / "checkpoints").glob("step-*/.metadata")),
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
    weights = (output / "model.safetensors").read_bytes()
    assert weights == (uninterrupted["output"] / "model.safetensors").read_bytes()


def test_deleting_a_run_keeps_its_model_version(cluster, demo_ns, uninterrupted):
    name = uninterrupted["status"]["modelVersion"]
    cluster.kubectl("delete", "ftr", "uninterrupted", "-n", demo_ns, "--timeout=60s")
    wait_until(lambda: not cluster.get("jobs", "-n", demo_ns, "-l",
                                       "flywheel.dev/run=uninterrupted")["items"],
               message="the run's Job is garbage-collected")
    assert cluster.get("mv", name, "-n", demo_ns)["spec"]["sourceRun"]["name"] == "uninterrupted"
