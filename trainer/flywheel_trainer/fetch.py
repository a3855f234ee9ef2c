"""Fetch an exported model from its store and verify it against its digest.

    python -m flywheel_trainer.fetch --uri URI --digest sha256:HEX --to DIR [--workers N]

Downloads the top-level files of the artifact at URI (s3://, gs://, pvc://, file://; the
credentials are the training pods': AWS_* variables, GOOGLE_APPLICATION_CREDENTIALS, workload
identity) into a temporary directory beside DIR, hashing every byte as it is written, and moves
it into place only once every file matches: a refused or failed fetch leaves DIR as it was.
DIR then holds the model files, the manifest and a marker (`.flywheel-fetched`, the digest);
fetching the same digest into it again downloads nothing. DIR's parent must be writable and
DIR must not itself be a mount point (mount the volume at the parent: `/models` for
`/models/current`). Prints one JSON line on success.

Exit codes: 0 verified (or already there), 1 refused (the bytes do not match the digest; the
message names the first file that differs), 2 usage (a bad or unset argument), 3 the store
could not be read (its error code, never a secret).

The digest (`export.digest_lines`) is `sha256:` + sha256 over the lines `<sha256>  <name>\\n`
of every top-level file, sorted by name: exactly the `sha256sum` listing of the directory.
Exports also write that listing, byte for byte, as the manifest `.flywheel-sha256sums` beside
the files (not itself part of the digest), so a fetch checks sha256(manifest) against the
digest first, then each file against its line, and can name the file that differs, a listed
file that is missing or a file the manifest does not list. An artifact exported before the
manifest existed is verified as a whole (the message then says it cannot name the file).

`verify_dir(local_dir, digest)` checks a local directory the same way (the trainer's base
model, `model.resolve_model_path(..., digest=...)`). Torch-free: starts fast in an init
container.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import storage

MANIFEST = ".flywheel-sha256sums"
MARKER = ".flywheel-fetched"
RESERVED = (MANIFEST, MARKER)  # never part of an artifact or its digest
LOCAL_MARKERS = (".complete",)  # the trainer's model cache marker, ignored in local dirs
EXIT_REFUSED, EXIT_USAGE, EXIT_STORE = 1, 2, 3
WORKERS = 4
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LINE = re.compile(r"([0-9a-f]{64})  ([^/\n]+)")

log = logging.getLogger("flywheel.fetch")


class DigestMismatch(ValueError):
    """The bytes do not match the digest; `name` is the first file that differs (None when it
    cannot be told: no manifest)."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class _Stopped(Exception):
    """A download abandoned because an earlier file already failed."""


# ----------------------------------------------------------------------------- digest


def manifest_body(hashes: dict[str, str]) -> str:
    """The digest's preimage: `<sha256>  <name>\\n` per file, sorted by name."""
    return "".join(f"{h}  {n}\n" for n, h in sorted(hashes.items()))


def digest_lines(hashes: dict[str, str]) -> str:
    return "sha256:" + hashlib.sha256(manifest_body(hashes).encode()).hexdigest()


def check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest or ""):
        hint = " (the variable is not set)" if (digest or "").startswith("$(") else ""
        raise ValueError(f"digest {digest!r}{hint}: expected sha256: and 64 lowercase hex digits")
    return digest


def parse_manifest(body: bytes, digest: str) -> dict[str, str]:
    """name -> sha256 from a manifest, once sha256(manifest) is the digest."""
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if actual != digest:
        raise DigestMismatch(f"{MANIFEST}: manifest does not match digest {digest} (it hashes "
                             f"to {actual}): this is not the artifact the digest names", MANIFEST)
    listed: dict[str, str] = {}
    for i, line in enumerate(body.decode("utf-8", "replace").splitlines(), 1):
        m = _LINE.fullmatch(line)
        if not m or m[2] in (".", "..") or m[2] in RESERVED or m[2] in listed:
            raise DigestMismatch(f"{MANIFEST}: line {i} is not `<sha256>  <name>`", MANIFEST)
        listed[m[2]] = m[1]
    return listed


