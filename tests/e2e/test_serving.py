"""The serving layer refuses a corrupted model and keeps serving the one it has.

The sample's serving Deployment (hack/serving.py: fetch init container, `transformers serve`)
runs on the local pool. Version 1 is promoted and served; version 2 is registered with a
digest of its true bytes, and then one byte of its weights is flipped in the store, as a bad
disk or a half-finished copy would. Its promotion rolls the Deployment: the new pod's fetch
refuses the artifact naming the file, the pod never becomes Ready, and the old pod goes on
answering with version 1.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from hack import local_s3, serving
from hack import run as demo
from tests.conftest import Cluster, wait_until
from tests.integration.test_registry import train

pytestmark = pytest.mark.cluster

WEIGHTS = "model.safetensors"


def publish(model_dir, uri: str, extra: dict[str, bytes]) -> str:
    """Upload the model (plus `extra` files) with its manifest, as an export does; returns
    the digest of the bytes uploaded."""
    from flywheel_trainer.fetch import MANIFEST, digest_lines, manifest_body

    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} | extra
    hashes = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    client, (bucket, _, prefix) = local_s3.load().client(), uri[5:].partition("/")
    for name, body in {**files, MANIFEST: manifest_body(hashes).encode()}.items():
        client.put_object(Bucket=bucket, Key=prefix + name, Body=body)
    return digest_lines(hashes)


def summary(uri: str, digest: str, accuracy: float) -> str:
    return json.dumps({
        "artifact": {"uri": uri, "digest": digest, "format": "huggingface-safetensors"},
        "metrics": {"eval_loss": 1.0, "tool_call_accuracy": accuracy,
                    "tool_call_accuracy/email": accuracy},
        "steps": 10, "tokens": 1000, "throughput": {"tokensPerSecond": 100.0},
        "tracking": {"url": None, "experimentKey": "b" * 32}})


def test_a_corrupted_artifact_is_refused_naming_the_file_and_the_old_pod_keeps_serving(
        cluster: Cluster, operator, namespace, tmp_path):
    model_dir = demo.build_base(tmp_path)
    base = f"s3://{demo.BUCKET}/{namespace}"
    local_s3.apply_secret(namespace)
    cluster.apply(serving.deployment(namespace))
    cluster.apply({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "Model", "metadata": {"name": "flow-agent"},
        "spec": {"promotion": {"alias": "production",
                               "gates": [{"metric": "tool_call_accuracy/email", "min": 0.5}]},
                 "servingTargets": [{"deployment": serving.NAME, "container": "server"}]},
    }, namespace)
    request = {"messages": [{"role": "user", "content": "Mail ana@example.com"}],
               "tools": [{"type": "function", "function": {"name": "send_email"}}]}

    v1 = publish(model_dir, f"{base}/v1/", {})
    train(cluster, namespace, "week-1", summary(f"{base}/v1/", v1, 0.8))
    old = serving.rolled_out(cluster.get, namespace, v1)
    assert old is not None, "version 1 is served"
    serving.ask(old, request)  # it answers (an untrained model: whatever it says)

    v2 = publish(model_dir, f"{base}/v2/", {"notes.txt": b"week 2\n"})
    client = local_s3.load().client()
    key = f"{namespace}/v2/{WEIGHTS}"
    body = bytearray(client.get_object(Bucket=demo.BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF  # one byte flipped after the digest was taken
    client.put_object(Bucket=demo.BUCKET, Key=key, Body=bytes(body))
    train(cluster, namespace, "week-2", summary(f"{base}/v2/", v2, 0.9))

    def refused():
        for pod in cluster.get("pods", "-n", namespace, "-l", f"app={serving.NAME}")["items"]:
            if serving.served_digest(pod) != v2:
                continue
            for init in pod["status"].get("initContainerStatuses") or []:
                last = (init.get("lastState") or {}).get("terminated") or (
                    init.get("state") or {}).get("terminated") or {}
                if last.get("exitCode"):
                    return pod, last
        return None

    pod, ended = wait_until(refused, timeout=120, interval=1,
                            message="the new pod's fetch refuses version 2")
    assert ended["exitCode"] == 1  # refused: the bytes do not match the digest
    assert WEIGHTS in ended["message"], ended["message"]
    assert pod["status"]["phase"] == "Pending"
    # The old pod was not touched and still answers, with version 1.
    pods = {p["metadata"]["name"]: p for p in cluster.get(
        "pods", "-n", namespace, "-l", f"app={serving.NAME}")["items"]}
    still = pods[old["metadata"]["name"]]
    assert serving.served_digest(still) == v1 and not still["metadata"].get("deletionTimestamp")
    assert any(c["type"] == "Ready" and c["status"] == "True"
               for c in still["status"]["conditions"])
    serving.ask(still, request)
