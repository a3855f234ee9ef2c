"""Fetch and verify: a tiny model exported by `export_hf` (one gloo rank, three shards) to
file:// and to a real S3 server (versitygw, started here), fetched by
`python -m flywheel_trainer.fetch`, refused when a byte, a file or the digest is wrong;
`model.resolve_model_path(..., digest=...)` for base models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hack import local_s3

RANKS = """
import sys
from flywheel_trainer.fetch import DigestMismatch
from flywheel_trainer.model import init_distributed, resolve_model_path
d = init_distributed()
for name, uri in zip(("good", "bad"), sys.argv[2:]):
    try:
        resolve_model_path(uri, d, digest=sys.argv[1])
        line = f"{name} rank {d.rank}: verified"
    except DigestMismatch as e:
        line = f"{name} rank {d.rank}: refused: {e}"
    sys.stdout.write(line + "\\n")  # one write: the ranks share the pipe (print writes twice)
    sys.stdout.flush()
import torch.distributed as dist
dist.barrier()  # leave together: gloo now and then aborts a rank whose peer left first
dist.destroy_process_group()
"""
EXPORT = """
import json, sys
from types import SimpleNamespace
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from flywheel_trainer.export import export_hf
base, store, shard_bytes, uris = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
one = SimpleNamespace(is_main=True)
print(json.dumps([export_hf(model, tok, base, u, one, shard_bytes=shard_bytes,
                            extra_files={"README.md": b"# card\\n"}) for u in uris]))
