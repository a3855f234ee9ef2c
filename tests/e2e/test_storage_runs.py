"""Runs on the local cluster reach their store as users' runs do on a real one: the endpoint from
the operator config, the keys from a Secret the run names, pvc:// claims mounted. Preflight
really runs (local executor) and reads every input with the run's own credentials."""

from __future__ import annotations

import json
import uuid

import pytest

from hack import local_s3
from hack import run as demo
from tests.conftest import ROOT, Cluster, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The sample's base model and a small slice of its data, train and eval side by side."""
    from hack import sample as toy

    work = tmp_path_factory.mktemp("storage-assets")
    (work / "data").mkdir()
    eval_ = toy.write_dataset(work / "data" / "eval.jsonl", 6, seed=2)
    train = toy.write_dataset(work / "data" / "train.jsonl", 48, seed=1,
                              exclude=toy.requests(eval_))
    return demo.build_base(work), train, eval_


def _run(name: str, ns: str, model: str, train: str, eval_: str, out: str, **spec) -> dict:
    run = demo.run_manifest(name, ROOT, ROOT, ROOT, ROOT)
    run["metadata"]["namespace"] = ns
    run["spec"].update(baseModel=model, output={"uri": out},
                       resources={"nodes": 1, "gpusPerNode": 4, "nodePool": "h200"}, **spec)
    run["spec"]["dataset"].update(train=train, eval=eval_, minExamplesPerCategory=8)
    run["spec"]["hyperparameters"].update(globalBatchSize=4, microBatchSize=1)  # 4 GPUs
    return run


def _preflight_done(cluster: Cluster, ns: str, name: str) -> dict:
    return wait_until(
        lambda: (s := cluster.get("ftr", name, "-n", ns).get("status") or {})
        .get("preflight", {}).get("phase") in ("Succeeded", "Failed") and s,
        timeout=300, interval=1, message=f"{name}: preflight finished")


def _preflight_pod(cluster: Cluster, ns: str) -> dict:
    (pod,) = cluster.get("pods", "-n", ns, "-l", "flywheel.dev/component=preflight")["items"]
    return pod


@pytest.fixture(scope="module")
def on_s3(assets, cluster):
    model_dir, train, eval_ = assets
    prefix = f"s3://flywheel/e2e-{uuid.uuid4().hex[:8]}"
    local_s3.upload_dir(model_dir, f"{prefix}/model/")
    local_s3.upload_dir(train.parent, f"{prefix}/data/")  # train.jsonl and eval.jsonl
    return {"model": f"{prefix}/model/", "train": f"{prefix}/data/{train.name}",
            "eval": f"{prefix}/data/{eval_.name}", "out": f"{prefix}/out/"}


def test_s3_run_reads_with_the_secret_it_names_and_the_configured_endpoint(
        cluster, operator, namespace, on_s3):
    local_s3.apply_secret(namespace)
    run = _run("s3-good", namespace, on_s3["model"], on_s3["train"], on_s3["eval"],
               on_s3["out"], storage={"s3": {"credentialsSecret": local_s3.SECRET_NAME}})
    cluster.apply(run)
    status = _preflight_done(cluster, namespace, "s3-good")
    assert status["preflight"]["phase"] == "Succeeded", status.get("message")
    assert status["preflight"]["examples"] > 0
    env = {e["name"]: e for e in _preflight_pod(cluster, namespace)["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == local_s3.load().endpoint  # operator config
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "flywheel-s3"


def test_wrong_keys_fail_preflight_with_the_stores_code_and_no_secret_anywhere(
        cluster, operator, namespace, on_s3):
    wrong = "wrong-" + uuid.uuid4().hex
    s3 = local_s3.load()
    cluster.apply(local_s3.secret_manifest(namespace, local_s3.S3(
        s3.endpoint, s3.access_key, wrong), name="stale-keys"))
    run = _run("s3-stale", namespace, on_s3["model"], on_s3["train"], on_s3["eval"],
               on_s3["out"], storage={"s3": {"credentialsSecret": "stale-keys"}})
    cluster.apply(run)
    status = _preflight_done(cluster, namespace, "s3-stale")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed"
    assert f"dataset.train: cannot read {on_s3['train']}: SignatureDoesNotMatch" in (
        failed["message"])
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    logs = "".join(p.read_text() for p in
                   (ROOT / ".cache" / "executor" / namespace).glob("*/output.log"))
    for text in (json.dumps(status), events, logs, operator.log_path.read_text()):
        assert wrong not in text and s3.secret_key not in text


def _bound_claim(cluster: Cluster, ns: str, claim: str) -> None:
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume (the scheduler places no
    pod whose claim is unbound; the local cluster has no provisioner)."""
    pv = f"{ns}-{claim}"
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                   "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                            "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                            "hostPath": {"path": str(ROOT / ".cache" / "pvc" / ns / claim)},
                            "claimRef": {"namespace": ns, "name": claim}}})
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": claim, "namespace": ns},
                   "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                            "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}})
    wait_until(lambda: cluster.get("pvc", claim, "-n", ns).get("status", {}).get("phase")
               == "Bound", timeout=60, message=f"claim {claim} bound")


def test_pvc_run_reads_from_its_claims_mounted_as_named(cluster, operator, namespace, assets):
    model_dir, train, eval_ = assets
    claims = ROOT / ".cache" / "pvc" / namespace  # the local executor's folder per claim
    (claims / "datasets").mkdir(parents=True)
    (claims / "datasets" / "train.jsonl").write_bytes(train.read_bytes())
    (claims / "datasets" / "eval.jsonl").write_bytes(eval_.read_bytes())
    (claims / "models" / "tiny").mkdir(parents=True)
    for f in model_dir.iterdir():
        (claims / "models" / "tiny" / f.name).write_bytes(f.read_bytes())
    for claim in ("models", "datasets", "outputs"):
        _bound_claim(cluster, namespace, claim)
    run = _run("pvc-good", namespace, "pvc://models/tiny", "pvc://datasets/train.jsonl",
               "pvc://datasets/eval.jsonl", "pvc://outputs/pvc-good/")
    cluster.apply(run)
    status = _preflight_done(cluster, namespace, "pvc-good")
    assert status["preflight"]["phase"] == "Succeeded", status.get("message")
    assert status["preflight"]["examples"] > 0
    pod = _preflight_pod(cluster, namespace)["spec"]
    volumes = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]
               for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert volumes == {"datasets": {"claimName": "datasets", "readOnly": True},
                       "models": {"claimName": "models", "readOnly": True},
                       "outputs": {"claimName": "outputs"}}
    # the write probe went to the output claim and was removed again
    assert list((claims / "outputs").rglob("*.flywheel-preflight-*")) == []
