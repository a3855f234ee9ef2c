"""Live progress: where a run stands while it trains, served by rank 0 over HTTP.

Every rank keeps its own state in memory (a few attribute writes per step: nothing on the
step's critical path, no extra collective) and a daemon thread publishes it every
`FLYWHEEL_HEARTBEAT_S` seconds (default 5) to torchrun's key-value store (the c10d TCPStore at
MASTER_ADDR:MASTER_PORT, through its own client connection) under `flywheel/heartbeat/<rank>`.
The store is not a collective, so a rank that stops stepping (a hung collective, a wedged data
loader) never holds up the others' heartbeats: its last step stays visible at rank 0 while
its heartbeat goes on (the process lives) or stops (the process is gone or frozen).

Rank 0 collects every rank's heartbeat in the same thread and serves, on
`FLYWHEEL_PROGRESS_PORT` (the pod's named container port `progress`; unset or 0: off), bound
to `FLYWHEEL_BIND_HOST` (default all interfaces):

    GET /progress   JSON: stage, step, totalSteps, epoch, loss (smoothed), tokensPerSecond,
                    mfu, secondsPerStep, etaSeconds, lastCheckpoint {step, time},
                    heartbeatTime, stepTime, stageTime, ranks [{rank, stage, step, stepTime,
                    heartbeatTime}], ...
    GET /metrics    the same as Prometheus text (flywheel_trainer_*)

No Kubernetes API permission is involved: the operator reads the pod IP and the port.
Stages: loading-model, tokenizing, training, evaluating, exporting. Each rank's heartbeat
also says where its main thread is (a stack frame, sampled by the heartbeat thread), so a
rank stuck outside the collectives the others wait in stands out.

Test-only switch: `FLYWHEEL_DEBUG_STOP_AT_STEP=N` makes the trainer stop stepping (sleep
forever, heartbeats going on) after step N, in attempt `FLYWHEEL_DEBUG_STOP_ATTEMPT` (default
1, compared with `FLYWHEEL_ATTEMPT`) and on rank `FLYWHEEL_DEBUG_STOP_RANK` (default every
rank): what a hang looks like from outside.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .contract import STAGES, Env

log = logging.getLogger("flywheel.progress")
KEY = "flywheel/heartbeat/{}"
WINDOW = 20  # steps the throughput and step time are averaged over
LOSS_SMOOTHING = 0.1  # exponential moving average weight of the newest step's loss


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reporter:
    """One rank's view of its own progress; on rank 0 also every other rank's heartbeat."""

    def __init__(self, rank: int, world_size: int, attempt: int | None = None,
                 clock=time.time) -> None:
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self.clock = clock
        self.start_time = clock()
        self.stage_name, self.stage_time = "starting", self.start_time
        self.step_no, self.step_time = 0, None
        self.total_steps = self.steps_per_epoch = None
        self.loss = None
        self.mfu_of = None  # tokens/s -> model FLOPs utilisation (model.mfu), when known
        self.window: deque[tuple[int, float]] = deque(maxlen=WINDOW)  # (tokens, seconds)
        self.last_step_mono: float | None = None
        self.warm = False
        self.checkpoint_step = self.checkpoint_time = None
        self.ranks: dict[int, dict] = {}  # rank -> its last published state (rank 0)
        self.lock = threading.Lock()

    # --- what the training loop reports
    def stage(self, name: str) -> None:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r} (one of {', '.join(STAGES)})")
        self.stage_name, self.stage_time = name, self.clock()

    def training(self, total_steps: int, start_step: int, steps_per_epoch: int,
                 mfu=None) -> None:
        self.stage("training")
        self.total_steps, self.steps_per_epoch = total_steps, max(1, steps_per_epoch)
        self.step_no, self.step_time = start_step, self.clock()
        self.mfu_of = mfu
        if start_step:  # resumed: the checkpoint it resumed from is complete
            self.checkpoint_step = self.checkpoint_step or start_step
        self.last_step_mono, self.warm = time.monotonic(), False

    def step(self, step: int, loss: float | None, tokens: int) -> None:
        now = time.monotonic()
        if self.warm and self.last_step_mono is not None:
            self.window.append((tokens, now - self.last_step_mono))
        self.warm = True  # the first step after training() includes warm-up: not measured
        self.last_step_mono = now
        self.step_no, self.step_time = step, self.clock()
        if loss is not None and loss == loss:
            self.loss = loss if self.loss is None else (
                LOSS_SMOOTHING * loss + (1 - LOSS_SMOOTHING) * self.loss)
        _debug_stop(step, self.rank)

    def checkpoint(self, step: int) -> None:
        self.checkpoint_step, self.checkpoint_time = step, self.clock()

    # --- derived figures
    def tokens_per_second(self) -> float | None:
        seconds = sum(s for _, s in self.window)
        return sum(t for t, _ in self.window) / seconds if seconds > 0 else None

    def seconds_per_step(self) -> float | None:
        return sum(s for _, s in self.window) / len(self.window) if self.window else None

    def own_state(self) -> dict:
        """What this rank publishes (times as Unix seconds), with where its main thread is
        (e.g. waiting in a collective, or stuck in data loading)."""
        return {"rank": self.rank, "stage": self.stage_name, "step": self.step_no,
                "stepTime": self.step_time, "heartbeatTime": self.clock(),
                "where": where_main()}

    def heard(self, state: dict) -> None:
        with self.lock:
            self.ranks[int(state["rank"])] = state

    def snapshot(self) -> dict:
        """Rank 0's JSON document."""
        own = self.own_state()
        self.heard(own)
        tps, sps = self.tokens_per_second(), self.seconds_per_step()
        mfu = self.mfu_of(tps) if self.mfu_of and tps else None
        total = self.total_steps
        eta = (max(0, total - self.step_no) * sps
               if total is not None and sps is not None and self.stage_name == "training"
               else None)
        epoch = epochs = None
        if total is not None and self.steps_per_epoch:
            epochs = -(-total // self.steps_per_epoch)
            epoch = min(epochs, self.step_no // self.steps_per_epoch + 1)
        with self.lock:
            heard = dict(self.ranks)
        ranks = []
        for r in range(self.world_size):
            s = heard.get(r)
            ranks.append({"rank": r, "stage": s["stage"], "step": s["step"],
                          "stepTime": iso(s.get("stepTime")),
                          "heartbeatTime": iso(s.get("heartbeatTime")),
                          "where": s.get("where")}
                         if s else {"rank": r, "stage": None, "step": None, "stepTime": None,
                                    "heartbeatTime": None, "where": None})
        return {
            "stage": self.stage_name, "stageTime": iso(self.stage_time),
            "step": self.step_no, "totalSteps": total,
            "percent": round(100.0 * self.step_no / total, 1) if total else None,
            "epoch": epoch, "epochs": epochs,
            "loss": self.loss, "tokensPerSecond": tps, "mfu": mfu,
            "secondsPerStep": sps, "etaSeconds": eta,
            "lastCheckpoint": ({"step": self.checkpoint_step,
                                "time": iso(self.checkpoint_time)}
                               if self.checkpoint_step is not None else None),
            "heartbeatTime": iso(own["heartbeatTime"]), "stepTime": iso(self.step_time),
            "startTime": iso(self.start_time), "attempt": self.attempt,
            "worldSize": self.world_size, "ranks": ranks,
        }


def where_main() -> str | None:
    """Where the main thread is: its innermost frame and, when that is library code, the
    trainer's own frame that called it, e.g. `wait (distributed_c10d.py:2810) <-
    forward_backward (train.py:78)`."""
    import sys

    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return None

    def name(f) -> str:
        return f"{f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"

    inner, own = frame, None
    while frame is not None and own is None:
        if "flywheel_trainer" in frame.f_code.co_filename:
            own = frame
        frame = frame.f_back
    return name(inner) if own in (None, inner) else f"{name(inner)} <- {name(own)}"


def prometheus_text(doc: dict) -> bytes:
    """The JSON document as Prometheus exposition text."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    def ts(value: str | None) -> float | None:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=UTC).timestamp() if value else None

    class Collector:
        def collect(self):
            plain = [("step", "Optimizer steps done.", doc["step"]),
                     ("total_steps", "Optimizer steps planned.", doc["totalSteps"]),
                     ("loss", "Training loss (smoothed).", doc["loss"]),
                     ("tokens_per_second", "Non-padding tokens per second.",
                      doc["tokensPerSecond"]),
                     ("mfu", "Model FLOPs utilisation.", doc["mfu"]),
                     ("eta_seconds", "Estimated seconds of training left.", doc["etaSeconds"]),
                     ("last_checkpoint_step", "Step of the last complete checkpoint.",
                      (doc["lastCheckpoint"] or {}).get("step")),
                     ("heartbeat_timestamp_seconds", "Rank 0's last heartbeat.",
                      ts(doc["heartbeatTime"]))]
            for name, text, value in plain:
                if value is not None:
                    yield GaugeMetricFamily(f"flywheel_trainer_{name}", text, value=value)
            stage = GaugeMetricFamily("flywheel_trainer_stage", "1 for the current stage.",
                                      labels=["stage"])
            for s in STAGES:
                stage.add_metric([s], 1.0 if s == doc["stage"] else 0.0)
            yield stage
            step = GaugeMetricFamily("flywheel_trainer_rank_step", "Each rank's last step.",
                                     labels=["rank"])
            beat = GaugeMetricFamily("flywheel_trainer_rank_heartbeat_timestamp_seconds",
                                     "Each rank's last heartbeat.", labels=["rank"])
            for r in doc["ranks"]:
                if r["heartbeatTime"] is not None:
                    step.add_metric([str(r["rank"])], r["step"])
                    beat.add_metric([str(r["rank"])], ts(r["heartbeatTime"]))
            yield step
            yield beat

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


def serve(reporter: Reporter, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve `reporter` on host:port from a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path in ("/", "/progress"):
                body, kind = json.dumps(reporter.snapshot()).encode(), "application/json"
            elif path == "/metrics":
                body = prometheus_text(reporter.snapshot())
                kind = "text/plain; version=0.0.4; charset=utf-8"
            else:
                self.send_error(404, "try /progress or /metrics")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # one line per poll would flood the pod log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="flywheel-progress-http",
                     daemon=True).start()
    return server


class Heartbeat:
    """Publishes this rank's state to the c10d store and, on rank 0, reads everybody's."""

    def __init__(self, reporter: Reporter, interval: float) -> None:
        self.reporter, self.interval = reporter, interval
        self.stopped = threading.Event()
        self.store = None
        self.warned = False
        threading.Thread(target=self.loop, name="flywheel-heartbeat", daemon=True).start()

    def connect(self):
        import torch.distributed as dist

        return dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                             int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(10.0, self.interval)),
                             wait_for_workers=False)

    def tick(self) -> None:
        rep = self.reporter
        if self.store is None:
            self.store = self.connect()
        self.store.set(KEY.format(rep.rank), json.dumps(rep.own_state()))
        if rep.rank != 0:
            return
        for r in range(1, rep.world_size):
            key = KEY.format(r)
            if self.store.check([key]):
                rep.heard(json.loads(self.store.get(key)))

    def loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.tick()
            except Exception as err:  # observability must never stop training
                self.store = None
                if not self.warned:
                    log.warning("heartbeat: %s (will keep trying)", err)
                    self.warned = True


# ---- the process's reporter: train.py calls these (no-ops until start())
_reporter: Reporter | None = None
_server: ThreadingHTTPServer | None = None
_heartbeat: Heartbeat | None = None


def start(rank: int, world_size: int) -> Reporter:
    """Create this process's reporter; rank 0 serves it; ranks publish heartbeats to the
    store when there is more than one."""
    global _reporter, _server, _heartbeat
    attempt = os.environ.get(Env.ATTEMPT)
    _reporter = Reporter(rank, world_size, int(attempt) if attempt else None)
    port = int(os.environ.get(Env.PROGRESS_PORT) or 0)
    if rank == 0 and port:
        host = os.environ.get("FLYWHEEL_BIND_HOST") or "0.0.0.0"
        try:
            _server = serve(_reporter, port, host)
            log.info("progress on http://%s:%d/progress", host, port)
        except OSError as err:  # never fail a run over its progress page
            log.warning("cannot serve progress on %s:%d: %s", host, port, err)
    if world_size > 1 and os.environ.get("MASTER_PORT"):
        _heartbeat = Heartbeat(_reporter, float(os.environ.get("FLYWHEEL_HEARTBEAT_S") or 5))
    return _reporter


def stop() -> None:
    global _reporter, _server, _heartbeat
    if _heartbeat:
        _heartbeat.stopped.set()
    if _server:
        _server.shutdown()
        _server.server_close()
    _reporter = _server = _heartbeat = None


def stage(name: str) -> None:
    if _reporter:
        _reporter.stage(name)


def training(total_steps: int, start_step: int, steps_per_epoch: int, mfu=None) -> None:
    """Training begins at `start_step`; `mfu(tokens_per_s)` gives the MFU (GPU runs)."""
    if _reporter:
        _reporter.training(total_steps, start_step, steps_per_epoch, mfu)


def step(step: int, loss: float | None, tokens: int) -> None:
    if _reporter:
        _reporter.step(step, loss, tokens)


def checkpoint(step: int) -> None:
    if _reporter:
        _reporter.checkpoint(step)


def _debug_stop(step: int, rank: int) -> None:
    at = os.environ.get("FLYWHEEL_DEBUG_STOP_AT_STEP")
    if not at or int(at) != step:
        return
    if os.environ.get("FLYWHEEL_ATTEMPT", "1") != os.environ.get(
            "FLYWHEEL_DEBUG_STOP_ATTEMPT", "1"):
        return
    only = os.environ.get("FLYWHEEL_DEBUG_STOP_RANK")
    if only not in (None, "") and int(only) != rank:
        return
    log.warning("FLYWHEEL_DEBUG_STOP_AT_STEP=%s: rank %d stops stepping", at, rank)
    while True:
        time.sleep(3600)
