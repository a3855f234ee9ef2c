"""The sample's serving layer: a Deployment that really serves the production model, and the
request `make run` sends it.

The `tiny-agent-server` Deployment runs on the `local` pool, so the local executor runs it as
a kubelet would (hack/local_executor.py). It is the pattern of examples/serving-vllm.yaml with
a server that runs on a CPU:

- the init container `fetch-model` (`python -m flywheel_trainer.fetch`, from the trainer
  image) downloads the artifact named by the pod's `flywheel.dev/model-uri` annotation with
  the store's keys from the Secret, and verifies every file against `flywheel.dev/model-digest`
  (the operator writes both on each promotion); a mismatch fails the init container naming the
  file, the new pod never becomes Ready and the old one keeps serving (maxUnavailable: 0);
- the server is `transformers serve` (transformers' own OpenAI-compatible server: the same
  library, chat template and Qwen3 tool-call parser the trainer evaluates with, no second
  runtime to install; vLLM serves the same artifact on GPUs), started on the fetched copy and
  Ready once `/health` answers.

`ask` sends one held-out request with its tools through the OpenAI client to the pod that
serves production's digest and returns the tool call that comes back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flywheel_operator.config import DEFAULT_IMAGE as IMAGE  # the runs' trainer image
from flywheel_operator.vocab import DIGEST_ANNOTATION, URI_ANNOTATION

from hack import local_s3

MODEL = "tiny-agent"
NAME = f"{MODEL}-server"
PORT = 8000


def deployment(namespace: str) -> dict:
    """The serving Deployment (the Model names it in servingTargets)."""
    models = [{"name": "models", "mountPath": "/models"}]
    keys = [{"name": k, "valueFrom": {"secretKeyRef": {"name": local_s3.SECRET_NAME, "key": k}}}
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    s3 = local_s3.load()
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": {"app": NAME}},
        "spec": {
            "replicas": 1,
            # an old pod goes only once a new one is Ready: a refused model never takes traffic
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "selector": {"matchLabels": {"app": NAME}},
            "template": {
                "metadata": {"labels": {"app": NAME}},
                "spec": {
                    "nodeSelector": {"flywheel.dev/pool": "local"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"}],
                    "terminationGracePeriodSeconds": 5,
                    "initContainers": [{
                        "name": "fetch-model", "image": IMAGE,
                        "command": ["python", "-m", "flywheel_trainer.fetch",
                                    "--uri", "$(FLYWHEEL_MODEL_URI)",
                                    "--digest", "$(FLYWHEEL_MODEL_DIGEST)",
                                    "--to", f"/models/{MODEL}"],
                        "env": [
                            {"name": "FLYWHEEL_MODEL_URI", "valueFrom": {"fieldRef": {
                                "fieldPath": f"metadata.annotations['{URI_ANNOTATION}']"}}},
                            {"name": "FLYWHEEL_MODEL_DIGEST", "valueFrom": {"fieldRef": {
                                "fieldPath": f"metadata.annotations['{DIGEST_ANNOTATION}']"}}},
                            *keys,
                            {"name": "AWS_ENDPOINT_URL_S3", "value": s3.endpoint},
                            {"name": "AWS_REGION", "value": s3.region}],
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "volumeMounts": models}],
                    "containers": [{
                        "name": "server", "image": IMAGE,
                        # the model is served by its folder's name, relative to workingDir
                        "command": ["transformers", "serve", MODEL, "--host", "$(POD_IP)",
                                    "--port", str(PORT), "--device", "cpu"],
                        "workingDir": "/models",
                        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {
                                    "fieldPath": "status.podIP"}}},
                                {"name": "HF_HUB_OFFLINE", "value": "1"}],
                        "ports": [{"name": "http", "containerPort": PORT}],
                        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                                           "periodSeconds": 2},
                        "volumeMounts": models}],
                    "volumes": [{"name": "models", "emptyDir": {}}],
                },
            },
        },
    }


def rolled_out(get, namespace: str, digest: str, timeout: float = 240) -> dict | None:
    """The Ready pod serving `digest` once the rollout to it has finished (the old pods gone),
    or None after `timeout` (e.g. the fetch refused the artifact)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = [p for p in get("pods", "-n", namespace, "-l", f"app={NAME}")["items"]
                if not p["metadata"].get("deletionTimestamp")]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p["status"].get("conditions") or [])]
        if len(pods) == 1 and ready and served_digest(ready[0]) == digest:
            return ready[0]
        time.sleep(1)
    return None


def served_digest(pod: dict) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get(DIGEST_ANNOTATION)


def held_out_request(eval_file: Path, index: int = 0) -> dict:
    """One row of the held-out eval set: its system and user messages, its tools and the
    tool call it expects."""
    row = json.loads(eval_file.read_text().splitlines()[index])
    messages = row["messages"]
    asked = [m for m in messages[:2] if m["role"] in ("system", "user")]
    expected = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]["function"]
    return {"messages": asked, "tools": row["tools"], "category": row.get("category"),
            "expected": {"name": expected["name"],
                         "arguments": json.loads(expected["arguments"])}}


def ask(pod: dict, request: dict) -> dict:
    """Send `request` to the pod's OpenAI-compatible API; the tool call it answers with
    ({name, arguments}; {content} when it answers in text; {error} when the server fails,
    e.g. on a malformed tool call it cannot parse: a weak model's answer)."""
    import openai

    client = openai.OpenAI(base_url=f"http://{pod['status']['podIP']}:{PORT}/v1",
                           api_key="unused", timeout=120, max_retries=1)
    try:
        reply = client.chat.completions.create(model=MODEL, messages=request["messages"],
                                               tools=request["tools"], max_tokens=160)
    except openai.APIStatusError as err:
        return {"error": f"HTTP {err.status_code} from the server"}
    message = reply.choices[0].message
    if not message.tool_calls:
        return {"content": message.content}
    call = message.tool_calls[0].function
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:
        arguments = call.arguments
    return {"name": call.name, "arguments": arguments}


def show(call: dict) -> str:
    if "error" in call:
        return f"(no answer: {call['error']}; the model's output is not a call it can parse)"
    if "name" not in call:
        return f"(no tool call) {call.get('content')!r}"
    return f"{call['name']}({json.dumps(call['arguments'])})"
