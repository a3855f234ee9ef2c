"""Storage: every URI the trainer reads or writes goes through this module (fsspec).

Schemes:
- `s3://bucket/key` through s3fs: AWS or any S3-compatible store. Credentials come from the
  standard chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, a web
  identity token for IRSA, an instance profile); `AWS_ENDPOINT_URL_S3` (or
  `AWS_ENDPOINT_URL`) selects an S3-compatible endpoint, addressed path-style;
  `AWS_REGION`/`AWS_DEFAULT_REGION` the region.
- `gs://bucket/key` through gcsfs: `GOOGLE_APPLICATION_CREDENTIALS` (a mounted key file) or
  workload identity.
- `pvc://CLAIM/path`: the claim mounted by the operator at `$FLYWHEEL_PVC_ROOT/CLAIM`
  (default `/pvc`), then a local path.
- `file:///abs/path` and plain paths: local files (the local executor, tests).
- `hf://org/name[@revision]`: base models only (`model.resolve_model_path`).

Writes stream: fsspec files upload in parts (S3 multipart) as they fill, so nothing is held
whole in memory; `write_hashed` hashes exactly the bytes written and checks the store holds
that many. `check` is preflight's storage check: inputs readable, output prefixes writable.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import uuid
from collections.abc import Iterator

import fsspec

from .contract import Env

CHUNK = 8 * 1024 * 1024
REMOTE = ("s3", "gs", "gcs")


def pvc_root() -> str:
    return os.environ.get(Env.PVC_ROOT, "/pvc")


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def local_path(uri: str) -> str | None:
    """The filesystem path for `file://`, plain and `pvc://` URIs; None for remote ones."""
    if uri.startswith("pvc://"):
        return os.path.join(pvc_root(), uri[len("pvc://"):])
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else uri


def parse_hf(uri: str) -> tuple[str, str | None]:
    """`hf://org/name[@revision]` -> (repo id, revision or None)."""
    repo, _, revision = uri[len("hf://"):].partition("@")
    return repo.strip("/"), revision or None


def storage_options(uri: str) -> dict:
    """fsspec options for `uri`'s scheme, from the environment (never a secret value)."""
    s = scheme(uri)
    if s == "s3":
        opts: dict = {"use_listings_cache": False}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
            opts["config_kwargs"] = {"s3": {"addressing_style": "path"}}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts["client_kwargs"] = {"region_name": region}
        return opts
    if s in ("gs", "gcs"):
        return {"use_listings_cache": False}
    return {}


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for any supported URI."""
    local = local_path(uri)
    if local is not None:
        return fsspec.filesystem("file"), local
    if scheme(uri) not in REMOTE:
        raise ValueError(f"{uri}: unsupported storage scheme (s3://, gs://, pvc://, file://)")
    return fsspec.core.url_to_fs(uri, **storage_options(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def open_uri(uri: str, mode: str = "rb", **kwargs):
    """An open file for `uri` (use as a context manager)."""
    fs, path = filesystem(uri)
    return fs.open(path, mode, **kwargs)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def listdir(uri: str) -> list[dict]:
    """Entries directly under `uri`: dicts with `name` (base name), `type`, `size`; [] when
    `uri` does not exist."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError:
        return []
    return [{"name": e["name"].rstrip("/").rsplit("/", 1)[-1], "type": e["type"],
             "size": e.get("size") or 0} for e in entries]