def _listing_problem(present: Iterable[str], listed: dict[str, str],
                     partial: bool = False) -> DigestMismatch | None:
    """The first file (by name) missing from, or absent in, the manifest; None when they agree."""
    present = set(present)
    problems = {n: "not in the manifest" for n in present - listed.keys()}
    if not partial:
        problems.update({n: "listed in the manifest but missing"
                         for n in listed.keys() - present})
    if not problems:
        return None
    name = min(problems)
    return DigestMismatch(f"{name}: {problems[name]}", name)


def _differs(name: str, actual: str, expected: str) -> DigestMismatch:
    return DigestMismatch(f"{name}: the first file that differs: its sha256 is {actual}, "
                          f"the manifest says {expected}", name)


def _no_manifest(actual: str, digest: str) -> DigestMismatch:
    return DigestMismatch(f"digest {actual} does not match {digest}; the artifact has no "
                          f"manifest ({MANIFEST}), so the file that differs cannot be named")


@contextlib.contextmanager
def _in_order(names: list[str], work: Callable[[str, threading.Event], tuple],
              workers: int) -> Iterator[Iterator[tuple]]:
    """An iterator of (name, *work(name)) in the order of `names`, `workers` running at once;
    leaving the block early (an earlier file failed) abandons the rest."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fetch")
    try:
        futures = [(n, pool.submit(work, n, stop)) for n in names]
        yield ((name, *future.result()) for name, future in futures)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- local dirs


def _hash_local(path: Path, stop: threading.Event) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(storage.CHUNK):
            if stop.is_set():
                raise _Stopped
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def verify_dir(local_dir: str | os.PathLike, digest: str, patterns: list[str] | None = None,
               workers: int = WORKERS) -> bool:
    """Check the top-level files of `local_dir` against `digest`; raise DigestMismatch naming
    the first file that differs (through the manifest in the directory; without one, the
    whole digest is compared and no file can be named). `patterns`: check only the files
    matching them (a partial copy: config and tokenizer), which needs the manifest; without
    one nothing is checked and False is returned. True when verified."""
    check_digest(digest)
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    present = sorted(p.name for p in root.iterdir()
                     if p.is_file() and p.name not in RESERVED + LOCAL_MARKERS)
    if patterns is not None:
        present = [n for n in present if any(fnmatch.fnmatch(n, p) for p in patterns)]
    where = f"{root}: "
    manifest = root / MANIFEST
    if manifest.is_file():
        listed = _prefixed(where, lambda: parse_manifest(manifest.read_bytes(), digest))
        problem = _listing_problem(present, listed, partial=patterns is not None)
        if problem:
            raise DigestMismatch(where + str(problem), problem.name)
        with _in_order(present, lambda n, s: _hash_local(root / n, s), workers) as results:
            for name, actual, _ in results:
                if actual != listed[name]:
                    raise DigestMismatch(where + str(_differs(name, actual, listed[name])), name)
        return True
    if patterns is not None:
        log.warning("%s: no manifest (%s): a partial copy cannot be verified", root, MANIFEST)
        return False
    with _in_order(present, lambda n, s: _hash_local(root / n, s), workers) as results:
        hashes = {n: h for n, h, _ in results}
    actual = digest_lines(hashes)
    if actual != digest:
        raise DigestMismatch(where + str(_no_manifest(actual, digest)))
    return True


def _prefixed(where: str, fn: Callable):
    try:
        return fn()
    except DigestMismatch as e:
        raise DigestMismatch(where + str(e), e.name) from None


# ----------------------------------------------------------------------------- fetch


def _download(uri: str, dest: Path, stop: threading.Event) -> tuple[str, int]:
    """Stream `uri` to `dest`, hashing exactly the bytes written."""
    h, size = hashlib.sha256(), 0
    with storage.open_uri(uri, "rb", block_size=storage.CHUNK) as src, open(dest, "wb") as out:
        while chunk := src.read(storage.CHUNK):
            if stop.is_set():
                raise _Stopped
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def fetched_digest(to: str | os.PathLike) -> str | None:
    """The digest a previous fetch verified into `to` (its marker), or None."""
    try:
        return json.loads((Path(to) / MARKER).read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def _download_verified(uri: str, digest: str, tmp: Path, workers: int) -> tuple[int, int, bool]:
    """Download into `tmp`, verifying; (files, bytes, whether a manifest named each file)."""
    entries = [e for e in storage.listdir(uri) if e["type"] == "file"]
    if not entries:
        raise FileNotFoundError(f"{uri}: no files there")
    names = {e["name"] for e in entries}
    present = sorted(names - set(RESERVED))

    def get(name: str, stop: threading.Event) -> tuple[str, int]:
        return _download(storage.join(uri, name), tmp / name, stop)

    if MANIFEST in names:
        with storage.open_uri(storage.join(uri, MANIFEST), "rb") as f:
            body = f.read()
        listed = parse_manifest(body, digest)
        problem = _listing_problem(present, listed)
        if problem:
            raise problem
        total = 0
        with _in_order(present, get, workers) as results:
            for name, actual, size in results:
                if actual != listed[name]:
                    raise _differs(name, actual, listed[name])
                total += size
        (tmp / MANIFEST).write_bytes(body)
        return len(present), total, True
    with _in_order(present, get, workers) as got:
        results = list(got)
    actual = digest_lines({n: h for n, h, _ in results})
    if actual != digest:
        raise _no_manifest(actual, digest)
    return len(present), sum(s for _, _, s in results), False


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _replace(tmp: Path, to: Path) -> None:
    old = None
    if to.exists() or to.is_symlink():
        old = to.parent / f".{to.name}.fetch-old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(to, old)
        except OSError as e:
            raise OSError(f"{to}: cannot replace it ({e.strerror}); it must not be a mount "
                          "point: mount the volume at its parent") from None
    os.rename(tmp, to)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


def fetch(uri: str, digest: str, to: str | os.PathLike, workers: int = WORKERS) -> dict:
    """Download the artifact at `uri` into `to`, verified against `digest` (see the module's
    docstring); raises DigestMismatch when refused. Returns what was done."""
    check_digest(digest)
    to = Path(os.path.abspath(to))
    start = time.monotonic()
    result = {"uri": uri, "digest": digest, "dir": str(to)}
    if fetched_digest(to) == digest:
        return {**result, "skipped": True}
    to.parent.mkdir(parents=True, exist_ok=True)
    with _locked(to.parent / f".{to.name}.fetch.lock"):  # one fetch into `to` at a time
        if fetched_digest(to) == digest:
            return {**result, "skipped": True}
        for stale in to.parent.glob(f".{to.name}.fetch-*"):  # left by a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.fetch-", dir=to.parent))
        try:
            try:
                files, size, named = _download_verified(uri, digest, tmp, workers)
            except DigestMismatch as e:
                raise DigestMismatch(f"{uri}: {e}", e.name) from None
            (tmp / MARKER).write_text(json.dumps({"uri": uri, "digest": digest}) + "\n")
            _replace(tmp, to)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**result, "skipped": False, "files": files, "bytes": size, "manifest": named,
            "seconds": round(time.monotonic() - start, 3)}


# ----------------------------------------------------------------------------- command


def _uri(value: str) -> str:
    if not value or value.startswith("$("):
        raise argparse.ArgumentTypeError(f"{value!r}: not set (is the variable defined?)")
    return value


def _digest(value: str) -> str:
    try:
        return check_digest(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flywheel_trainer.fetch",
        description="Download an exported model and verify it against its digest.")
    parser.add_argument("--uri", required=True, type=_uri,
                        help="the artifact (s3://, gs://, pvc://, file://)")
    parser.add_argument("--digest", required=True, type=_digest, help="sha256:<64 hex>")
    parser.add_argument("--to", required=True, help="directory to fetch into")
    parser.add_argument("--workers", type=int,
                        default=int(os.environ.get("FLYWHEEL_FETCH_WORKERS", WORKERS)),
                        help=f"files downloaded at once (default {WORKERS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s fetch %(levelname)s %(message)s")
    try:
        result = fetch(args.uri, args.digest, args.to, args.workers)
    except DigestMismatch as e:
        log.error("refused: %s", storage.redact(str(e)))
        return EXIT_REFUSED
    except Exception as e:  # noqa: BLE001 - the store's error, reported without secrets
        log.error("%s", storage._describe("cannot fetch", args.uri, e))
        return EXIT_STORE
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