"""
SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    if not (local_s3.BIN / "versitygw").exists():
        subprocess.run([str(local_s3.ROOT / "hack" / "build-tools.sh"), "versitygw"], check=True)
    root = tmp_path_factory.mktemp("s3")
    server = local_s3.new_credentials(local_s3.free_port())
    proc = local_s3.launch(server, root, root / "versitygw.log")
    local_s3.create_buckets(server, ["flywheel"])
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3, monkeypatch):
    import s3fs

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def exported(s3, toy, tmp_path_factory):
    """The toy model exported once to a local directory and once to S3 (same bytes)."""
    work = tmp_path_factory.mktemp("export")
    weights = (toy.model_dir / "model.safetensors").stat().st_size
    local, remote = work / "art", f"s3://flywheel/fetch/{uuid.uuid4().hex[:8]}/art"
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT, str(toy.model_dir), str(work / "store"),
         str(weights // 3 + 1), f"file://{local}", remote],
        env={**os.environ, **s3.env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = json.loads(proc.stdout.strip().splitlines()[-1])
    assert a["digest"] == b["digest"]
    return {"dir": local, "file": f"file://{local}", "s3": remote, "digest": a["digest"]}


def fetch_cmd(uri: str, digest: str, to: Path, env: dict | None = None,
              module: bool = True) -> subprocess.CompletedProcess:
    args = ["--uri", uri, "--digest", digest, "--to", str(to)]
    # the command must not need torch: run through main() and check nothing imported it
    check = ("import sys; from flywheel_trainer.fetch import main; rc = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    argv = ["-m", "flywheel_trainer.fetch"] if module else ["-c", check]
    return subprocess.run([sys.executable, *argv, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def _copy_s3(s3, src: str, dst: str, skip=()) -> None:
    client, bucket = s3.client(), "flywheel"
    src_key, dst_key = src.split("/", 3)[3], dst.split("/", 3)[3]
    for o in client.list_objects_v2(Bucket=bucket, Prefix=src_key + "/")["Contents"]:
        name = o["Key"].rsplit("/", 1)[1]
        if name not in skip:
            client.copy_object(Bucket=bucket, Key=f"{dst_key}/{name}",
                               CopySource={"Bucket": bucket, "Key": o["Key"]})


def _flip(data: bytes, at: int = -1) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def _copy_local(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name not in skip:
            shutil.copy(p, dst / p.name)
    return dst


# ----------------------------------------------------------------------------- export


def test_export_writes_the_manifest_outside_the_digest(exported, s3_env):
    from flywheel_trainer.export import digest_dir
    from flywheel_trainer.fetch import MANIFEST

    files = _files(exported["dir"])
    assert {"README.md", "config.json", "model.safetensors.index.json", SHARD} <= files.keys()
    assert "model.safetensors" not in files  # three shards, not one
    body = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                   for name, data in sorted(files.items()) if name != MANIFEST)
    assert files[MANIFEST].decode() == body  # exactly the digest's preimage
    assert exported["digest"] == "sha256:" + hashlib.sha256(body.encode()).hexdigest()
    assert digest_dir(exported["file"]) == digest_dir(exported["s3"]) == exported["digest"]


# ----------------------------------------------------------------------------- fetch


@pytest.mark.parametrize("store", ["file", "s3"])
def test_fetch_downloads_verifies_and_skips_a_verified_copy(exported, s3, store, tmp_path):
    from flywheel_trainer.fetch import MARKER, fetched_digest, verify_dir

    to = tmp_path / "models" / "current"
    proc = fetch_cmd(exported[store], exported["digest"], to, s3.env(), module=store == "s3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    got, want = _files(to), _files(exported["dir"])
    assert result["skipped"] is False and result["manifest"] is True
    assert result["files"] == len(want) - 1 and result["bytes"] > 0  # the manifest aside
    assert got.pop(MARKER) and got == want
    assert fetched_digest(to) == exported["digest"] and verify_dir(to, exported["digest"])
    assert sorted(p.name for p in to.parent.iterdir()) == [".current.fetch.lock", "current"]
    assert s3.secret_key not in proc.stdout + proc.stderr
    again = fetch_cmd(exported[store], exported["digest"], to, s3.env())
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"] is True


@pytest.mark.parametrize("store", ["file", "s3"])
def test_a_corrupted_byte_is_refused_naming_the_first_file_that_differs(exported, s3, store,
                                                                        tmp_path):
    data = _files(exported["dir"])
    if store == "file":
        bad = _copy_local(exported["dir"], tmp_path / "bad")
        (bad / SHARD).write_bytes(_flip(data[SHARD]))
        (bad / "tokenizer.json").write_bytes(_flip(data["tokenizer.json"], 0))  # later by name
        uri = f"file://{bad}"
    else:
        uri = exported["s3"] + f"-bad-{uuid.uuid4().hex[:6]}"
        _copy_s3(s3, exported["s3"], uri)
        key = uri.split("/", 3)[3]
        s3.client().put_object(Bucket="flywheel", Key=f"{key}/{SHARD}",
                               Body=_flip(data[SHARD], 1000))
    to = tmp_path / "models" / "current"
    to.mkdir(parents=True)
    (to / "previous.txt").write_text("the model served before")
    proc = fetch_cmd(uri, exported["digest"], to, s3.env())
    assert proc.returncode == 1, proc.stderr
    assert f"{SHARD}: the first file that differs: its sha256 is " in proc.stderr
    assert "tokenizer.json" not in proc.stderr
    # DIR as it was, no temporary directory left beside it
    assert _files(to) == {"previous.txt": b"the model served before"}
    assert sorted(p.name for p in to.parent.iterdir()) == [".current.fetch.lock", "current"]
    assert s3.secret_key not in proc.stdout + proc.stderr


def test_a_wrong_or_unset_digest_is_refused(exported, s3, tmp_path):
    to = tmp_path / "current"
    wrong = "sha256:" + hashlib.sha256(b"another model").hexdigest()
    proc = fetch_cmd(exported["s3"], wrong, to, s3.env())
    assert proc.returncode == 1 and "manifest does not match digest" in proc.stderr
    assert not to.exists()
    proc = fetch_cmd(exported["file"], "$(FLYWHEEL_MODEL_DIGEST)", to)
    assert proc.returncode == 2 and "not set" in proc.stderr
    proc = fetch_cmd("$(FLYWHEEL_MODEL_URI)", exported["digest"], to)
    assert proc.returncode == 2 and "not set" in proc.stderr
    proc = fetch_cmd(exported["file"], "md5:abc", to)
    assert proc.returncode == 2 and "sha256:" in proc.stderr


def test_a_missing_or_unlisted_file_is_named(exported, tmp_path):
    from flywheel_trainer.fetch import DigestMismatch, fetch, verify_dir

    digest = exported["digest"]
    missing = _copy_local(exported["dir"], tmp_path / "missing", skip={"config.json"})
    extra = _copy_local(exported["dir"], tmp_path / "extra")
    (extra / "notes.txt").write_text("not part of the model")
    for src, name, words in ((missing, "config.json", "listed in the manifest but missing"),
                             (extra, "notes.txt", "not in the manifest")):
        with pytest.raises(DigestMismatch, match=f"{name}: {words}") as err:
            fetch(f"file://{src}", digest, tmp_path / "to")
        assert err.value.name == name and not (tmp_path / "to").exists()
        with pytest.raises(DigestMismatch, match=f"{name}: {words}"):
            verify_dir(src, digest)


def test_an_artifact_without_manifest_verifies_as_a_whole(exported, s3, tmp_path):
    from flywheel_trainer.fetch import MANIFEST, verify_dir

    uri = exported["s3"] + f"-old-{uuid.uuid4().hex[:6]}"
    _copy_s3(s3, exported["s3"], uri, skip={MANIFEST})
    proc = fetch_cmd(uri, exported["digest"], tmp_path / "ok", s3.env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["manifest"] is False
    assert MANIFEST not in _files(tmp_path / "ok")
    assert verify_dir(tmp_path / "ok", exported["digest"])
    bad = _copy_local(exported["dir"], tmp_path / "bad", skip={MANIFEST})
    (bad / SHARD).write_bytes(_flip((bad / SHARD).read_bytes()))
    proc = fetch_cmd(f"file://{bad}", exported["digest"], tmp_path / "to")
    assert proc.returncode == 1 and "cannot be named" in proc.stderr
    assert not (tmp_path / "to").exists()
    with pytest.raises(ValueError, match="cannot be named"):
        verify_dir(bad, exported["digest"])


def test_store_errors_exit_3_without_the_secret(exported, s3, tmp_path):
    wrong = "wrong-" + uuid.uuid4().hex
    proc = fetch_cmd(exported["s3"], exported["digest"], tmp_path / "to",
                     {**s3.env(), "AWS_SECRET_ACCESS_KEY": wrong})
    assert proc.returncode == 3 and "SignatureDoesNotMatch" in proc.stderr, proc.stderr
    assert wrong not in proc.stdout + proc.stderr and not (tmp_path / "to").exists()
    proc = fetch_cmd("s3://no-such-bucket-fw/art", exported["digest"], tmp_path / "to", s3.env())
    assert proc.returncode == 3 and "no-such-bucket-fw" in proc.stderr


# ----------------------------------------------------------------------------- base models


def test_resolve_model_path_verifies_the_base_model(exported, s3_env, tmp_path, monkeypatch):
    from flywheel_trainer.fetch import MARKER, DigestMismatch
    from flywheel_trainer.model import resolve_model_path

    digest, wrong = exported["digest"], "sha256:" + "0" * 64
    monkeypatch.setenv("FLYWHEEL_MODEL_CACHE", str(tmp_path / "cache"))
    assert resolve_model_path(exported["file"], digest=digest) == str(exported["dir"])
    with pytest.raises(DigestMismatch, match="manifest does not match digest"):
        resolve_model_path(exported["file"], digest=wrong)
    # s3: verified while downloading, then reused (the marker) without a download
    path = Path(resolve_model_path(exported["s3"], digest=digest))
    assert json.loads((path / MARKER).read_text())["digest"] == digest
    assert resolve_model_path(exported["s3"], digest=digest) == str(path)
    with pytest.raises(DigestMismatch, match="manifest does not match digest"):
        resolve_model_path(exported["s3"], digest=wrong)
    assert not path.exists()  # the cached copy is discarded
    # a corrupted copy on the store: the shard is named, nothing stays in the cache
    uri = exported["s3"] + f"-bad-{uuid.uuid4().hex[:6]}"
    _copy_s3(s3_env, exported["s3"], uri)
    data = (exported["dir"] / SHARD).read_bytes()
    s3_env.client().put_object(Bucket="flywheel", Key=f"{uri.split('/', 3)[3]}/{SHARD}",
                               Body=_flip(data))
    with pytest.raises(DigestMismatch, match=SHARD) as err:
        resolve_model_path(uri, digest=digest)
    assert err.value.name == SHARD
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
    # without weights (preflight): only the files fetched, through the manifest
    config_only = Path(resolve_model_path(exported["s3"], weights=False, digest=digest))
    assert (config_only / "config.json").exists() and not list(config_only.glob("*.safetensors"))
    with pytest.raises(DigestMismatch):
        resolve_model_path(exported["s3"], weights=False, digest=wrong)


def test_every_rank_fails_when_the_base_model_does_not_verify(exported, tmp_path):
    """Two ranks on one node: local rank 0 verifies, rank 1 learns what failed (no hang)."""
    bad = _copy_local(exported["dir"], tmp_path / "bad")
    (bad / SHARD).write_bytes(_flip((bad / SHARD).read_bytes()))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         "--no-python", sys.executable, "-c", RANKS, exported["digest"], exported["file"],
         f"file://{bad}"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if " rank " in line)
    assert lines[2:] == ["good rank 0: verified", "good rank 1: verified"]
    assert lines[0].startswith(f"bad rank 0: refused: {bad}: {SHARD}: the first file")
    assert lines[1].startswith(f"bad rank 1: refused: base model on rank 0: DigestMismatch: "
                               f"{bad}: {SHARD}: the first file")
