"""The status at the edge: the reconciler parses the run from its index once, writes the plan's
status as a JSON merge patch only where it changed, and removes a field the plan dropped."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import pytest
from flywheel_operator import kube, reconciler, render
from flywheel_operator.config import OperatorConfig

from .conftest_data import make_body
from .test_lifecycle import job, pod

KEY = ("ns", "r")


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    done: list[tuple] = []
    monkeypatch.setattr(kube, "patch_status", lambda kind, ns, name, st: done.append(
        ("status", copy.deepcopy(st))))
    monkeypatch.setattr(kube, "create_owned", lambda obj, ns, uid: done.append(
        ("create", obj["kind"])))
    monkeypatch.setattr(kube, "create", lambda obj, ns: done.append(
        ("create", obj["metadata"]["name"])) or True)  # the namespace's fence
    monkeypatch.setattr(kube, "patch", lambda *a, **k: done.append(("patch", a[1])))
    monkeypatch.setattr(kube, "get", lambda *a: None)
    monkeypatch.setattr(kube, "post_event", lambda obj, type, reason, message: done.append(
        ("event", reason)))
    return done


def test_the_status_is_written_once_and_a_dropped_field_is_removed(calls):
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False},
                        resources={"nodes": 2, "gpusPerNode": 8}), "status": {}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={}, models={})
    rec.reconcile_run(KEY)
    (status,) = [c[1] for c in calls if c[0] == "status"]
    assert status["phase"] == "Pending" and None not in status.values()
    # The Job last, after the status (its parts may be created while the status is written).
    assert calls[-2:] == [("create", "Job"), ("event", "AttemptCreated")]
    assert "attempts" not in status and status["conditions"][0]["type"] == "Suspended"
    calls.clear()
    # The watch has delivered neither the write nor the Job: nothing is created or written
    # again until the Job this reconcile expects is in the index.
    rec.reconcile_run(KEY)
    assert calls == []

    uid = body["metadata"]["uid"]
    rec.index["run_jobs"] = {KEY: [dataclasses.replace(job(1), owner=uid, uid="j1")]}
    rec.index["run_pods"] = {KEY: [dataclasses.replace(pod(1, i), job="j1") for i in (0, 1)]}
    rec.reconcile_run(KEY)
    assert calls[-2][1]["gang"] == {"attempt": 1, "pods": ["r-a1-0", "r-a1-1"]}
    calls.clear()
    delivered = copy.deepcopy(body)  # the watch delivers the write; then spec.suspend
    delivered["metadata"]["resourceVersion"] = "2"
    delivered["status"] = rec.written[KEY].status
    delivered["spec"]["suspend"] = True
    rec.index["runs"] = {KEY: [delivered]}
    rec.reconcile_run(KEY)
    (_, status), *rest = calls
    assert status["phase"] == "Suspended" and status["gang"] is None  # null removes it
    assert rest == [("patch", "Job"), ("event", "Suspended")]


def test_a_first_lone_job_goes_first_and_its_status_follows_once_with_its_event(calls):
    # Nothing between apply and Job but the Job; the Job's own event (with its pods' first
    # news) writes the status, once: at a fleet's scale, a PATCH per run less.
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False}), "status": {}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={}, models={})
    rec.reconcile_run(KEY)
    assert calls == [("create", "flywheel-trainers"), ("create", "Job"),
                     ("event", "AttemptCreated")]
    calls.clear()
    rec.reconcile_run(KEY)  # the watch has not shown the Job yet: nothing again
    assert calls == []
    uid = body["metadata"]["uid"]
    created = dataclasses.replace(job(1), owner=uid, uid="j1", created="2026-12-08T01:00:00Z")
    rec.index["run_jobs"] = {KEY: [created]}
    rec.index["run_pods"] = {KEY: [dataclasses.replace(pod(1, 0, phase="Pending"), job="j1",
                                                      node=None)]}
    rec.reconcile_run(KEY)
    (status,) = [c[1] for c in calls if c[0] == "status"]
    assert status["attempt"] == 1 and status["phase"] == "Pending"
    assert status["message"] == "attempt 1: 0/1 pod(s) running"
    assert status["startTime"] == "2026-12-08T01:00:00Z"  # when its Job was created
    assert status["experimentKey"] and status["outputUri"]
    assert not [c for c in calls if c[0] == "event"]  # announced once, with the Job
    calls.clear()
    delivered = copy.deepcopy(body)
    delivered["metadata"]["resourceVersion"] = "2"
    delivered["status"] = rec.written[KEY].status
    rec.index["runs"] = {KEY: [delivered]}
    rec.reconcile_run(KEY)
    assert calls == []


def test_a_new_attempt_takes_its_cards_baseline_from_the_model_index(monkeypatch):
    # The promoted version's metrics reach the card; the Model comes from the operator's
    # index, not a GET per attempt (at a fleet's scale, one request per run for nothing).
    created, gets = [], []
    monkeypatch.setattr(kube, "patch_status", lambda *a: None)
    monkeypatch.setattr(kube, "create_owned", lambda obj, ns, uid: created.append(obj))
    monkeypatch.setattr(kube, "create", lambda obj, ns: True)
    monkeypatch.setattr(kube, "post_event", lambda *a: None)
    mv = {"metadata": {"name": "agent-v3"}, "spec": {"metrics": {"tool_call_accuracy": 0.9}}}
    monkeypatch.setattr(kube, "get", lambda api, kind, ns, name: gets.append(kind) or (
        mv if (kind, name) == ("ModelVersion", "agent-v3") else None))
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False}, modelName="agent"),
            "status": {}}
    model = {"metadata": {"name": "agent", "namespace": "ns"}, "spec": {},
             "status": {"aliases": {"production": {"modelVersion": "agent-v3"}}}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={},
                     models={("ns", "agent"): [model]})
    rec.reconcile_run(KEY)
    (job_,) = [o for o in created if o["kind"] == "Job"]
    config = job_["spec"]["template"]["metadata"]["annotations"][render.CONFIG_ANNOTATION]
    assert json.loads(config)["baseline"]["metrics"] == {"tool_call_accuracy": 0.9}
    assert gets == ["ModelVersion"]


def test_our_own_earlier_write_arriving_late_is_not_news(monkeypatch):
    # The index lags behind two writes of ours (Pending, then Running, both over version 1);
    # when the first of them arrives it is older than what we wrote last: nothing is written
    # again and no second "Running" event is posted.
    versions, writes, events = iter(["2", "3"]), [], []
    monkeypatch.setattr(kube, "patch_status", lambda kind, ns, name, st: writes.append(
        copy.deepcopy(st)) or {"metadata": {"resourceVersion": next(versions)}})
    monkeypatch.setattr(kube, "create_owned", lambda obj, ns, uid: True)
    monkeypatch.setattr(kube, "create", lambda obj, ns: True)
    monkeypatch.setattr(kube, "post_event", lambda obj, type, reason, message: events.append(
        reason))
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False},
                        resources={"nodes": 2, "gpusPerNode": 8}), "status": {}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={}, models={})
    rec.reconcile_run(KEY)
    uid = body["metadata"]["uid"]
    rec.index["run_jobs"] = {KEY: [dataclasses.replace(job(1), owner=uid, uid="j1")]}
    rec.index["run_pods"] = {KEY: [dataclasses.replace(pod(1, i), job="j1") for i in (0, 1)]}
    rec.reconcile_run(KEY)
    assert [w["phase"] for w in writes] == ["Pending", "Running"]
    for version, status in (("2", writes[0]), ("3", writes[1])):  # the watch catches up
        rec.index["runs"] = {KEY: [{**body, "metadata": {**body["metadata"],
                                                         "resourceVersion": version},
                                    "status": status}]}
        rec.reconcile_run(KEY)
    assert len(writes) == 2 and events.count("Running") == 1


def test_a_namespaces_first_attempt_puts_its_fence_in_place_before_the_job(calls, monkeypatch):
    # One NetworkPolicy per namespace fences every trainer pod from its first moment; a
    # one-node attempt adds none of its own (a request per run less at a fleet's scale).
    rec = reconciler.Reconciler(OperatorConfig())
    runs = {(ns, r): [{**make_body(r, ns, f"u-{ns}-{r}", preflight={"enabled": False}),
                       "status": {}}] for ns in ("a", "b") for r in ("r1", "r2")}
    rec.index.update(runs=runs, run_jobs={}, run_pods={}, models={})
    for key in runs:
        rec.reconcile_run(key)
    creates = [c[1] for c in calls if c[0] == "create"]
    assert creates == ["flywheel-trainers", "Job", "Job"] * 2
    # A run deleted (its namespace may be going): the next attempt there checks again; a
    # fence found in place is brought to this operator's config.
    rec.run_deleted(("a", "r1"), "m")
    calls.clear()
    monkeypatch.setattr(kube, "create", lambda obj, ns: calls.append(("exists", ns)) and False)
    rec.index["runs"][("a", "r3")] = [{**make_body("r3", "a", "u3", preflight={"enabled": False}),
                                       "status": {}}]
    rec.reconcile_run(("a", "r3"))
    assert [c for c in calls if c[0] != "status"][:3] == [
        ("exists", "a"), ("patch", "NetworkPolicy"), ("create", "Job")]


def test_a_burst_of_runs_in_a_new_namespace_puts_its_fence_there_once(calls, monkeypatch):
    # The reconcile workers start a burst's runs at once: one of them creates the fence, the
    # others wait for it rather than each create it and patch the one they find.
    import time

    fences = []

    def slow_create(obj, ns):
        fences.append(ns)
        time.sleep(0.05)
        return True

    monkeypatch.setattr(kube, "create", slow_create)
    rec = reconciler.Reconciler(OperatorConfig())
    threads = [threading.Thread(target=rec.fence, args=("team",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fences == ["team"] and not [c for c in calls if c[0] == "patch"]


def test_policies_turned_off_remove_a_fence_left_from_before(calls, monkeypatch):
    deleted = []
    monkeypatch.setattr(kube, "delete", lambda api, kind, ns, name: deleted.append((kind, name)))
    off = OperatorConfig.model_validate({"networkPolicy": {"enabled": False}})
    rec = reconciler.Reconciler(off)
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False},
                        resources={"nodes": 2, "gpusPerNode": 8}), "status": {}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={}, models={})
    rec.reconcile_run(KEY)
    assert deleted == [("NetworkPolicy", "flywheel-trainers")]
    assert [c[1] for c in calls if c[0] == "create"] == ["Service", "Job"]


def test_a_later_attempt_records_its_status_before_its_job(calls):
    # Attempt 2's status records attempt 1's failure and spends the budget: it lands before
    # the Job, so a crash in between never starts an attempt the status does not account for.
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False}, maxRestarts=1),
            "status": {"phase": "Running", "attempt": 1}}
    uid = body["metadata"]["uid"]
    failed = dataclasses.replace(job(1), owner=uid, uid="j1", failed="BackoffLimitExceeded")
    rec.index.update(runs={KEY: [body]}, models={}, run_jobs={KEY: [failed]},
                     run_pods={KEY: []})
    rec.reconcile_run(KEY)
    (status,) = [c[1] for c in calls if c[0] == "status"]
    assert status["attempt"] == 2
    assert calls.index(("status", status)) < calls.index(("create", "Job"))


def test_a_first_lone_job_that_cannot_be_created_leaves_its_status_saying_so(calls,
                                                                             monkeypatch):
    # Refused (admission, quota...): the status records the attempt being created, and the
    # reconcile fails, to be retried with backoff (waker.Waker).
    from kubernetes.client.exceptions import ApiException

    def refused(obj, ns, uid):
        raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setattr(kube, "create_owned", refused)
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False}), "status": {}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={}, models={})
    with pytest.raises(ApiException):
        rec.reconcile_run(KEY)
    (status,) = [c[1] for c in calls if c[0] == "status"]
    assert status["phase"] == "Pending" and status["attempt"] == 1
    assert KEY not in rec.expected


def test_a_job_whose_status_write_was_lost_is_adopted(calls):
    # A crash (or a failed write) between the first attempt's Job and its status: the next
    # reconcile finds a Job its run records no attempt for, and records the start.
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False}), "status": {}}
    uid = body["metadata"]["uid"]
    rec.index.update(runs={KEY: [body]}, models={},
                     run_jobs={KEY: [dataclasses.replace(job(1), owner=uid, uid="j1")]},
                     run_pods={KEY: [dataclasses.replace(pod(1, 0), job="j1")]})
    rec.reconcile_run(KEY)
    assert not [c for c in calls if c[0] == "create"]  # nothing created twice
    (status,) = [c[1] for c in calls if c[0] == "status"]
    assert status["attempt"] == 1 and status["phase"] == "Running"
    assert status["startTime"] and status["experimentKey"] and status["outputUri"]


def test_a_later_or_multi_node_attempt_still_writes_its_status_before_its_job(calls):
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1", preflight={"enabled": False},
                        resources={"nodes": 2, "gpusPerNode": 8}), "status": {}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={}, models={})
    rec.reconcile_run(KEY)
    (status,) = [c for c in calls if c[0] == "status"]
    assert calls.index(status) < calls.index(("create", "Job"))


def test_a_first_job_after_its_preflight_follows_its_status(calls):
    # A preflight wrote the run's status already (attempt 1): no later event would adopt the
    # Job, so the attempt's start (its Comet experiment) is recorded before the Job.
    rec = reconciler.Reconciler(OperatorConfig())
    body = {**make_body("r", "ns", "u1"),
            "status": {"phase": "Pending", "attempt": 1, "startTime": "2026-12-08T01:00:00Z",
                       "preflight": {"phase": "Succeeded"}}}
    rec.index.update(runs={KEY: [body]}, run_jobs={}, run_pods={}, models={})
    rec.reconcile_run(KEY)
    (status,) = [c for c in calls if c[0] == "status"]
    assert calls.index(status) < calls.index(("create", "Job"))
    assert status[1]["experimentKey"]
