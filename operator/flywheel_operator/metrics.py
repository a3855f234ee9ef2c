"""Prometheus metrics served by the operator (port: `--metrics-port`, default 9090; 0: off)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .api import FineTuneRunStatus
from .vocab import RUN_PHASES, parse_time

RECONCILE = Histogram(
    "flywheel_reconcile_duration_seconds", "Time to decide and act on one FineTuneRun event.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
ATTEMPTS = Counter("flywheel_attempts", "Attempts started (first attempts and restarts).",
                   ["namespace"])
RESTARTS = Counter("flywheel_restarts", "Attempts started after a failed attempt.", ["namespace"])
POLLS = Counter("flywheel_progress_polls", "Progress polls of training runs' rank 0.")
GPU_HOURS = Counter("flywheel_gpu_hours", "GPU-hours consumed (live while attempts train).",
                    ["namespace", "model"])
COST = Counter("flywheel_estimated_cost", "Estimated cost of finished attempts (GPU-hours x "
               "the pool's gpuHourPrice).", ["namespace", "model"])
PROMOTIONS = Counter("flywheel_promotions", "Aliases moved by a promotion decision.",
                     ["namespace", "model", "alias"])
API_REQUESTS = Counter("flywheel_api_requests", "Kubernetes API requests made by the operator "
                       "(kopf's own watch streams excluded).", ["verb"])
STALLS = Counter("flywheel_run_stalls", "Attempts torn down as Stalled (no heartbeat or no "
                 "step advance).", ["namespace", "run", "model"])
GATE_FAILURES = Counter("flywheel_gate_failures", "Promotion gates that blocked a candidate.",
                        ["namespace", "model", "gate"])


#: Per training run, from status.progress: (metric, help, how to read it from status).
RUN_GAUGES = [
    ("flywheel_run_progress_percent", "Optimizer steps done, percent of planned.",
     lambda p, now: 100.0 * p["step"] / p["totalSteps"] if p.get("totalSteps") else None),
    ("flywheel_run_step", "Optimizer steps done.", lambda p, now: p.get("step")),
    ("flywheel_run_loss", "Training loss (smoothed).", lambda p, now: p.get("loss")),
    ("flywheel_run_tokens_per_second", "Non-padding tokens/s over all GPUs.",
     lambda p, now: p.get("tokensPerSecond")),
    ("flywheel_run_mfu", "Model FLOPs utilisation.", lambda p, now: p.get("mfu")),
    ("flywheel_run_eta_seconds", "Seconds of training left (estimate).",
     lambda p, now: max(0.0, parse_time(p["eta"]).timestamp() - now) if p.get("eta") else None),
    ("flywheel_run_heartbeat_age_seconds", "Seconds since rank 0's last heartbeat.",
     lambda p, now: now - parse_time(p["heartbeatTime"]).timestamp()
     if p.get("heartbeatTime") else None),
]


class _RunsByPhase:
    """`flywheel_runs{phase}` and the per-run `flywheel_run_*` gauges of Running runs, straight
    from the operator's index of runs: always exact, and a finished run's series go away."""

    def __init__(self) -> None:
        self.index: Mapping | None = None

    def runs(self) -> list[dict]:
        """The indexed runs, each list copied in one C call: kopf's event loop changes the
        index while a scrape reads it from the metrics server's thread."""
        index = self.index or {}
        return [run for key in list(index) for run in list(index.get(key, ()))]

    def collect(self):
        family = GaugeMetricFamily("flywheel_runs", "FineTuneRuns by phase.", labels=["phase"])
        tally: Tally[str] = Tally()
        runs = self.runs()
        for run in runs:
            tally[(run.get("status") or {}).get("phase") or "Pending"] += 1
        for phase in RUN_PHASES:
            family.add_metric([phase], tally[phase])
        yield family
        labels = ["namespace", "run", "model"]
        gauges = [(GaugeMetricFamily(name, text, labels=labels), read)
                  for name, text, read in RUN_GAUGES]
        now = time.time()
        for run in runs:
            status = run.get("status") or {}
            if status.get("phase") != "Running" or not status.get("progress"):
                continue
            key = [run["metadata"].get("namespace", ""), run["metadata"]["name"],
                   run["spec"].get("modelName", "")]
            for family, read in gauges:
                value = read(status["progress"], now)
                if value is not None:
                    family.add_metric(key, value)
        for family, _ in gauges:
            yield family


_runs = _RunsByPhase()
REGISTRY.register(_runs)


class _Tables:
    """`flywheel_operator_table_entries{table}`: the entries the operator keeps per table
    (locks, written statuses, poll targets, wake-ups...). They follow the live runs; one that
    grows while the runs do not is a leak."""

    def __init__(self) -> None:
        self.sizes: dict[str, Callable[[], int]] = {}

    def collect(self):
        family = GaugeMetricFamily("flywheel_operator_table_entries",
                                   "Entries in the operator's in-memory tables.",
                                   labels=["table"])
        for table, size in sorted(self.sizes.items()):
            family.add_metric([table], size())
        yield family


_tables = _Tables()
REGISTRY.register(_tables)


def track_table(table: str, size: Callable[[], int]) -> None:
    _tables.sizes[table] = size


def forget_run(namespace: str, run: str, model: str) -> None:
    """A deleted run's own series go with it."""
    with contextlib.suppress(KeyError):
        STALLS.remove(namespace, run, model)


def count_spend(namespace: str, model: str, old: FineTuneRunStatus,
                new: FineTuneRunStatus) -> None:
    """Add what a status write adds to a run's GPU-hours and estimated cost."""
    used = (new.gpuHours or 0) - (old.gpuHours or 0)
    if used > 0:
        GPU_HOURS.labels(namespace, model).inc(used)
    spent = (new.estimatedCost or 0) - (old.estimatedCost or 0)
    if spent > 0:
        COST.labels(namespace, model).inc(spent)


def track_runs(index: Mapping) -> None:
    _runs.index = index


def serve(port: int) -> int | None:
    """Serve /metrics on `port` (0: off; -1: a port the OS picks, logged, for tests)."""
    if not port:
        return None
    server, _ = start_http_server(max(port, 0))
    bound = server.server_port
    logging.getLogger("flywheel").warning("flywheel operator: metrics on port %d", bound)
    return bound
