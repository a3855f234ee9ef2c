"""Prometheus metrics served by the operator (port: `--metrics-port`, default 9090; 0: off)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .vocab import RUN_PHASES

RECONCILE = Histogram(
    "flywheel_reconcile_duration_seconds", "Time to decide and act on one FineTuneRun event.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
ATTEMPTS = Counter("flywheel_attempts", "Attempts started (first attempts and restarts).",
                   ["namespace"])
RESTARTS = Counter("flywheel_restarts", "Attempts started after a failed attempt.", ["namespace"])
GPU_HOURS = Counter("flywheel_gpu_hours", "GPU-hours consumed by finished attempts.",
                    ["namespace", "model"])
COST = Counter("flywheel_estimated_cost", "Estimated cost of finished attempts (GPU-hours x "
               "the pool's gpuHourPrice).", ["namespace", "model"])
PROMOTIONS = Counter("flywheel_promotions", "Aliases moved by a promotion decision.",
                     ["namespace", "model", "alias"])
API_REQUESTS = Counter("flywheel_api_requests", "Kubernetes API requests made by the operator "
                       "(kopf's own watch streams and event posts excluded).", ["verb"])
GATE_FAILURES = Counter("flywheel_gate_failures", "Promotion gates that blocked a candidate.",
                        ["namespace", "model", "gate"])


class _RunsByPhase:
    """`flywheel_runs{phase}` straight from the operator's index of runs: always exact."""

    def __init__(self) -> None:
        self.index: Mapping | None = None

    def collect(self):
        family = GaugeMetricFamily("flywheel_runs", "FineTuneRuns by phase.", labels=["phase"])
        tally: Tally[str] = Tally()
        for store in (self.index or {}).values():
            for run in store:
                tally[(run.get("status") or {}).get("phase") or "Pending"] += 1
        for phase in RUN_PHASES:
            family.add_metric([phase], tally[phase])
        yield family


_runs = _RunsByPhase()
REGISTRY.register(_runs)


def track_runs(index: Mapping) -> None:
    _runs.index = index


def serve(port: int) -> None:
    if port:
        start_http_server(port)
