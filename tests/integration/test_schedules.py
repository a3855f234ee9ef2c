"""FineTuneSchedule on the real control plane, driven by the `flywheel.dev/trigger` annotation."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster, wait_until
from tests.integration.test_operator import (
    finish_pods,
    manifest,
    running_pods,
    wait_phase,
)
from tests.integration.test_registry import summary

pytestmark = pytest.mark.cluster


def schedule(name: str, policy: str = "Forbid", successful: int = 3, failed: int = 1) -> dict:
    spec = manifest("unused", nodes=1, gpus=1)["spec"]
    spec["dataset"] = {"train": "s3://data/flow/{{ isoWeek }}/train.jsonl",
                       "eval": "s3://data/flow/{{isoWeek}}/eval-{{ date }}.jsonl"}
    return {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneSchedule",
        "metadata": {"name": name},
        "spec": {"schedule": "0 3 * * 1", "timeZone": "Europe/Berlin",
                 "concurrencyPolicy": policy, "successfulRunsHistoryLimit": successful,
                 "failedRunsHistoryLimit": failed,
                 "runTemplate": {"metadata": {"labels": {"team": "flow"}}, "spec": spec}},
    }


def runs_of(cluster: Cluster, ns: str, name: str) -> list[dict]:
    items = cluster.get("ftr", "-n", ns, "-l", f"flywheel.dev/schedule={name}")["items"]
    return [r for r in items if not r["metadata"].get("deletionTimestamp")]


def trigger(cluster: Cluster, ns: str, name: str, value: str) -> None:
    cluster.kubectl("annotate", "fts", name, "-n", ns, "--overwrite",
                    f"flywheel.dev/trigger={value}")


def finish(cluster: Cluster, ns: str, run: str, code: int = 0, message: str = "") -> None:
    pods = running_pods(cluster, ns, run, 1, 1)
    finish_pods(cluster, ns, pods, code, message)
    wait_phase(cluster, ns, run, "Succeeded" if code == 0 else "Failed")


def test_trigger_creates_a_run_with_this_weeks_data(cluster, operator, namespace):
    cluster.apply(schedule("weekly"), namespace)
    trigger(cluster, namespace, "weekly", "now-1")
    (run,) = wait_until(lambda: runs_of(cluster, namespace, "weekly"), message="a run")
    train = run["spec"]["dataset"]["train"]
    assert "{{" not in train and train.startswith("s3://data/flow/20")
    week = train.split("/")[4]
    assert week[4:6] == "-w" and week[6:].isdigit()
    assert run["spec"]["dataset"]["eval"].startswith(f"s3://data/flow/{week}/eval-20")
    assert run["metadata"]["labels"]["team"] == "flow"
    assert run["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSchedule"

    status = wait_until(lambda: cluster.get("fts", "weekly", "-n", namespace).get("status", {})
                        .get("active"), message="schedule status lists the active run")
    assert status == [run["metadata"]["name"]]
    fts = cluster.get("fts", "weekly", "-n", namespace)["status"]
    assert fts["nextScheduleTime"]
    # The same trigger value never starts a second run.
    trigger(cluster, namespace, "weekly", "now-1")
    finish(cluster, namespace, run["metadata"]["name"], 0, summary("fts-1", 1.0, 0.9))
    table = cluster.kubectl("get", "fts", "weekly", "-n", namespace).stdout
    assert "0 3 * * 1" in table and run["metadata"]["name"] in table and "Succeeded" in table
    assert len(runs_of(cluster, namespace, "weekly")) == 1


def test_forbid_waits_for_the_active_run(cluster, operator, namespace):
    cluster.apply(schedule("forbid", "Forbid"), namespace)
    trigger(cluster, namespace, "forbid", "a")
    (first,) = wait_until(lambda: runs_of(cluster, namespace, "forbid"))
    trigger(cluster, namespace, "forbid", "b")
    wait_until(lambda: any(c["type"] == "Waiting" and c["status"] == "True" for c in
                           cluster.get("fts", "forbid", "-n", namespace)["status"]
                           .get("conditions", [])), message="Waiting condition")
    assert len(runs_of(cluster, namespace, "forbid")) == 1
    finish(cluster, namespace, first["metadata"]["name"], 0, summary("forbid", 1.0, 0.9))
    wait_until(lambda: len(runs_of(cluster, namespace, "forbid")) == 2,
               timeout=90, message="the held trigger starts once the first run finished")


def test_replace_deletes_the_active_run(cluster, operator, namespace):
    cluster.apply(schedule("replace", "Replace"), namespace)
    trigger(cluster, namespace, "replace", "a")
    (first,) = wait_until(lambda: runs_of(cluster, namespace, "replace"))
    trigger(cluster, namespace, "replace", "b")
    (second,) = wait_until(lambda: (r := runs_of(cluster, namespace, "replace")) and len(r) == 1
                           and r[0]["metadata"]["name"] != first["metadata"]["name"] and r,
                           message="replaced")
    assert second["metadata"]["annotations"]["flywheel.dev/trigger"] == "b"


def test_allow_runs_concurrently(cluster, operator, namespace):
    cluster.apply(schedule("allow", "Allow"), namespace)
    trigger(cluster, namespace, "allow", "a")
    wait_until(lambda: len(runs_of(cluster, namespace, "allow")) == 1)
    trigger(cluster, namespace, "allow", "b")
    wait_until(lambda: len(runs_of(cluster, namespace, "allow")) == 2, message="two runs")


def test_history_limits_delete_old_runs_but_keep_model_versions(cluster, operator, namespace):
    cluster.apply(schedule("hist", "Allow", successful=1, failed=1), namespace)
    names = []
    for i in range(2):
        trigger(cluster, namespace, "hist", f"t{i}")
        run = wait_until(lambda: [r for r in runs_of(cluster, namespace, "hist")
                                  if r["metadata"]["name"] not in names])[0]
        names.append(run["metadata"]["name"])
        finish(cluster, namespace, names[-1], 0, summary(f"hist-{i}", 1.0, 0.9))
    wait_until(lambda: [r["metadata"]["name"] for r in runs_of(cluster, namespace, "hist")]
               == names[1:], message="the older succeeded run is pruned")
    versions = cluster.get("mv", "-n", namespace)["items"]
    assert sorted(v["spec"]["sourceRun"]["name"] for v in versions) == sorted(names)
    status = cluster.get("fts", "hist", "-n", namespace)["status"]
    assert status["lastSuccessfulRun"] == names[1]
