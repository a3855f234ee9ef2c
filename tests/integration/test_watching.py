"""What the operator sees while runs train, against the real control plane: lost nodes, out of
memory, data errors, missing Secrets (fake and local pools)."""

from __future__ import annotations

import json
import uuid

import pytest

from hack.cluster import node
from tests.conftest import Cluster, wait_until
from tests.integration.test_operator import (
    attempt_pods,
    finish_pods,
    manifest,
    run_status,
    running_pods,
    wait_phase,
)

pytestmark = pytest.mark.cluster


def events(cluster: Cluster, ns: str, name: str) -> list[dict]:
    return cluster.get("events", "-n", ns, "--field-selector",
                       f"involvedObject.name={name},involvedObject.kind=FineTuneRun")["items"]


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def test_a_deleted_node_starts_a_new_attempt_without_spending_restarts(cluster, operator,
                                                                      namespace):
    label = {"flywheel.dev/test-node": uuid.uuid4().hex[:8]}

    def fake_h200(suffix: str) -> dict:
        n = node(f"h200-t{label['flywheel.dev/test-node']}-{suffix}",
                 {"flywheel.dev/pool": "h200", **label},
                 {"cpu": "192", "memory": "2000Gi", "nvidia.com/gpu": "8", "pods": "110"},
                 [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        cluster.apply(n)
        return n

    first = fake_h200("a")
    try:
        run = manifest("lost-node", nodes=1, restarts=0, tracking={})
        run["spec"]["resources"]["nodeSelector"] = label
        cluster.apply(run, namespace)
        running_pods(cluster, namespace, "lost-node", 1, 1)
        cluster.kubectl("delete", "node", first["metadata"]["name"])
        # the pod GC fails its pod (DisruptionTarget) ~40 s later; the Job's podFailurePolicy
        # fails the Job; the operator starts attempt 2 although maxRestarts is 0
        status = wait_until(lambda: (s := run_status(cluster, namespace, "lost-node"))
                            .get("attempt") == 2 and s.get("attempts") and s,
                            timeout=150, interval=1, message="attempt 2 after the node loss")
        assert status["phase"] == "Pending"
        assert status["attempts"][0]["reason"] == "NodeLost"
        fake_h200("b")
        pods = running_pods(cluster, namespace, "lost-node", 2, 1)
        finish_pods(cluster, namespace, pods, 0)
        done = wait_phase(cluster, namespace, "lost-node", "Succeeded")
        assert [a["reason"] for a in done["attempts"]] == ["NodeLost", "Completed"]
        assert any(e["reason"] == "AttemptDisrupted" for e in events(cluster, namespace,
                                                                    "lost-node"))
    finally:
        cluster.kubectl("delete", "nodes", "-l",
                        f"flywheel.dev/test-node={label['flywheel.dev/test-node']}", check=False)


def test_oom_killed_is_named_and_retried(cluster, operator, namespace):
    cluster.apply(manifest("oom", nodes=2, restarts=1, tracking={}), namespace)
    pods = running_pods(cluster, namespace, "oom", 1, 2)
    cluster.kubectl("annotate", "pod", pods[1]["metadata"]["name"], "-n", namespace,
                    "flywheel.dev/simulate-exit=137", "flywheel.dev/simulate-reason=OOMKilled")
    status = wait_until(lambda: (s := run_status(cluster, namespace, "oom"))
                        .get("attempt") == 2 and s.get("attempts") and s,
                        timeout=60, message="attempt 2 after OOMKilled")
    assert status["attempts"][0]["reason"] == "OOMKilled"
    assert "ran out of memory" in status["attempts"][0]["message"]


def test_a_data_error_fails_the_run_at_once(cluster, operator, namespace):
    cluster.apply(manifest("bad-data", nodes=2, restarts=3, tracking={}), namespace)
    pods = running_pods(cluster, namespace, "bad-data", 1, 2)
    words = "DataError: 1 invalid line(s) in s3://data/flow/train.jsonl: line 7: invalid JSON"
    finish_pods(cluster, namespace, pods[:1], 2, json.dumps({"error": words}))
    status = wait_phase(cluster, namespace, "bad-data", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "DataError" and words in failed["message"]
    assert [a["reason"] for a in status["attempts"]] == ["DataError"]
    assert status["attempt"] == 1 and not attempt_pods(cluster, namespace, "bad-data", 2)


def test_a_missing_secret_fails_the_run_with_the_kubelets_words(cluster, operator, namespace):
    # On the local pool the executor resolves env like a kubelet: no Secret, no container.
    run = manifest("no-secret", nodes=1, gpus=1, restarts=3)
    run["spec"]["resources"]["nodePool"] = "local"
    run["spec"]["hyperparameters"]["globalBatchSize"] = 2
    cluster.apply(run, namespace)
    status = wait_phase(cluster, namespace, "no-secret", "Failed", timeout=90)
    failed = condition(status, "Failed")
    assert failed["reason"] == "CreateContainerConfigError"
    assert 'secret "comet" not found' in failed["message"]
    assert status["attempt"] == 1


def test_the_runs_pods_are_watched_deleted_by_force_and_listed_again(cluster, namespace,
                                                                     monkeypatch):
    """The operator's own watch of the runs' Pods (watches.py) against the apiserver: only
    pods with a run's label, every change and a `delete --force` seen; a list after the watch
    lost its place forgets a pod deleted meanwhile and wakes its run."""
    from flywheel_operator import kube, objects, watches
    from flywheel_operator.vocab import RUN_LABEL
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", cluster.kubeconfig)
    kube.client.cache_clear()
    monkeypatch.setattr(watches, "WATCH_SECONDS", 5)  # the apiserver ends watches often

    def pod(name: str, labels: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": "c", "image": "busybox"}],
                         "nodeSelector": {"flywheel.dev/no-such-node": "x"}}}

    woken: list = []
    index = watches.ByRun(objects.pod_summary, woken.append)
    cluster.apply(pod("before", {"flywheel.dev/run": "r"}), namespace)
    watch = watches.Watch(index, "v1", "Pod", namespace, RUN_LABEL)
    watch.list()
    watch.start()
    try:
        key = (namespace, "r")
        assert [p.name for p in index.get(key)] == ["before"]
        cluster.apply([pod("after", {"flywheel.dev/run": "r"}), pod("other", {"app": "x"})],
                      namespace)
        # the scheduler finds no node: the pod's Unschedulable condition comes as a change
        wait_until(lambda: any(p.name == "after" and p.unschedulable for p in index.get(key)),
                   timeout=30, message="the new pod, unschedulable")
        assert index.run_of(namespace, "other") is None and len(index) == 1
        woken.clear()
        cluster.kubectl("delete", "pod", "before", "-n", namespace, "--force",
                        "--grace-period=0")
        wait_until(lambda: [p.name for p in index.get(key)] == ["after"], timeout=30,
                   message="the deleted pod forgotten")
        assert key in woken
        # watches ended by the apiserver (every 5 s here) go on from where they were
        cluster.apply(pod("later", {"flywheel.dev/run": "r"}), namespace)
        wait_until(lambda: sorted(p.name for p in index.get(key)) == ["after", "later"],
                   timeout=30, message="a pod created after a watch ended")
    finally:
        watch.stopped.set()
        kube.client.cache_clear()  # this test's: nothing else in this process uses it
    # a list (as after 410 Gone) forgets what went while no watch was open, and wakes its run
    woken = []
    stale = watches.ByRun(objects.pod_summary, woken.append)
    stale.put(key, "a-pod-deleted-meanwhile", "gone", objects.pod_summary(pod("gone", {})))
    watches.Watch(stale, "v1", "Pod", namespace, RUN_LABEL).list()
    assert sorted(p.name for p in stale.get(key)) == ["after", "later"] and key in woken


def test_a_watch_from_a_version_the_apiserver_no_longer_has_lists_again(cluster, namespace,
                                                                        monkeypatch):
    """410 Gone from the real apiserver (a watch from a resourceVersion older than its watch
    cache, as after a long disconnection): the watch lists the collection afresh, forgets a
    run deleted meanwhile and reports it, then follows from the new list's version."""
    from flywheel_operator import kube, watches
    from flywheel_operator.vocab import API_VERSION
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", cluster.kubeconfig)
    kube.client.cache_clear()
    seen: list = []
    runs = watches.ByName(watches.slim, lambda *event: seen.append(event[:2]))
    cluster.apply(manifest("kept"), namespace)
    # what the index holds from before: a run deleted while no watch was open
    gone = {"apiVersion": API_VERSION, "kind": "FineTuneRun", "spec": {},
            "metadata": {"name": "gone", "namespace": namespace, "uid": "deleted-meanwhile"}}
    runs.apply("ADDED", gone)
    watch = watches.Watch(runs, API_VERSION, "FineTuneRun", namespace)
    watch.version = "1"  # long compacted: the apiserver answers 410 Gone
    watch.start()
    try:
        wait_until(lambda: ("DELETED", (namespace, "gone")) in seen, timeout=30,
                   message="the run deleted meanwhile reported after a fresh list")
        assert (namespace, "kept") in runs and watch.version != "1"
        cluster.apply(manifest("later"), namespace)
        wait_until(lambda: (namespace, "later") in runs, timeout=30,
                   message="a run created after the fresh list")
    finally:
        watch.stopped.set()
        kube.client.cache_clear()
