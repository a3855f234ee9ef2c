"""The local S3 server: versitygw (Apache-2.0, posix backend) on loopback, built from its Go
module by hack/build-tools.sh into .cache/bin/versitygw.

`hack/cluster.py up` starts it with generated root credentials, writes them (mode 0600) to
.cache/cluster/s3.json and .cache/cluster/s3.env and creates the buckets in `BUCKETS`;
`down` stops it. Runs on the local cluster reach it the way a user's runs reach their store:
a Secret with the keys (`apply_secret`) and the endpoint in the operator config.

    python hack/local_s3.py env                      # shell exports for the running server
    python hack/local_s3.py upload DIR s3://BUCKET/PREFIX
    python hack/local_s3.py secret NAMESPACE         # the credentials Secret, applied

The tests start their own server (`launch`) in a temporary directory, without the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".cache" / "bin"
STATE = ROOT / ".cache" / "cluster"
CONFIG = STATE / "s3.json"
ENV_FILE = STATE / "s3.env"
DATA = STATE / "s3"
PORT = int(os.environ.get("FLYWHEEL_S3_PORT", "17070"))
REGION = "us-east-1"
BUCKETS = ("flywheel",)  # the demo's and the tests' objects live under s3://flywheel/
SECRET_NAME = "flywheel-s3"  # the Secret runs on the local cluster name for their keys


@dataclass
class S3:
    """Where a running server is and the root credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION

    def env(self) -> dict[str, str]:
        """The standard variables a client (the trainer, s3fs, botocore) reads."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": self.region,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A botocore S3 client (path-style, as for any S3-compatible endpoint)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2}))

    def __repr__(self) -> str:  # never print the secret
        return f"S3(endpoint={self.endpoint!r}, access_key={self.access_key!r})"


def new_credentials(port: int) -> S3:
    return S3(endpoint=f"http://127.0.0.1:{port}",
              access_key="FW" + secrets.token_hex(9).upper(),
              secret_key=secrets.token_urlsafe(30))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(s3: S3, root: Path) -> tuple[list[str], dict]:
    """versitygw's argv (objects under root/data, its own IAM under root/iam, so wrong keys
    get InvalidAccessKeyId and `create_user` works) and the environment holding its root keys
    (not on the command line, where any local user could read them)."""
    for sub in ("data", "iam"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = s3.endpoint.rsplit(":", 1)[1]
    # --data-integrity-etag: ETags from the CRC64-NVME the server keeps anyway, not an MD5 of
    # every byte (a quarter of its CPU, on the trainer's own cores here: bench/RESULTS.md). S3
    # ETags are opaque (AWS's own are no MD5 under SSE-KMS or multipart); nothing reads them.
    args = [str(BIN / "versitygw"), "--port", f"127.0.0.1:{port}", "--region", s3.region,
            "--health", "/health", "--quiet", "--iam-dir", str(root / "iam"),
            "posix", "--data-integrity-etag", str(root / "data")]
    return args, {"ROOT_ACCESS_KEY": s3.access_key, "ROOT_SECRET_KEY": s3.secret_key}


def ready(s3: S3) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{s3.endpoint}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def launch(s3: S3, root: Path, log: Path, timeout: float = 30) -> subprocess.Popen:
    """Start a server storing under `root` (in its own session); returns once it answers."""
    args, env = command(s3, root)
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready(s3):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"versitygw did not start; log: {log}\n"
                               + log.read_text()[-2000:])
        time.sleep(0.1)
    return proc


def create_buckets(s3: S3, names=BUCKETS) -> None:
    client = s3.client()
    have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for name in names:
        if name not in have:
            client.create_bucket(Bucket=name)


def admin(s3: S3, *args: str) -> None:
    """versitygw's admin CLI as root, e.g. `create-user --access K --secret S --role user`."""
    env = {**os.environ, "ADMIN_ACCESS_KEY": s3.access_key, "ADMIN_SECRET_KEY": s3.secret_key,
           "ADMIN_ENDPOINT_URL": s3.endpoint}
    proc = subprocess.run([str(BIN / "versitygw"), "admin", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"versitygw admin {args[0]} failed: {proc.stderr.strip()}")


# --- the cluster's server: credentials generated once per cluster, kept under .cache/cluster


def write_config(s3: S3) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (CONFIG, json.dumps(asdict(s3), indent=2)),
        (ENV_FILE, "".join(f"export {k}={v}\n" for k, v in s3.env().items())),
    ):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text)


def load() -> S3:
    """The cluster's server (from .cache/cluster/s3.json, written by `cluster.py up`)."""
    if not CONFIG.exists():
        raise SystemExit(f"{CONFIG} is missing: bring the local cluster up first")
    return S3(**json.loads(CONFIG.read_text()))


def cluster_server() -> tuple[S3, list[str], dict]:
    """Credentials for the cluster's server (generated on first use) and its command."""
    s3 = load() if CONFIG.exists() else new_credentials(PORT)
    write_config(s3)
    args, env = command(s3, DATA)
    return s3, args, env


# --- what `make run` and the tests need on the cluster ------------------------------------


def upload_dir(local: str | Path, uri: str, s3: S3 | None = None) -> list[str]:
    """Upload every file under `local` to `uri` (s3://bucket/prefix/); returns the keys."""
    s3 = s3 or load()
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client, keys = s3.client(), []
    local = Path(local)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = "/".join(p for p in (prefix.strip("/"), path.relative_to(local).as_posix()) if p)
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=key, Body=f)
        keys.append(key)
    return keys


def upload(local: Path, target: str) -> str:
    """Upload a file or folder to `target` (s3://bucket/key, or a prefix for a folder)."""
    if local.is_dir():
        upload_dir(local, target)
    else:
        bucket, _, key = target.removeprefix("s3://").partition("/")
        with open(local, "rb") as f:
            load().client().put_object(Bucket=bucket, Key=key, Body=f)
    return target


@contextlib.contextmanager
def access(location: str):
    """Read an s3:// location with this server's endpoint and keys (this process only)."""
    extra = load().env() if location.startswith("s3://") else {}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def secret_manifest(namespace: str, s3: S3 | None = None, name: str = SECRET_NAME) -> dict:
    """The credentials Secret a run names (its keys are the standard AWS variable names)."""
    s3 = s3 or load()
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "flywheel"}},
            "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key,
                           "AWS_SECRET_ACCESS_KEY": s3.secret_key}}


def apply_secret(namespace: str, s3: S3 | None = None, name: str = SECRET_NAME,
                 kubeconfig: Path = STATE / "kubeconfig") -> None:
    """Create or update the credentials Secret in `namespace` (through stdin, never argv)."""
    subprocess.run([str(BIN / "kubectl"), "--kubeconfig", str(kubeconfig), "apply",
                    "--server-side", "--force-conflicts", "-f", "-"],
                   input=json.dumps(secret_manifest(namespace, s3, name)), text=True,
                   check=True, capture_output=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["env"]:
        load()  # exits naming the missing file when the cluster is down
        print(ENV_FILE.read_text(), end="")
    elif argv[:1] == ["upload"] and len(argv) == 3:
        for key in upload_dir(argv[1], argv[2]):
            print(key)
    elif argv[:1] == ["secret"] and len(argv) == 2:
        apply_secret(argv[1])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
