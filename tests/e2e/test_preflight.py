"""Preflight really runs (the trainer's --preflight mode on the local executor pool) before
any GPU pod exists, and stops runs whose data has gaps."""

from __future__ import annotations

import json

import pytest

from hack import run as demo
from tests.conftest import Cluster, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return demo.build_assets(tmp_path_factory.mktemp("preflight-assets"))


def apply_run(cluster: Cluster, ns: str, name: str, assets, train=None, **dataset) -> None:
    model_dir, good_train, eval_ = assets
    run = demo.run_manifest(name, model_dir, train or good_train, eval_,
                            assets[0].parent / "out" / name)
    run["metadata"]["namespace"] = ns
    run["spec"]["resources"] = {"nodes": 1, "gpusPerNode": 4, "nodePool": "h200"}
    run["spec"]["hyperparameters"].update(globalBatchSize=4, microBatchSize=1)  # 4 GPUs
    run["spec"]["dataset"].update(dataset)
    cluster.apply(run)


def failed_status(cluster: Cluster, ns: str, name: str) -> dict:
    return wait_until(
        lambda: (s := cluster.get("ftr", name, "-n", ns).get("status") or {}).get("phase")
        == "Failed" and s, timeout=240, interval=1, message=f"{name} fails in preflight")


def gpu_pods(cluster: Cluster, ns: str) -> list[dict]:
    return cluster.get("pods", "-n", ns, "-l", "flywheel.dev/component=trainer")["items"]


def test_malformed_line_fails_in_preflight_naming_it(cluster, operator, namespace, assets,
                                                     tmp_path):
    lines = assets[1].read_text().splitlines()
    broken = json.loads(lines[2])
    broken["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{not json"
    lines[2] = json.dumps(broken)
    lines[4] = lines[4][:-5]  # truncated JSON
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    apply_run(cluster, namespace, "badline", assets, train=train)

    status = failed_status(cluster, namespace, "badline")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed"
    assert f"{train}:5" in failed["message"]
    assert status["preflight"]["phase"] == "Failed"
    assert status["preflight"]["invalidExamples"] >= 1
    assert gpu_pods(cluster, namespace) == []
    assert cluster.get("jobs", "-n", namespace, "-l", "flywheel.dev/component=trainer")[
        "items"] == []


def test_missing_required_category_fails_naming_it(cluster, operator, namespace, assets):
    apply_run(cluster, namespace, "gaps", assets,
              requiredCategories=["edit-workflow", "email-config"], minExamplesPerCategory=8)
    status = failed_status(cluster, namespace, "gaps")
    assert "email-config (0)" in status["message"]
    assert status["preflight"]["missingCategories"] == ["email-config"]
    assert status["preflight"]["categories"]["edit-workflow"] >= 8
    assert gpu_pods(cluster, namespace) == []


def test_good_data_passes_with_figures_and_cost(cluster, operator, namespace, assets):
    apply_run(cluster, namespace, "good", assets)
    status = wait_until(
        lambda: (s := cluster.get("ftr", "good", "-n", namespace).get("status") or {})
        .get("preflight", {}).get("phase") == "Succeeded" and s,
        timeout=240, interval=1, message="preflight passes")
    pre = status["preflight"]
    assert pre["examples"] > 0 and pre["tokens"] > 0 and pre["steps"] > 0
    assert pre["estimatedGpuHours"] > 0 and pre["estimatedCost"] > 0
    # Only now does the GPU Job exist.
    wait_until(lambda: gpu_pods(cluster, namespace), message="attempt 1 starts")
