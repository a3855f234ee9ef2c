"""Storage wiring of the trainer and preflight pods: S3 and GCS credentials by reference,
endpoint and region, workload identity, cluster defaults, and exactly the pvc:// claims named."""

from __future__ import annotations

import json

import pytest
from flywheel_operator import render
from flywheel_operator.config import OperatorConfig
from pydantic import ValidationError

from .conftest_data import make_run

S3_DEFAULTS = {"s3": {"endpoint": "https://minio.storage.svc:9000", "region": "eu-west-1",
                      "credentialsSecret": "team-s3"}}


def _pods(run: dict, config: OperatorConfig) -> list[dict]:
    """The trainer pod template and the preflight pod template."""
    job = render.attempt_objects(run, 1, config)[-1]
    (preflight,) = render.preflight_objects(run, config)
    return [job["spec"]["template"]["spec"], preflight["spec"]["template"]["spec"]]


def _env(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def _storage_volumes(pod: dict) -> list[dict]:
    return [v for v in pod["volumes"] if v["name"] not in ("config", "dshm", "cache")]


def _storage_mounts(pod: dict) -> list[dict]:
    return [m for m in pod["containers"][0]["volumeMounts"]
            if m["name"] not in ("config", "dshm", "cache")]


def test_s3_defaults_from_the_operator_config_reach_both_pods_by_reference():
    config = OperatorConfig(storage=S3_DEFAULTS)
    for pod in _pods(make_run(), config):
        env = _env(pod)
        assert env["AWS_ENDPOINT_URL_S3"] == {"name": "AWS_ENDPOINT_URL_S3",
                                              "value": "https://minio.storage.svc:9000"}
        assert env["AWS_REGION"]["value"] == "eu-west-1"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {
                "name": "team-s3", "key": key}}}
        assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "team-s3", "key": "AWS_SESSION_TOKEN", "optional": True}
        assert "serviceAccountName" not in pod and _storage_volumes(pod) == []
        assert "FLYWHEEL_PVC_ROOT" not in env  # no pvc:// URI, no claim


def test_a_runs_storage_overrides_the_defaults_field_by_field():
    config = OperatorConfig(storage=S3_DEFAULTS)
    run = make_run(storage={"s3": {"credentialsSecret": "my-keys"},
                            "serviceAccountName": "trainer"})
    for pod in _pods(run, config):
        env = _env(pod)
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "https://minio.storage.svc:9000"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "my-keys"
        assert pod["serviceAccountName"] == "trainer"


def test_workload_identity_needs_no_key():
    run = make_run(storage={"serviceAccountName": "flow-agent-trainer"})
    for pod in _pods(run, OperatorConfig()):
        assert pod["serviceAccountName"] == "flow-agent-trainer"
        assert not {"AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS"} & set(_env(pod))


def test_gcs_key_file_is_mounted_read_only_and_named_by_the_standard_variable():
    run = make_run(baseModel="gs://models/qwen3-32b/",
                   dataset={"train": "gs://data/flow/train.jsonl"},
                   output={"uri": "gs://models/flow-agent/"},
                   storage={"gcs": {"keySecretRef": {"name": "gcp-sa", "key": "sa.json"}}})
    for pod in _pods(run, OperatorConfig()):
        assert _storage_volumes(pod) == [{"name": "gcs-key", "secret": {
            "secretName": "gcp-sa", "items": [{"key": "sa.json", "path": "key.json"}],
            "defaultMode": 0o440}}]
        (mount,) = _storage_mounts(pod)
        assert mount == {"name": "gcs-key", "mountPath": render.GCS_KEY_DIR, "readOnly": True}
        assert _env(pod)["GOOGLE_APPLICATION_CREDENTIALS"]["value"] == (
            f"{render.GCS_KEY_DIR}/key.json")
        assert "AWS_ACCESS_KEY_ID" not in _env(pod)


def test_pods_mount_exactly_the_claims_the_runs_uris_name():
    run = make_run(baseModel="pvc://base-models/qwen3",
                   dataset={"train": "pvc://datasets/flow/train.jsonl",
                            "eval": "pvc://datasets/flow/eval.jsonl"},
                   checkpoint={"uri": "pvc://scratch/ckpt/"},
                   output={"uri": "s3://models/flow-agent/"})
    for pod in _pods(run, OperatorConfig()):
        claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]
                  for v in _storage_volumes(pod)}
        assert claims == {"base-models": {"claimName": "base-models", "readOnly": True},
                          "datasets": {"claimName": "datasets", "readOnly": True},
                          "scratch": {"claimName": "scratch"}}  # written: not read-only
        by_volume = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                     for v in _storage_volumes(pod)}
        mounts = {by_volume[m["name"]]: m for m in _storage_mounts(pod)}
        assert {c: m["mountPath"] for c, m in mounts.items()} == {
            c: f"/pvc/{c}" for c in ("base-models", "datasets", "scratch")}
        assert mounts["datasets"]["readOnly"] is True and "readOnly" not in mounts["scratch"]
        assert _env(pod)["FLYWHEEL_PVC_ROOT"]["value"] == "/pvc"


def test_a_claim_read_and_written_is_mounted_once_read_write():
    run = make_run(dataset={"train": "pvc://work/data/train.jsonl"},
                   output={"uri": "pvc://work/out/"})
    for pod in _pods(run, OperatorConfig()):
        (volume,) = _storage_volumes(pod)
        assert volume["persistentVolumeClaim"] == {"claimName": "work"}


def test_no_storage_settings_render_nothing_extra():
    for pod in _pods(make_run(), OperatorConfig()):
        assert not [k for k in _env(pod) if k.startswith(("AWS_", "GOOGLE_", "FLYWHEEL_PVC"))]
        assert _storage_volumes(pod) == [] and "serviceAccountName" not in pod


def test_rendered_objects_hold_no_secret_values():
    run = make_run(storage={"s3": {"credentialsSecret": "team-s3"}})
    text = json.dumps(render.attempt_objects(run, 1, OperatorConfig(storage=S3_DEFAULTS)))
    assert '"value": "team-s3"' not in text and "secretKeyRef" in text


@pytest.mark.parametrize("storage, field", [
    ({"s3": {"endpoint": "https://user:pass@minio:9000"}}, "endpoint"),
    ({"s3": {"endpoint": "minio:9000"}}, "endpoint"),
    ({"s3": {"credentialsSecret": "Not_A_Name"}}, "credentialsSecret"),
    ({"serviceAccountName": "UPPER"}, "serviceAccountName"),
    ({"gcs": {"keySecretRef": {"name": "k"}}}, "key"),
])
def test_bad_storage_settings_are_refused_naming_the_field(storage, field):
    with pytest.raises(ValidationError, match=field):
        OperatorConfig(storage=storage)
