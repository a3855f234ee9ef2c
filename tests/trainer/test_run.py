"""End-to-end 2-rank torchrun (gloo, CPU): loss, export, summary, Comet archive, resume."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from flywheel_trainer.data import DataError

from tests.trainer.conftest import EXPERIMENT_KEY, kill_group, launch, make_config, run_to_end

STEP_LOG = re.compile(r"step (\d+)/(\d+) train_loss=([0-9.]+)")


def _losses(log: str) -> list[float]:
    return [float(m.group(3)) for m in STEP_LOG.finditer(log)]


def test_loss_falls(trained):
    losses = _losses(trained["log"])
    assert len(losses) == trained["summary"]["steps"] == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses


def test_summary_schema_size_and_digest(trained):
    work, out = trained["work"], trained["out"]
    raw = (work / "summary.json").read_bytes()
    assert len(raw) <= 4096
    s = json.loads(raw)
    assert s["artifact"]["uri"] == f"file://{out}"
    assert s["artifact"]["format"] == "huggingface-safetensors"
    # the digest is sha256 over `sha256sum`-style lines of the top-level artifact files; the
    # manifest beside them holds exactly those lines and is not itself part of the digest
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != ".flywheel-sha256sums")
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    body = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files)
    assert s["artifact"]["digest"] == "sha256:" + hashlib.sha256(body.encode()).hexdigest()
    assert (out / ".flywheel-sha256sums").read_text() == body
    m = s["metrics"]
    cats = ["edit-workflow", "email", "integration"]
    for key in ["train_loss", "eval_loss", "tool_call_accuracy"]:
        assert isinstance(m[key], float)
    for c in cats:
        assert m[f"eval_loss/{c}"] > 0
        assert 0.0 <= m[f"tool_call_accuracy/{c}"] <= 1.0
    assert abs(m["eval_loss"] - sum(m[f"eval_loss/{c}"] for c in cats) / 3) < 0.5
    assert s["steps"] == 8 and s["tokens"] > 0
    train_digest = hashlib.sha256(Path(trained["cfg"]["dataset"]["train"]).read_bytes())
    assert s["dataset"]["digests"]["train"] == "sha256:" + train_digest.hexdigest()
    assert s["dataset"]["digests"]["eval"].startswith("sha256:")
    assert s["dataset"]["examples"] == {"train": 48, "eval": 6}
    assert s["throughput"]["tokensPerSecond"] > 0
    assert s["throughput"]["mfu"] is None  # no peak FLOPs for CPUs
    assert s["tracking"]["experimentKey"] == EXPERIMENT_KEY
    assert s["tracking"]["url"] is None  # offline


def test_export_reloads_with_trained_weights(trained, toy):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained["out"]
    exported = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == toy.tokenizer.chat_template
    # the trained weights, straight from the final distributed checkpoint
    step = trained["summary"]["steps"]
    flat = trained["work"] / "final.pt"
    dcp_to_torch_save(out / "checkpoints" / f"step-{step}", flat)
    state = torch.load(flat, weights_only=False)
    assert int(state["train"]["step"]) == step
    trained_model = AutoModelForCausalLM.from_pretrained(toy.model_dir)
    trained_model.load_state_dict(state["model"])
    base = AutoModelForCausalLM.from_pretrained(toy.model_dir)
    ids = torch.tensor([tok("Rename workflow W7 to sales-report.")["input_ids"]])
    with torch.no_grad():
        a = exported(ids).logits
        b = trained_model(ids).logits
        c = base(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)  # it did train


def test_comet_offline_archive(trained):
    archive_dir = trained["out"] / "comet-offline"
    archives = list(archive_dir.glob(f"{EXPERIMENT_KEY}-*.zip"))
    assert len(archives) == 1
    assert str(archives[0]) == trained["summary"]["tracking"]["offlineArchive"]
    with zipfile.ZipFile(archives[0]) as z:
        messages = [json.loads(line) for line in z.read("messages.json").splitlines()]
        params = {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
                  for m in messages if m["type"] == "parameter_msg"}
        assert params["learningRate"] == 3e-3
        assert params["worldSize"] == 2 and params["globalBatchSize"] == 4
        metrics = [m["payload"]["metric"] for m in messages if m["type"] == "metric_msg"]
        train_steps = sorted(m["step"] for m in metrics if m["metricName"] == "train_loss")
        assert train_steps[:8] == list(range(1, 9))
        names = {m["metricName"] for m in metrics}
        assert {"eval_loss", "eval_loss/email", "tool_call_accuracy", "tokens_per_s"} <= names
        uploads = [m["payload"] for m in messages if m["type"] == "file_upload"]
        report = [u for u in uploads if u["additional_params"]["fileName"] == "data_report.json"]
        assert len(report) == 1
        data = json.loads(z.read(report[0]["file_path"]))
        assert data["train"]["examples"] == 48
        assert data["train"]["categories"] == {"edit-workflow": 16, "email": 16,
                                               "integration": 16}
        assert data["train"]["filtered"]["duplicate"] == 0
        others = {m["payload"]["key"]: m["payload"]["value"]
                  for m in messages if m["type"] == "log_other"}
        assert others["data/train/examples"] == 48
        experiment = json.loads(z.read("experiment.json"))
        assert experiment["offline_id"] == EXPERIMENT_KEY
        assert experiment["resume_strategy"] == "get_or_create"  # restarts append
        assert experiment["tags"] == ["attempt-0"]


def test_kill_and_resume_is_bitwise_equal(trained, toy, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    # same training as the shared run; evaluation and Comet do not touch the weights
    cfg = make_config(toy, out, dataset={"train": str(toy.train), "eval": None},
                      tracking={"comet": None})
    proc = launch(tmp_path, cfg, FLYWHEEL_DEBUG_STEP_DELAY_S="0.5")
    first = out / "checkpoints" / "step-2" / ".complete"
    deadline = time.time() + 240
    try:
        while not first.exists():
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
            assert time.time() < deadline
            time.sleep(0.05)
        # SIGTERM the whole group: torchrun and both workers (torchrun alone leaves them)
        kill_group(proc, signal.SIGTERM)
        t0 = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        print(f"torchrun exited {time.monotonic() - t0:.1f}s after SIGTERM: {proc.returncode}")
    finally:
        kill_group(proc)
    assert not (out / "model.safetensors").exists()
    complete = sorted(int(p.parent.name[5:]) for p in out.glob("checkpoints/*/.complete"))
    assert complete and complete[-1] < 8
    # a torn write newer than every complete checkpoint (no marker) must be ignored
    torn = out / "checkpoints" / "step-7"
    torn.mkdir(exist_ok=True)
    (torn / "__0_0.distcp").write_bytes(b"half a shard")
    log = run_to_end(tmp_path, cfg)
    resumed = re.search(r"resumed from checkpoint step (\d+)", log)
    assert resumed and int(resumed.group(1)) == complete[-1]
    a = load_file(trained["out"] / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8
    # only the newest `keep` complete checkpoints are left
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == ["step-6", "step-8"]


def test_run_fails_before_training_on_bad_data(toy, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(toy.train).read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: invalid JSON")):
        _single_rank_step(toy, tmp_path, monkeypatch, micro=1, train=bad)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["error"].startswith("DataError: 1 invalid line(s)")
    assert f"{bad}:2: invalid JSON" in s["error"]
    out = tmp_path / "out"
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
    with zipfile.ZipFile(s["tracking"]["offlineArchive"]) as z:  # the error reached Comet too
        msgs = [json.loads(line) for line in z.read("messages.json").splitlines()]
    errors = [m["payload"]["value"] for m in msgs
              if m["type"] == "log_other" and m["payload"]["key"] == "error"]
    assert errors == [s["error"]]


def _single_rank_step(toy, work: Path, monkeypatch, micro: int, train=None) -> dict:
    """One optimizer step in this process (world size 1, gloo), returns its summary."""
    import socket

    from flywheel_trainer.config import TrainerConfig
    from flywheel_trainer.train import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "FLYWHEEL_SUMMARY_PATH": str(work / "summary.json")
                 }.items():
        monkeypatch.setenv(k, v)
    cfg = make_config(toy, work / "out", maxSteps=1,
                      dataset={"train": str(train or toy.train), "eval": None},
                      hyperparameters={"microBatchSize": micro})
    return run(TrainerConfig.model_validate(cfg))


def _step1(archive: str) -> dict[str, float]:
    with zipfile.ZipFile(archive) as z:
        msgs = [json.loads(line) for line in z.read("messages.json").splitlines()]
    return {m["payload"]["metric"]["metricName"]: m["payload"]["metric"]["metricValue"]
            for m in msgs if m["type"] == "metric_msg" and m["payload"]["metric"]["step"] == 1}


def test_loss_is_normalised_by_global_assistant_tokens(trained, toy, tmp_path, monkeypatch):
    # the same first step as 2 ranks x 2 micro-batches (the shared run) and 1 rank x 4
    # micro-batches: same loss and the same gradient norm (taken before clipping, so it would
    # show any error in the gradient's scale)
    ref = _step1(trained["summary"]["tracking"]["offlineArchive"])
    summary = _single_rank_step(toy, tmp_path, monkeypatch, micro=1)
    got = _step1(summary["tracking"]["offlineArchive"])
    assert abs(got["train_loss"] - ref["train_loss"]) < 1e-5, (got, ref)
    assert abs(got["grad_norm"] / ref["grad_norm"] - 1) < 1e-5, (got, ref)
    assert got["tokens"] == ref["tokens"]
