"""The local control plane's S3 server (versitygw): up with the cluster, keys generated and
kept private, anonymous requests refused, and the helpers `make run` uses."""

from __future__ import annotations

import base64
import stat
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from hack import local_s3
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster


def test_s3_server_runs_on_loopback_with_generated_private_keys(cluster):
    s3 = local_s3.load()
    assert s3.endpoint.startswith("http://127.0.0.1:")
    for path in (local_s3.CONFIG, local_s3.ENV_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    client = s3.client()
    assert "flywheel" in {b["Name"] for b in client.list_buckets()["Buckets"]}
    key = f"smoke/{uuid.uuid4().hex}"
    client.put_object(Bucket="flywheel", Key=key, Body=b"hello")
    assert client.get_object(Bucket="flywheel", Key=key)["Body"].read() == b"hello"
    # the root secret is neither on the server's command line nor in its log
    pid = int((ROOT / ".cache/cluster/run/versitygw.pid").read_text().split()[0])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert s3.secret_key not in cmdline and s3.access_key not in cmdline
    assert s3.secret_key not in (ROOT / ".cache/cluster/logs/versitygw.log").read_text()


def test_s3_server_refuses_anonymous_requests(cluster):
    s3 = local_s3.load()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{s3.endpoint}/flywheel?list-type=2", timeout=5)
    assert err.value.code == 403 and b"AccessDenied" in err.value.read()


def test_upload_dir_and_credentials_secret(cluster, namespace, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    prefix = f"upload-{uuid.uuid4().hex[:8]}"
    keys = local_s3.upload_dir(tmp_path, f"s3://flywheel/{prefix}/")
    assert keys == [f"{prefix}/a.txt", f"{prefix}/sub/b.txt"]
    s3 = local_s3.load()
    body = s3.client().get_object(Bucket="flywheel", Key=f"{prefix}/sub/b.txt")["Body"].read()
    assert body == b"b"
    local_s3.apply_secret(namespace)
    secret = cluster.get("secret", local_s3.SECRET_NAME, "-n", namespace)
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
