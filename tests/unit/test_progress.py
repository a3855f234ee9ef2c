"""The trainer's live progress document and its HTTP endpoint (no torch, no cluster)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from flywheel_trainer import progress
from prometheus_client.parser import text_string_to_metric_families


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_snapshot_follows_stages_steps_and_checkpoints(monkeypatch):
    clock = Clock()
    mono = Clock(100.0)
    monkeypatch.setattr(progress.time, "monotonic", mono)
    rep = progress.Reporter(rank=0, world_size=2, attempt=2, clock=clock)
    assert rep.snapshot()["stage"] == "starting"
    rep.stage("loading-model")
    rep.stage("tokenizing")
    clock.t += 5
    rep.training(total_steps=10, start_step=4, steps_per_epoch=4,
                 mfu=lambda tps: tps / 2 * 1e9 / 1e12)
    doc = rep.snapshot()
    assert doc["stage"] == "training" and doc["step"] == 4 and doc["totalSteps"] == 10
    assert doc["lastCheckpoint"]["step"] == 4  # resumed from it, so it is complete
    assert doc["tokensPerSecond"] is None and doc["etaSeconds"] is None
    # step 5 includes warm-up (not measured), then 2 s per step with 1000 tokens each
    mono.t += 30
    rep.step(5, 2.0, 1000)
    for s in (6, 7):
        mono.t += 2
        clock.t += 2
        rep.step(s, 1.0, 1000)
    rep.checkpoint(7)
    doc = rep.snapshot()
    assert doc["step"] == 7 and doc["percent"] == 70.0
    assert doc["tokensPerSecond"] == pytest.approx(500.0)
    assert doc["secondsPerStep"] == pytest.approx(2.0)
    assert doc["etaSeconds"] == pytest.approx(6.0)  # 3 steps left
    assert doc["mfu"] == pytest.approx(500.0 / 2 * 1e9 / 1e12)
    assert 1.0 < doc["loss"] < 2.0  # smoothed, not the last raw value
    assert (doc["epoch"], doc["epochs"]) == (2, 3)
    assert doc["lastCheckpoint"] == {"step": 7, "time": progress.iso(clock.t)}
    assert doc["attempt"] == 2 and doc["worldSize"] == 2
    assert doc["heartbeatTime"] == progress.iso(clock.t)
    # rank 1 never heard from: listed, with no heartbeat
    assert doc["ranks"][0]["step"] == 7
    assert doc["ranks"][1] == {"rank": 1, "stage": None, "step": None, "stepTime": None,
                               "heartbeatTime": None, "where": None}
    assert doc["ranks"][0]["where"]
    rep.heard({"rank": 1, "stage": "training", "step": 6, "stepTime": clock.t - 2,
               "heartbeatTime": clock.t - 1})
    assert progress.Reporter.snapshot(rep)["ranks"][1]["step"] == 6
    rep.stage("evaluating")
    doc = rep.snapshot()
    assert doc["stage"] == "evaluating" and doc["etaSeconds"] is None
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        rep.stage("train")


def test_no_step_advance_is_visible_while_heartbeats_go_on():
    clock = Clock()
    rep = progress.Reporter(rank=0, world_size=1, clock=clock)
    rep.training(total_steps=8, start_step=0, steps_per_epoch=8)
    rep.step(1, 3.0, 10)
    first = rep.snapshot()
    clock.t += 600
    later = rep.snapshot()
    assert later["step"] == first["step"] == 1
    assert later["stepTime"] == first["stepTime"]
    assert later["heartbeatTime"] != first["heartbeatTime"]


def test_endpoint_serves_json_and_prometheus_text():
    rep = progress.Reporter(rank=0, world_size=2)
    rep.training(total_steps=8, start_step=0, steps_per_epoch=4)
    rep.step(1, 2.5, 100)
    rep.step(2, 2.5, 100)
    rep.heard({"rank": 1, "stage": "training", "step": 2, "stepTime": 1.8e9,
               "heartbeatTime": 1.8e9 + 1})
    server = progress.serve(rep, 0, "127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/progress", timeout=5) as r:
            assert r.headers["Content-Type"] == "application/json"
            doc = json.load(r)
        assert doc["stage"] == "training" and doc["step"] == 2 and doc["loss"] == 2.5
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        assert families["flywheel_trainer_step"].samples[0].value == 2
        assert families["flywheel_trainer_total_steps"].samples[0].value == 8
        stages = {s.labels["stage"]: s.value for s in families["flywheel_trainer_stage"].samples}
        assert stages["training"] == 1 and stages["evaluating"] == 0
        beats = {s.labels["rank"]: s.value for s in
                 families["flywheel_trainer_rank_heartbeat_timestamp_seconds"].samples}
        assert beats["1"] == 1.8e9 + 1 and set(beats) == {"0", "1"}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/secrets", timeout=5)
        assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_module_hooks_are_noops_until_started():
    progress.stage("training")
    progress.step(3, 1.0, 10)
    progress.checkpoint(3)  # no reporter: nothing happens, nothing fails
    assert progress._reporter is None


def test_debug_stop_applies_to_its_attempt_and_rank_only(monkeypatch):
    class Stopped(Exception):
        pass

    def sleep(seconds):
        raise Stopped

    monkeypatch.setattr(progress.time, "sleep", sleep)
    monkeypatch.setenv("FLYWHEEL_DEBUG_STOP_AT_STEP", "3")
    monkeypatch.setenv("FLYWHEEL_ATTEMPT", "2")
    progress._debug_stop(3, 0)  # attempt 2, the switch is for attempt 1: goes on
    monkeypatch.setenv("FLYWHEEL_DEBUG_STOP_ATTEMPT", "2")
    monkeypatch.setenv("FLYWHEEL_DEBUG_STOP_RANK", "1")
    progress._debug_stop(3, 0)  # another rank
    progress._debug_stop(2, 1)  # another step
    with pytest.raises(Stopped):
        progress._debug_stop(3, 1)


def test_heartbeat_says_where_the_main_thread_waits():
    import threading

    seen, done = [], threading.Event()

    def sample():  # until the main thread is seen in its wait (a loaded machine is slow)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not done.is_set():
            seen.append(progress.where_main())
            if seen[-1].startswith("wait (threading.py:"):
                done.set()
            time.sleep(0.01)

    threading.Thread(target=sample).start()
    done.wait(10)  # the main thread waits here while the other thread looks at it
    assert seen and seen[-1].startswith("wait (threading.py:"), seen[-5:]
