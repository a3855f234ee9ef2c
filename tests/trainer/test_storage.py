"""Storage against a real S3 server (versitygw, started here without the cluster): checkpoints,
resume, torn steps, export and its digest, preflight's storage check, pvc:// paths."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hack import local_s3
from tests.trainer.conftest import (
    EXPERIMENT_KEY,
    kill_group,
    launch,
    make_config,
    run_env,
    run_to_end,
)

READER, READER_SECRET = "FWREADER", "reader-" + uuid.uuid4().hex  # a non-root account
TEAM, PRIVATE = "team", "private"  # buckets: the reader owns `team`; `private` is root's


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A versitygw server on a free loopback port, with its own IAM: root, and READER who owns
    the `team` bucket but may not touch `private`."""
    if not (local_s3.BIN / "versitygw").exists():
        subprocess.run([str(local_s3.ROOT / "hack" / "build-tools.sh"), "versitygw"], check=True)
    root = tmp_path_factory.mktemp("s3")
    server = local_s3.new_credentials(local_s3.free_port())
    proc = local_s3.launch(server, root, root / "versitygw.log")
    local_s3.create_buckets(server, ["flywheel", TEAM, PRIVATE])
    local_s3.admin(server, "create-user", "--access", READER, "--secret", READER_SECRET,
                   "--role", "user")
    local_s3.admin(server, "change-bucket-owner", "--bucket", TEAM, "--owner", READER)
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process talks to the server as root through the standard variables."""
    import s3fs

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


def _keys(s3, bucket: str, prefix: str) -> dict[str, int]:
    client = s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["Size"] for p in pages for o in p.get("Contents", [])}


def _upload_toy(s3, toy, bucket: str, prefix: str, access=None, secret=None) -> dict[str, str]:
    client = s3.client(access, secret)
    for path in sorted(toy.model_dir.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}base/{path.name}", Body=path.read_bytes())
    for name, path in (("train.jsonl", toy.train), ("eval.jsonl", toy.eval)):
        client.put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=path.read_bytes())
    base = f"s3://{bucket}/{prefix}"
    return {"model": base + "base", "train": base + "train.jsonl", "eval": base + "eval.jsonl"}


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def resumed_on_s3(s3, toy, tmp_path_factory):
    """A 2-rank run reading its model and data from s3:// and writing checkpoints and the
    model there, killed after its first complete checkpoint, given a torn newer step (every
    DCP object, `.metadata` included, but no marker), then run again to the end."""
    work = tmp_path_factory.mktemp("s3-run")
    prefix = f"runs/{uuid.uuid4().hex[:8]}/"
    src = _upload_toy(s3, toy, "flywheel", prefix)
    out = f"s3://flywheel/{prefix}out"
    cfg = make_config(toy, work / "unused", baseModel=src["model"],
                      dataset={"train": src["train"], "eval": None}, output={"uri": out})
    env = {**s3.env(), "FLYWHEEL_MODEL_CACHE": str(work / "model-cache")}
    proc = launch(work, cfg, FLYWHEEL_DEBUG_STEP_DELAY_S="0.5", **env)
    ckpt = prefix + "out/checkpoints/"
    deadline = time.time() + 300
    try:
        while ".complete" not in {k.rsplit("/", 1)[-1] for k in _keys(s3, "flywheel", ckpt)}:
            assert proc.poll() is None, (work / "log.txt").read_text()[-4000:]
            assert time.time() < deadline
            time.sleep(0.1)
        kill_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    finally:
        kill_group(proc)
    objects = _keys(s3, "flywheel", ckpt)
    complete = sorted(int(k.split("/")[0][5:]) for k in objects if k.endswith("/.complete"))
    last = complete[-1]
    client = s3.client()
    torn = [k for k in objects if k.startswith(f"step-{last}/") and k != f"step-{last}/.complete"]
    for key in torn:
        client.copy_object(Bucket="flywheel", Key=f"{ckpt}step-7/{key.split('/', 1)[1]}",
                           CopySource={"Bucket": "flywheel", "Key": ckpt + key})
    before = {"complete": complete, "outputs": _keys(s3, "flywheel", prefix + "out/"),
              "torn": sorted(k.split("/", 1)[1] for k in torn)}
    log = run_to_end(work, cfg, **env)
    return {"work": work, "out": out, "prefix": prefix, "before": before, "log": log,
            "summary": json.loads((work / "summary.json").read_text()),
            "checkpoints": _keys(s3, "flywheel", ckpt),
            "archives": _keys(s3, "flywheel", prefix + "out/comet-offline/")}


def test_kill_and_resume_through_s3_ends_with_the_uninterrupted_weights(resumed_on_s3, trained,
                                                                       s3_env):
    from flywheel_trainer import storage

    r = resumed_on_s3
    assert r["before"]["complete"] and r["before"]["complete"][-1] < 8
    assert "model.safetensors" not in r["before"]["outputs"]
    # the torn step had every DCP object, .metadata included, only no marker: ignored
    assert ".metadata" in r["before"]["torn"]
    resumed = re.search(r"resumed from checkpoint step (\d+)", r["log"])
    assert resumed and int(resumed.group(1)) == r["before"]["complete"][-1]
    assert r["summary"]["steps"] == 8
    assert r["summary"]["artifact"]["uri"] == r["out"]
    # the same weights as the uninterrupted run on local disk (the model cards differ: they
    # name the data and output URIs)
    local = (trained["out"] / "model.safetensors").read_bytes()
    assert storage.sha256(storage.join(r["out"], "model.safetensors")) == (
        hashlib.sha256(local).hexdigest())
    # the Comet offline archive went to the store beside the model
    archive = r["summary"]["tracking"]["offlineArchive"]
    assert archive.startswith(r["out"] + "/comet-offline/" + EXPERIMENT_KEY)
    assert archive.endswith(".zip") and archive.rsplit("/", 1)[1] in r["archives"]
    steps = sorted({k.split("/")[0] for k in r["checkpoints"]})
    assert steps == ["step-6", "step-8"]  # keep=2; the torn step-7 went with the purge
    assert {k for k in r["checkpoints"] if k.startswith("step-8/")} >= {
        "step-8/.metadata", "step-8/.complete", "step-8/__0_0.distcp", "step-8/__1_0.distcp"}


def test_exported_model_loads_after_a_download_and_its_digest_matches(resumed_on_s3, s3_env,
                                                                      trained, tmp_path):
    import torch
    from flywheel_trainer import storage
    from flywheel_trainer.export import digest_dir
    from transformers import AutoModelForCausalLM

    uri, digest = resumed_on_s3["out"], resumed_on_s3["summary"]["artifact"]["digest"]
    assert digest_dir(uri) == digest  # recomputed by reading every file back from the store
    local = tmp_path / "model"
    storage.download_dir(uri, str(local))
    files = sorted(p for p in local.iterdir() if p.is_file() and p.name != ".flywheel-sha256sums")
    body = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files)
    assert "sha256:" + hashlib.sha256(body.encode()).hexdigest() == digest
    model = AutoModelForCausalLM.from_pretrained(local)
    reference = AutoModelForCausalLM.from_pretrained(trained["out"])
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_failed_upload_leaves_no_object_and_no_pending_parts(s3_env):
    from flywheel_trainer import storage

    key = f"aborted/{uuid.uuid4().hex}.bin"
    with pytest.raises(RuntimeError, match="gather failed"), \
            storage.write_hashed(f"s3://flywheel/{key}") as w:
        w.write(os.urandom(60 * 2**20))  # past one 50 MiB part: a multipart upload began
        raise RuntimeError("gather failed")
    assert _keys(s3_env, "flywheel", key) == {}
    uploads = s3_env.client().list_multipart_uploads(Bucket="flywheel", Prefix="aborted/")
    assert uploads.get("Uploads", []) == []


def test_dcp_streams_to_s3_in_parallel_parts_and_a_failed_save_leaves_nothing(s3_env,
                                                                             monkeypatch):
    """checkpoint.writer/reader on S3: multipart files (5 MiB parts, 2 in flight), small
    tensors and bytes read back exactly, in any plan order; a save that fails mid-stream
    leaves no object and no pending parts."""
    import torch
    import torch.distributed.checkpoint as dcp
    from flywheel_trainer import checkpoint
    from torch.distributed.checkpoint.api import CheckpointException

    monkeypatch.setenv("FLYWHEEL_S3_PART_MB", "5")
    monkeypatch.setenv("FLYWHEEL_S3_CONCURRENCY", "2")
    torch.manual_seed(0)
    state = {"big": torch.randn(3 * 2**20 + 7), "small": {f"t{i}": torch.randn(i + 1)
                                                          for i in range(40)},
             "blob": {"note": "bytes item", "n": 3}, "half": torch.randn(2**20).half()}
    uri = f"s3://flywheel/dcp-{uuid.uuid4().hex[:8]}/step-1"
    dcp.save(state, storage_writer=checkpoint.writer(uri))
    prefix = uri.split("/", 3)[3] + "/"
    assert {k for k in _keys(s3_env, "flywheel", prefix) if k.endswith(".distcp")}
    back = {"big": torch.zeros_like(state["big"]), "half": torch.zeros_like(state["half"]),
            "small": {k: torch.zeros_like(v) for k, v in state["small"].items()},
            "blob": {"note": "", "n": 0}}
    dcp.load(back, storage_reader=checkpoint.reader(uri))
    assert torch.equal(back["big"], state["big"]) and torch.equal(back["half"], state["half"])
    assert all(torch.equal(back["small"][k], v) for k, v in state["small"].items())
    assert back["blob"] == state["blob"]

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    failed = f"s3://flywheel/dcp-failed-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(checkpoint._Upload, "commit", fail)
    monkeypatch.setenv("FLYWHEEL_CKPT_THREADS", "1")  # one writer: nothing still running after
    with pytest.raises(CheckpointException, match="disk full"):
        dcp.save({"big": state["big"]}, storage_writer=checkpoint.writer(failed))
    assert not [k for k in _keys(s3_env, "flywheel", failed.split("/", 3)[3] + "/")
                if k.endswith(".distcp")]
    uploads = s3_env.client().list_multipart_uploads(Bucket="flywheel", Prefix="dcp-failed")
    assert uploads.get("Uploads", []) == []


# ----------------------------------------------------------------------------- preflight


def _preflight(toy, work: Path, cfg: dict, env: dict) -> tuple[dict, str]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel_trainer", "--config", str(work / "config.json"),
         "--preflight", "--world-size", "2"],
        env={**run_env(work), "FLYWHEEL_MODEL_CACHE": str(work / "cache"), **env},
        capture_output=True, text=True, timeout=180)
    written = (work / "summary.json").read_text()
    return json.loads(written), proc.stdout + proc.stderr + written


@pytest.fixture(scope="module")
def team_data(s3, toy):
    prefix = f"preflight/{uuid.uuid4().hex[:8]}/"
    src = _upload_toy(s3, toy, TEAM, prefix, READER, READER_SECRET)
    s3.client().put_object(Bucket=PRIVATE, Key="eval.jsonl", Body=toy.eval.read_bytes())
    return {**src, "out": f"s3://{TEAM}/{prefix}out/", "prefix": prefix}


def _reader_env(s3, **override) -> dict:
    return {**s3.env(), "AWS_ACCESS_KEY_ID": READER, "AWS_SECRET_ACCESS_KEY": READER_SECRET,
            **override}


def test_preflight_passes_with_the_runs_own_keys_and_removes_its_probe(s3, toy, team_data,
                                                                       tmp_path):
    cfg = make_config(toy, tmp_path, baseModel=team_data["model"],
                      dataset={"train": team_data["train"], "eval": team_data["eval"]},
                      output={"uri": team_data["out"]})
    result, _ = _preflight(toy, tmp_path, cfg, _reader_env(s3))
    assert result["ok"], result
    assert result["train"]["examples"] == 48
    # the write probe under output.uri is gone again
    assert _keys(s3, TEAM, team_data["prefix"] + "out/") == {}


def test_preflight_names_missing_bucket_wrong_keys_and_unreadable_objects(s3, toy, team_data,
                                                                          tmp_path):
    base = {"baseModel": team_data["model"], "output": {"uri": team_data["out"]}}
    # a bucket that does not exist
    cfg = make_config(toy, tmp_path, **base, dataset={
        "train": "s3://no-such-bucket-fw/train.jsonl", "eval": team_data["eval"]})
    result, text = _preflight(toy, tmp_path / "bucket", cfg, _reader_env(s3))
    assert not result["ok"]
    assert result["problems"] == [
        "dataset.train: cannot read s3://no-such-bucket-fw/train.jsonl: NoSuchBucket: "
        "The specified bucket does not exist."]
    assert READER_SECRET not in text
    # an object (and an output prefix) the run's account may not touch
    cfg = make_config(toy, tmp_path, baseModel=team_data["model"],
                      dataset={"train": team_data["train"], "eval": f"s3://{PRIVATE}/eval.jsonl"},
                      output={"uri": f"s3://{PRIVATE}/out/"})
    result, text = _preflight(toy, tmp_path / "denied", cfg, _reader_env(s3))
    problems = "\n".join(result["problems"])
    assert f"dataset.eval: cannot read s3://{PRIVATE}/eval.jsonl: AccessDenied" in problems
    assert f"output.uri: cannot write to s3://{PRIVATE}/out/: AccessDenied" in problems
    assert "dataset.train" not in problems and "baseModel" not in problems
    assert READER_SECRET not in text
    # a key the store does not know, then a known key with the wrong secret
    wrong_secret = "wrong-" + uuid.uuid4().hex
    cfg = make_config(toy, tmp_path, **base,
                      dataset={"train": team_data["train"], "eval": team_data["eval"]})
    for name, env, code in (
        ("key", _reader_env(s3, AWS_ACCESS_KEY_ID="FWNOSUCHKEY"), "InvalidAccessKeyId"),
        ("secret", _reader_env(s3, AWS_SECRET_ACCESS_KEY=wrong_secret), "SignatureDoesNotMatch"),
    ):
        result, text = _preflight(toy, tmp_path / name, cfg, env)
        assert len(result["problems"]) == 4, result  # train, eval, baseModel, output
        for field, uri in (("dataset.train", team_data["train"]), ("baseModel",
                           team_data["model"]), ("output.uri", team_data["out"])):
            assert any(p.startswith(f"{field}: ") and f"{uri}: {code}" in p
                       for p in result["problems"]), (field, result["problems"])
        assert READER_SECRET not in text and wrong_secret not in text
        assert s3.secret_key not in text


# ----------------------------------------------------------------------------- pvc://


def test_pvc_uris_read_from_the_claims_mount(toy, tmp_path, monkeypatch):
    from flywheel_trainer import storage
    from flywheel_trainer.data import load_split
    from flywheel_trainer.model import resolve_model_path

    claim = tmp_path / "mounts" / "datasets"
    claim.mkdir(parents=True)
    (claim / "train.jsonl").write_bytes(toy.train.read_bytes())
    monkeypatch.setenv("FLYWHEEL_PVC_ROOT", str(tmp_path / "mounts"))
    split = load_split("pvc://datasets/train.jsonl", toy.tokenizer, 1024, skip_invalid=False)
    assert split.report["examples"] == 48
    assert resolve_model_path("pvc://models/base") == str(tmp_path / "mounts/models/base")
    assert storage.check({"dataset.train": "pvc://datasets/train.jsonl"},
                         {"output.uri": "pvc://datasets/out/"}) == []
    assert os.listdir(claim / "out") == []  # the probe is removed
    problems = storage.check({"dataset.eval": "pvc://datasets/missing.jsonl"}, {})
    assert problems and problems[0].startswith(
        "dataset.eval: cannot read pvc://datasets/missing.jsonl: FileNotFoundError")
