"""KServe as a serving target, against KServe's own published InferenceService CRD (from its Go
module, installed in the local control plane; no KServe controller is needed to check what
Flywheel writes): promotion sets spec.predictor.model.storageUri and the digest annotation and
leaves the rest of the object alone; pinning an alias rolls it back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cluster, wait_until
from tests.integration.test_operator import summary
from tests.integration.test_registry import model, train

pytestmark = pytest.mark.cluster

KSERVE = "github.com/kserve/kserve@v0.15.2"
CRD = "config/crd/full/serving.kserve.io_inferenceservices.yaml"


@pytest.fixture(scope="module")
def kserve_crd(cluster: Cluster, tmp_path_factory) -> Cluster:
    """KServe's InferenceService CRD, from its module on the Go module proxy."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    work = tmp_path_factory.mktemp("kserve")
    out = subprocess.run([go, "mod", "download", "-json", KSERVE], cwd=work, check=True,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "GOFLAGS": "-mod=mod"})
    crd = Path(json.loads(out.stdout)["Dir"]) / CRD
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd), timeout=180)
    wait_until(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in (
        cluster.get("crd", "inferenceservices.serving.kserve.io").get("status") or {}).get(
        "conditions") or []), message="KServe's CRD is established")
    return cluster


def isvc(cluster: Cluster, ns: str) -> dict:
    return cluster.get("inferenceservice", "flow-agent", "-n", ns)


def served(cluster: Cluster, ns: str) -> tuple[str | None, str | None]:
    obj = isvc(cluster, ns)
    return (obj["spec"]["predictor"]["model"].get("storageUri"),
            (obj["metadata"].get("annotations") or {}).get("flywheel.dev/model-digest"))


def test_promotion_points_the_inference_service_at_the_alias(kserve_crd, operator, namespace):
    cluster = kserve_crd
    cluster.apply({
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": "flow-agent", "annotations": {"team": "flow"}},
        "spec": {"predictor": {
            "minReplicas": 1,
            "model": {"modelFormat": {"name": "huggingface"}, "storageUri": "s3://old/model/",
                      "args": ["--enable-auto-tool-choice", "--tool-call-parser=hermes"],
                      "resources": {"limits": {"nvidia.com/gpu": "1"}}}}},
    }, namespace)
    cluster.apply({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "Model", "metadata": {"name": "flow-agent"},
        "spec": {"promotion": {"alias": "production",
                               "gates": [{"metric": "tool_call_accuracy/email", "min": 0.8}]},
                 "servingTargets": [{"inferenceService": "flow-agent"}]},
    }, namespace)

    train(cluster, namespace, "week-1", summary("w1", 1.5, 0.9))
    v1 = cluster.get("mv", "flow-agent-v1", "-n", namespace)["spec"]["artifact"]
    wait_until(lambda: served(cluster, namespace) == (v1["uri"], v1["digest"]),
               message="the InferenceService serves v1")
    train(cluster, namespace, "week-2", summary("w2", 1.2, 0.95))
    v2 = cluster.get("mv", "flow-agent-v2", "-n", namespace)["spec"]["artifact"]
    wait_until(lambda: served(cluster, namespace) == (v2["uri"], v2["digest"]),
               message="the InferenceService serves v2")
    # Only storageUri and the digest annotation changed: the rest is the user's.
    obj = isvc(cluster, namespace)
    assert obj["metadata"]["annotations"]["team"] == "flow"
    assert obj["spec"]["predictor"]["minReplicas"] == 1
    assert obj["spec"]["predictor"]["model"]["args"] == [
        "--enable-auto-tool-choice", "--tool-call-parser=hermes"]
    assert obj["spec"]["predictor"]["model"]["modelFormat"] == {"name": "huggingface"}

    # Rollback by pin moves it back.
    cluster.kubectl("patch", "model", "flow-agent", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"pinnedAliases": {"production": 1}}}')
    wait_until(lambda: served(cluster, namespace) == (v1["uri"], v1["digest"]),
               message="rolled back to v1")
    assert model(cluster, namespace)["status"]["aliases"]["production"]["version"] == 1


def test_a_target_names_one_kind_of_server(kserve_crd, namespace):
    bad = {"apiVersion": "flywheel.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
           "spec": {"servingTargets": [{"deployment": "d", "container": "c",
                                        "inferenceService": "i"}]}}
    res = kserve_crd.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad),
                             check=False)
    assert res.returncode != 0 and "either a deployment" in res.stderr
