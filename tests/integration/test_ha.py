"""High availability on the real control plane: two operator replicas with kopf peering. The
replica that was active and then paused (a replica of higher priority arrived, as in a rolling
update) writes nothing and polls nothing while paused; when the active one is SIGKILLed it
takes over within the peering lifetime, runs applied afterwards get their Jobs, and no run
ever has two Jobs for one attempt."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import Cluster, Operator, wait_until
from tests.integration.test_operator import manifest, running_pods, wait_phase

pytestmark = pytest.mark.cluster

CONFIG = """\
defaultImage: flywheel-trainer:dev
preflightPool: local
progressIntervalSeconds: 1
peeringLifetimeSeconds: 10
"""


def metric(log: Path, name: str, label: str = "") -> float:
    """A counter of a replica, from its /metrics (the port it logged at start-up)."""
    port = re.findall(r"metrics on port (\d+)", log.read_text())[-1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


def writes(log: Path) -> float:
    return sum(metric(log, "flywheel_api_requests_total", f'verb="{m}"')
               for m in ("POST", "PATCH", "PUT", "DELETE"))


def test_a_paused_replica_does_nothing_and_takes_over_when_the_active_one_dies(
        cluster: Cluster, operator, crds, namespace, tmp_path):
    operator.stop()  # the session's standalone operator would act on these runs too
    peering = f"ha-{uuid.uuid4().hex[:8]}"
    cluster.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                   "metadata": {"name": peering}})
    config = tmp_path / "operator.yaml"
    config.write_text(CONFIG)
    logs = {n: tmp_path / f"{n}.log" for n in ("low", "high")}
    replicas = {n: Operator(cluster.kubeconfig, logs[n], config, scope=[
        "--all-namespaces", "--peering", peering, "--priority", str(p), "--metrics-port", "-1"])
        for n, p in (("low", 10), ("high", 20))}
    try:
        replicas["low"].start()
        cluster.apply(manifest("before", nodes=1, gpus=1), namespace)
        running_pods(cluster, namespace, "before", 1, 1)
        wait_phase(cluster, namespace, "before", "Running")
        wait_until(lambda: metric(logs["low"], "flywheel_progress_polls_total") > 0,
                   message="the active replica polls the training run")

        # A replica of higher priority arrives: the low one pauses, timers and poller too.
        replicas["high"].start()
        wait_until(lambda: "flywheel operator: paused" in logs["low"].read_text(), timeout=60,
                   message="the low replica pauses")
        time.sleep(2)  # a poll or write already in flight when it paused may still land
        quiet = (writes(logs["low"]), metric(logs["low"], "flywheel_progress_polls_total"))
        cluster.apply(manifest("during", nodes=1, gpus=1), namespace)
        running_pods(cluster, namespace, "during", 1, 1)  # the high replica created it
        wait_until(lambda: metric(logs["high"], "flywheel_progress_polls_total") > 0,
                   message="the high replica polls")
        time.sleep(5)
        assert (writes(logs["low"]), metric(logs["low"], "flywheel_progress_polls_total")) \
            == quiet, "a paused replica made API writes or progress polls"

        # The active replica dies: the low one takes over within the peering lifetime, and
        # runs applied right after the kill get their Jobs within 30 s.
        replicas["high"].kill()
        cluster.apply([manifest(f"after-{i}", nodes=1, gpus=1) for i in range(3)], namespace)
        wait_until(lambda: all(cluster.get("jobs", "-n", namespace, "-l",
                                           f"flywheel.dev/run=after-{i}")["items"]
                               for i in range(3)),
                   timeout=30, interval=0.5, message="Jobs within 30 s of the kill")
        assert "flywheel operator: active" in logs["low"].read_text()
        for name in ("before", "during", *(f"after-{i}" for i in range(3))):
            jobs = cluster.get("jobs", "-n", namespace, "-l", f"flywheel.dev/run={name}")
            attempts = [j["metadata"]["labels"]["flywheel.dev/attempt"]
                        for j in jobs["items"] if not j["metadata"].get("deletionTimestamp")]
            assert len(attempts) == len(set(attempts)) == 1, (name, attempts)
    finally:
        for replica in replicas.values():
            replica.kill()
        cluster.kubectl("delete", "clusterkopfpeering", peering, check=False)
        operator.start()
