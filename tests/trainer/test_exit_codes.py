"""The trainer's exit-code contract at the pod level: a data error exits 2 through torchrun
(the launcher), with the trainer's words in the summary; a bad config exits 2 too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.trainer.conftest import make_config, run_env, write_config


def test_data_error_exits_2_through_the_launcher(toy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(toy.train).read_text().splitlines()[0] + "\n{oops\n")
    cfg = make_config(toy, tmp_path / "out", dataset={"train": str(bad), "eval": None},
                      tracking={"comet": None})
    path = write_config(tmp_path, cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel_trainer.launch", "--nproc-per-node", "2",
         "--standalone", "-m", "flywheel_trainer", "--config", str(path)],
        cwd=tmp_path, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["error"].startswith("DataError: 1 invalid line(s)")
    assert f"{bad}:2: invalid JSON" in summary["error"]


def test_invalid_config_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"baseModel": "file:///m", "dataset": {"train": "x"},
                                "output": {"uri": "file:///o"}, "hyperparameters":
                                {"learningRate": "fast"}}))
    proc = subprocess.run([sys.executable, "-m", "flywheel_trainer", "--config", str(path)],
                          env=run_env(tmp_path, RANK="0"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["error"].startswith(f"ConfigError: {path}:")
    assert "learningRate" in summary["error"]
