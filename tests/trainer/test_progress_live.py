"""Rank 0 serves live progress while a 2-rank run trains; a rank that stops stepping shows."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from tests.trainer.conftest import kill_group, launch, make_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2) as r:
            return json.load(r)
    except OSError:
        return None


def test_progress_while_training_and_a_stopped_rank(toy, tmp_path):
    port = _free_port()
    cfg = make_config(toy, tmp_path / "out", dataset={"train": str(toy.train), "eval": None},
                      tracking={"comet": None})
    # rank 1 stops stepping after step 3 (rank 0 then waits in the next step's collective)
    proc = launch(tmp_path, cfg, FLYWHEEL_PROGRESS_PORT=str(port), FLYWHEEL_HEARTBEAT_S="0.3",
                  FLYWHEEL_DEBUG_STOP_AT_STEP="3", FLYWHEEL_DEBUG_STOP_RANK="1",
                  FLYWHEEL_ATTEMPT="1")
    seen: list[dict] = []
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
            assert time.time() < deadline, seen[-1:] or "no progress served"
            doc = _get(port)
            if doc:
                seen.append(doc)
                ranks = doc["ranks"]
                if doc["step"] == 3 and all(r["step"] == 3 for r in ranks):
                    break
            time.sleep(0.2)
        stages = [d["stage"] for d in seen]
        assert stages[-1] == "training"
        assert set(stages) <= {"starting", "loading-model", "tokenizing", "training"}
        doc = seen[-1]
        assert doc["totalSteps"] == 8 and doc["percent"] == 37.5 and doc["worldSize"] == 2
        assert doc["lastCheckpoint"]["step"] == 2 and doc["lastCheckpoint"]["time"]
        assert doc["loss"] > 0 and doc["tokensPerSecond"] > 0 and doc["etaSeconds"] > 0
        assert doc["mfu"] is None  # no peak FLOPs for CPUs
        # stopped: the step stays, both processes go on heartbeating
        time.sleep(2.5)
        later = _get(port)
        assert later["step"] == 3 and later["stepTime"] == doc["stepTime"]
        for before, after in zip(doc["ranks"], later["ranks"], strict=True):
            assert after["step"] == 3 and after["stepTime"] == before["stepTime"]
            assert after["heartbeatTime"] > before["heartbeatTime"]
        # ... and say where they are: rank 0 waits in step 4's collective, rank 1 does not
        rank0, rank1 = later["ranks"]
        assert "forward_backward (train.py:" in rank0["where"], rank0
        assert rank1["where"].startswith("_debug_stop (progress.py:"), rank1
    finally:
        kill_group(proc)
