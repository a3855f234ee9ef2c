"""End to end: the local control plane's kube-apiserver is killed (SIGKILL) and started again
30 s later while a 2-node run trains on the local pool, its model, data and outputs on the
local S3 server. The run finishes and registers exactly one ModelVersion; the operator (a
separate process) lives through the outage, and so does the local executor, which reports
the pods' ends once the apiserver is back.

The control plane is shared: for about 40 s nothing on it answers, whatever else is running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from hack import local_s3
from hack import run as demo
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.cluster

DOWN_SECONDS = 30
TRAIN_TIMEOUT = 900


@pytest.fixture(scope="module")
def on_s3(cluster, tmp_path_factory) -> dict[str, str]:
    """The sample's tiny base model and a small slice of its data, on the local S3 server."""
    from hack import sample as toy

    work = tmp_path_factory.mktemp("outage-assets")
    (work / "data").mkdir()
    eval_ = toy.write_dataset(work / "data" / "eval.jsonl", 6, seed=2)
    train = toy.write_dataset(work / "data" / "train.jsonl", 48, seed=1,
                              exclude=toy.requests(eval_))
    prefix = f"s3://flywheel/e2e-outage-{uuid.uuid4().hex[:8]}"
    local_s3.upload_dir(demo.build_base(work), f"{prefix}/model/")
    local_s3.upload_dir(work / "data", f"{prefix}/data/")
    return {"model": f"{prefix}/model/", "train": f"{prefix}/data/{train.name}",
            "eval": f"{prefix}/data/{eval_.name}", "out": f"{prefix}/out/"}


def test_a_run_finishes_through_an_apiserver_outage(cluster, operator, on_s3):
    ns = f"e2e-outage-{os.getpid()}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=30s")
    try:
        local_s3.apply_secret(ns)
        cluster.apply(demo.model_manifest(ns))
        run = demo.run_manifest("outage", on_s3["model"], on_s3["train"], on_s3["eval"],
                                on_s3["out"], namespace=ns)
        run["spec"]["dataset"]["minExamplesPerCategory"] = 8
        # Three epochs of 5 steps, a checkpoint every 4: long enough to be cut mid-run.
        run["spec"]["hyperparameters"].update(epochs=3, maxSeqLength=512, globalBatchSize=4,
                                              microBatchSize=1)
        run["spec"]["checkpoint"]["everySteps"] = 4
        cluster.apply(run)

        def status() -> dict:
            return cluster.get("ftr", "outage", "-n", ns).get("status") or {}

        wait_until(lambda: (status().get("progress") or {}).get("stage") == "training",
                   timeout=TRAIN_TIMEOUT, interval=0.5, message="the run trains")
        # The outage, as `up` starts the apiserver again (hack/cluster.py restart-apiserver).
        began = time.strftime("%H:%M:%S")
        subprocess.run([sys.executable, str(ROOT / "hack" / "cluster.py"), "restart-apiserver",
                        "--down-seconds", str(DOWN_SECONDS)], check=True, timeout=300)
        print(f"kube-apiserver down from {began} for {DOWN_SECONDS}s, back at "
              f"{time.strftime('%H:%M:%S')}")
        assert operator.proc.poll() is None, "the operator lives through the outage"

        final = wait_until(lambda: (s := status()).get("phase") in ("Succeeded", "Failed") and s,
                           timeout=TRAIN_TIMEOUT, interval=1, message="the run finishes")
        assert final["phase"] == "Succeeded", final.get("message")
        versions = [mv["metadata"]["name"] for mv in cluster.get("mv", "-n", ns)["items"]
                    if mv["spec"]["sourceRun"]["name"] == "outage"]
        assert versions == [final["modelVersion"]], "exactly one ModelVersion"
        print("attempts:", [(a.get("attempt"), a.get("reason")) for a in final.get("attempts", [])])
        assert operator.proc.poll() is None, "the operator is still running"
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