def rm(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    fs.rm(path, recursive=recursive)


def makedirs(uri: str) -> None:
    """Create a local directory; object stores have no directories (a no-op there)."""
    local = local_path(uri)
    if local is not None:
        os.makedirs(local, exist_ok=True)


def pipe(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if local_path(uri) is not None:
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def put_file(local: str, uri: str) -> None:
    fs, path = filesystem(uri)
    if local_path(uri) is not None:
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.put_file(local, path)


def download_dir(uri: str, target: str, patterns: list[str] | None = None) -> None:
    """Copy the files directly under `uri` (those matching `patterns`, if given) to `target`."""
    fs, root = filesystem(uri)
    os.makedirs(target, exist_ok=True)
    for entry in fs.ls(root.rstrip("/"), detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if patterns is None or any(fnmatch.fnmatch(name, p) for p in patterns):
            fs.get(entry["name"], os.path.join(target, name), recursive=True)


class HashingWriter:
    """Wraps a writable file: hashes and counts every byte passed through it."""

    def __init__(self, f) -> None:
        self.f, self.size, self._h = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._h.update(view)
        self.size += len(view)
        return self.f.write(view)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextlib.contextmanager
def write_hashed(uri: str) -> Iterator[HashingWriter]:
    """Stream a file to `uri`; the writer's `hexdigest()` covers exactly what was uploaded (the
    store's size is checked against the bytes written once the upload completes)."""
    fs, path = filesystem(uri)
    local = local_path(uri) is not None
    if local:
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    f = fs.open(path, "wb")
    w = HashingWriter(f)
    try:
        yield w
    except BaseException:
        # leave nothing half-written: abort the multipart upload / remove the local file
        with contextlib.suppress(Exception):
            f.discard()
            f.close()
            if local:
                fs.rm(path)
        raise
    f.close()
    stored = fs.size(path)
    if stored != w.size:
        raise OSError(f"{uri}: the store holds {stored} bytes, {w.size} were written")


def upload_hashed(local: str, uri: str) -> str:
    """Stream a local file to `uri`; returns the sha256 of what was uploaded."""
    with open(local, "rb") as src, write_hashed(uri) as w:
        while chunk := src.read(CHUNK):
            w.write(chunk)
    return w.hexdigest()


def sha256(uri: str) -> str:
    """sha256 of the object at `uri`, read back from the store in chunks."""
    h = hashlib.sha256()
    with open_uri(uri, "rb", block_size=CHUNK) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- preflight


def _secrets() -> list[str]:
    return [v for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if (v := os.environ.get(k))]


def redact(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def _store_error(exc: BaseException) -> tuple[str, str]:
    """(the store's error code, its message) from anywhere in the exception chain: S3's
    NoSuchBucket, AccessDenied, InvalidAccessKeyId, ...; GCS's HTTP status; else the
    exception's type and text."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        err = getattr(e, "response", None)
        err = err.get("Error") if isinstance(err, dict) else None
        if isinstance(err, dict) and err.get("Code"):
            return str(err["Code"]), str(err.get("Message") or e)
        code = getattr(e, "code", None)
        if isinstance(code, int) and type(e).__name__ == "HttpError":  # gcsfs
            return f"HTTP {code}", str(getattr(e, "message", "") or e)
        e = e.__cause__ or e.__context__
    return type(exc).__name__, str(exc)


def _describe(what: str, uri: str, exc: BaseException) -> str:
    code, message = _store_error(exc)
    return redact(f"{what} {uri}: {code}: {message.strip() or code}")


def _s3_call(uri: str, method: str, **kwargs):
    fs, _ = filesystem(uri)
    return fs.call_s3(method, **kwargs)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def check_readable(uri: str, directory_file: str | None = None) -> None:
    """Raise unless the object at `uri` (or `uri/directory_file`) exists and is readable."""
    target = join(uri, directory_file) if directory_file else uri
    if scheme(uri) == "s3":
        bucket, key = _bucket_key(target)
        # list first: a GET's error on a missing bucket is just "404"; a listing names it
        _s3_call(uri, "list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        _s3_call(uri, "get_object", Bucket=bucket, Key=key, Range="bytes=0-0")
        return
    with open_uri(target, "rb") as f:
        f.read(1)


def check_writable(uri: str) -> None:
    """Raise unless a small probe object can be written under the prefix `uri` (and removed)."""
    probe = join(uri, f".flywheel-preflight-{uuid.uuid4().hex}")
    if scheme(uri) == "s3":
        bucket, key = _bucket_key(probe)
        _s3_call(uri, "put_object", Bucket=bucket, Key=key, Body=b"flywheel preflight probe")
        _s3_call(uri, "delete_object", Bucket=bucket, Key=key)
        return
    pipe(probe, b"flywheel preflight probe")
    rm(probe)


def check(inputs: dict[str, str], outputs: dict[str, str],
          directories: dict[str, str] | None = None) -> list[str]:
    """Preflight: every input readable, every output prefix writable. Keys name the field
    (`dataset.train`); `directories` maps a field to the file that must be readable under it
    (`baseModel` -> `config.json`). Returns one message per failure, naming the field, the
    URI and the store's error code; never a secret value."""
    problems = []
    for field, uri in inputs.items():
        try:
            check_readable(uri, (directories or {}).get(field))
        except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
            problems.append(_describe(f"{field}: cannot read", uri, e))
    for field, uri in outputs.items():
        try:
            check_writable(uri)
        except Exception as e:  # noqa: BLE001
            problems.append(_describe(f"{field}: cannot write to", uri, e))
    return problems


def check_run(cfg) -> list[str]:
    """`check` for a TrainerConfig: base model (unless hf://), datasets, output, checkpoints."""
    inputs = {"dataset.train": cfg.dataset.train}
    if cfg.dataset.eval:
        inputs["dataset.eval"] = cfg.dataset.eval
    dirs = {}
    if not cfg.baseModel.startswith("hf://"):
        inputs["baseModel"] = cfg.baseModel
        dirs["baseModel"] = "config.json"
    outputs = {"output.uri": cfg.output.uri}
    if cfg.checkpoint.uri:
        outputs["checkpoint.uri"] = cfg.checkpoint.uri
    return check(inputs, outputs, dirs)


def preflight_result(cfg) -> dict | None:
    """A failing preflight result when the run's storage is not usable, else None."""
    problems = check_run(cfg)
    return {"ok": False, "problems": problems, "errors": []} if problems else None
