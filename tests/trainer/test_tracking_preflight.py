"""Comet fallback to offline (fast, nothing dropped) and the --preflight mode."""

from __future__ import annotations

import json
import time
import zipfile

from flywheel_trainer.__main__ import main
from flywheel_trainer.config import TrainerConfig
from flywheel_trainer.tracking import Tracker

from tests.trainer.conftest import EXPERIMENT_KEY, make_config


def test_unreachable_comet_falls_back_to_offline_quickly(toy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = TrainerConfig.model_validate(make_config(toy, out))
    monkeypatch.setenv("COMET_API_KEY", "not-a-real-key")
    monkeypatch.setenv("COMET_URL_OVERRIDE", "http://127.0.0.1:9/clientlib/")  # nothing there
    monkeypatch.setenv("FLYWHEEL_EXPERIMENT_KEY", EXPERIMENT_KEY)
    monkeypatch.setenv("FLYWHEEL_ATTEMPT", "3")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", "")  # restored (unset) after the test
    t0 = time.monotonic()
    tracker = Tracker(cfg, is_main=True)
    assert not tracker.online
    tracker.log_params({"learningRate": 0.5})
    tracker.log_metrics({"train_loss": 1.25, "skipped": None}, step=7)
    archive = tracker.end()
    assert time.monotonic() - t0 < 15
    assert archive.startswith(str(out / "comet-offline" / EXPERIMENT_KEY))
    with zipfile.ZipFile(archive) as z:
        msgs = [json.loads(line) for line in z.read("messages.json").splitlines()]
        exp = json.loads(z.read("experiment.json"))
    metric = [m["payload"]["metric"] for m in msgs if m["type"] == "metric_msg"
              and m["payload"]["metric"]["metricName"] == "train_loss"]
    assert metric == [{"epoch": None, "metricName": "train_loss", "metricValue": 1.25,
                       "step": 7}]
    assert exp["tags"] == ["attempt-3"] and exp["workspace"] == "flywheel"


def test_tracker_is_inert_off_rank0(toy, tmp_path):
    cfg = TrainerConfig.model_validate(make_config(toy, tmp_path / "out"))
    tracker = Tracker(cfg, is_main=False)
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    assert tracker.end() is None
    assert not (tmp_path / "out").exists()


def test_preflight_reports_and_plans(toy, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    lines = toy.train.read_text().splitlines()
    bad.write_text("\n".join(lines[:9] + ['{"messages": []}'] + lines[9:]) + "\n")
    cfg = make_config(toy, tmp_path / "out",
                      dataset={"train": str(bad), "eval": str(toy.eval),
                               "requiredCategories": ["email", "billing"],
                               "minExamplesPerCategory": 5})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    result_path = tmp_path / "preflight.json"
    rc = main(["--config", str(path), "--preflight", "--output", str(result_path),
               "--world-size", "2"])
    assert rc == 1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads(result_path.read_text())
    assert printed == result
    assert len(result_path.read_bytes()) <= 4096
    assert not result["ok"]
    assert result["errors"] == [f"{bad}:10: `messages` must be a non-empty list"]
    assert result["missingCategories"] == {"billing": 0}
    assert result["train"]["categories"] == {"edit-workflow": 16, "email": 16,
                                             "integration": 16}
    assert result["eval"]["examples"] == 6
    assert result["totalTokens"] == 2 * result["train"]["tokens"] > 0
    assert result["maxExampleTokens"] <= 1024
    # same plan as the 2-rank training run: 16 packs, batch 4, 2 epochs -> 8 steps
    assert result["packs"] == 16 and result["optimizerSteps"] == 8

    # fixing the data and the requirement makes it pass
    cfg["dataset"] = {"train": str(toy.train), "requiredCategories": ["email"],
                      "minExamplesPerCategory": 5}
    path.write_text(json.dumps(cfg))
    assert main(["--config", str(path), "--preflight", "--output", str(result_path)]) == 0
    assert json.loads(result_path.read_text())["ok"] is True
