"""Fixtures for the trainer tests: a toy tokenizer, tiny Qwen3 and data, all built locally."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["COMET_ERROR_TRACKING_ENABLE"] = "false"

EXPERIMENT_KEY = "0123456789abcdef0123456789abcdef"


@dataclass
class Toy:
    root: Path
    model_dir: Path
    train: Path
    eval: Path
    tokenizer: object


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Toy:
    from hack import sample as toylib

    root = tmp_path_factory.mktemp("toy")
    tok = toylib.build_tokenizer()
    model_dir = toylib.build_model_dir(root / "base", len(tok), tokenizer=tok)
    train = toylib.write_dataset(root / "train.jsonl", 48, seed=1)
    evals = toylib.write_dataset(root / "eval.jsonl", 6, seed=2)
    return Toy(root, model_dir, train, evals, tok)


def make_config(toy: Toy, out: Path, **overrides) -> dict:
    cfg = {
        "baseModel": f"file://{toy.model_dir}",
        "dataset": {"train": str(toy.train), "eval": str(toy.eval)},
        "hyperparameters": {"learningRate": 3e-3, "globalBatchSize": 4, "microBatchSize": 1,
                            "maxSeqLength": 640, "epochs": 2, "warmupRatio": 0.1},
        "fsdp": {"activationCheckpointing": "selective"},
        "checkpoint": {"everySteps": 2, "keep": 2},
        "output": {"uri": f"file://{out}"},
        "tracking": {"comet": {"workspace": "flywheel", "project": "tests"}},
        "runName": "toy-run",
        "evalMaxNewTokens": 24,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def torchrun_cmd(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone", "-m", "flywheel_trainer", "--config", str(config_path)]


def run_env(work: Path, **extra) -> dict:
    env = dict(os.environ)
    for var in ("COMET_API_KEY", "COMET_OFFLINE_DIRECTORY", "COMET_URL_OVERRIDE"):
        env.pop(var, None)
    env.update({"FLYWHEEL_SUMMARY_PATH": str(work / "summary.json"),
                "FLYWHEEL_EXPERIMENT_KEY": EXPERIMENT_KEY, "FLYWHEEL_RUN_NAME": "toy-run",
                "FLYWHEEL_ATTEMPT": "0", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def write_config(work: Path, cfg: dict) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def launch(work: Path, cfg: dict, **env) -> subprocess.Popen:
    """Start 2-rank torchrun in its own session (so the whole group can be killed)."""
    path = write_config(work, cfg)
    log = (work / "log.txt").open("ab")
    return subprocess.Popen(torchrun_cmd(path), cwd=work, env=run_env(work, **env),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(work: Path, cfg: dict, timeout: float = 300, **env) -> str:
    proc = launch(work, cfg, **env)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    log = (work / "log.txt").read_text()
    assert rc == 0, log[-6000:]
    return log


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """torchrun and its ranks. torch elastic starts each rank in a session of its own, so
    killing torchrun's process group alone leaves ranks blocked in a collective running
    after the test: they are found by ancestry first."""
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(sig)


@pytest.fixture(scope="session")
def trained(toy, tmp_path_factory):
    """One complete 2-rank run (eval, export, Comet offline, summary) shared by several tests."""
    work = tmp_path_factory.mktemp("run-a")
    out = work / "out"
    cfg = make_config(toy, out)
    log = run_to_end(work, cfg)
    return {"work": work, "out": out, "cfg": cfg, "log": log,
            "summary": json.loads((work / "summary.json").read_text())}
