"""A gang survives a lost member, on the real control plane: a rank drained off its node or
deleted (even with --force, when the Job controller replaces it at once) ends the attempt as
a disruption; attempt 2 starts (resuming from the last checkpoint) without spending
maxRestarts, and status.attempts records why."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster, wait_until
from tests.integration.test_operator import manifest, running_pods, wait_phase

pytestmark = pytest.mark.cluster


def attempt_two(cluster: Cluster, namespace: str, name: str) -> dict:
    status = wait_until(lambda: (s := cluster.get("ftr", name, "-n", namespace).get(
        "status") or {}).get("attempt") == 2 and s.get("attempts") and s,
        timeout=120, message=f"{name} starts attempt 2")
    running_pods(cluster, namespace, name, 2, 2)
    return status


def test_a_drained_node_under_a_gang_starts_the_next_attempt(cluster: Cluster, operator,
                                                             namespace):
    cluster.apply(manifest("drained", nodes=2, gpus=1, restarts=0), namespace)
    pods = running_pods(cluster, namespace, "drained", 1, 2)
    wait_phase(cluster, namespace, "drained", "Running")
    node = pods[1]["spec"]["nodeName"]
    try:
        cluster.kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data",
                        "--timeout=90s", timeout=120)
        status = attempt_two(cluster, namespace, "drained")
    finally:
        cluster.kubectl("uncordon", node)
    (first,) = status["attempts"]
    assert first["attempt"] == 1 and first["reason"] in ("Evicted", "PodDeleted"), first
    assert status["phase"] != "Failed", "maxRestarts: 0 is not spent by a disruption"


def test_a_rank_deleted_with_force_starts_the_next_attempt(cluster: Cluster, operator,
                                                           namespace):
    cluster.apply(manifest("forced", nodes=2, gpus=1, restarts=0), namespace)
    pods = running_pods(cluster, namespace, "forced", 1, 2)
    wait_phase(cluster, namespace, "forced", "Running")
    victim = pods[1]["metadata"]["name"]
    cluster.kubectl("delete", "pod", victim, "-n", namespace, "--force", "--grace-period=0")
    status = attempt_two(cluster, namespace, "forced")
    (first,) = status["attempts"]
    assert first["reason"] == "PodDeleted" and victim in first["message"], first
    assert status["phase"] != "Failed"
    # the replacement pod the Job controller made for attempt 1 went with its Job
    wait_until(lambda: not cluster.get("jobs", "-n", namespace, "-l",
                                       "flywheel.dev/run=forced,flywheel.dev/attempt=1")["items"],
               message="attempt 1's Job is deleted")
