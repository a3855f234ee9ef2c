"""`bench/operator_scale.py --kueue`: admission -> Running through Kueue beside the direct path.

N runs (1 node x 1 GPU each, fake H200 pool) through a Kueue ClusterQueue whose quota holds
them all, and N runs without a queue, with one operator whose Kueue integration is on. Per
run: Kueue's admission -> the run Running (Kueue unsuspends the Job, the pods start, the
operator sees them all running), and for the direct path Job created -> the run Running;
p50/p99 and runs Running per second for both, one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import kubernetes
import yaml
from operator_scale import (
    KUBECONFIG,
    METRICS_PORT,
    ROOT,
    kubectl,
    percentile,
    post_all,
    quiet_cluster,
    run_manifest,
    teardown,
    wait_for_metrics,
)


class Reached(threading.Thread):
    """Records when each object first reaches a state (local clock): `key(obj)` names it
    (its run) once it has, None before. Watches again when a watch ends; `errors` keeps what
    ended one."""

    def __init__(self, list_fn, namespace: str, key):
        super().__init__(daemon=True)
        self.list_fn, self.namespace, self.key = list_fn, namespace, key
        self.seen: dict[str, float] = {}
        self.events, self.errors = 0, []

    def run(self) -> None:
        while True:
            try:
                # resource_version "0": from the API server's watch cache as it is; a watch
                # without one waits for the cache to reach etcd's latest revision, and gives
                # up (504) when the cache lags on a loaded machine.
                for event in kubernetes.watch.Watch().stream(
                        self.list_fn, self.namespace, timeout_seconds=1800,
                        resource_version="0", _preload_content=False):
                    self.events += 1
                    if event["type"] == "ERROR":
                        self.errors.append(str(event["raw_object"])[:200])
                        break
                    key = event["type"] != "DELETED" and self.key(event["raw_object"])
                    if key:
                        self.seen.setdefault(key, time.monotonic())
            except Exception as err:  # noqa: BLE001 (reported in the result)
                self.errors.append(repr(err)[:200])
                time.sleep(0.5)


def _admitted(wl: dict) -> str | None:
    """The run of an admitted Workload (its Job is `<run>-a1`)."""
    if any(c["type"] == "Admitted" and c["status"] == "True"
           for c in (wl.get("status") or {}).get("conditions") or []):
        job = next((o["name"] for o in wl["metadata"].get("ownerReferences") or []
                    if o["kind"] == "Job"), None)
        return job and job.rsplit("-a", 1)[0]
    return None


def _pod_running(pod: dict) -> str | None:
    return (pod.get("status") or {}).get("phase") == "Running" and \
        pod["metadata"]["labels"].get("flywheel.dev/run")


def _run_running(run: dict) -> str | None:
    return (run.get("status") or {}).get("phase") == "Running" and run["metadata"]["name"]


def _stats(values: list[float]) -> dict:
    return {"p50_s": round(percentile(values, 0.5), 3),
            "p99_s": round(percentile(values, 0.99), 3)} if values else {}


def _through(api, ns: str, n: int, queue: str | None, timeout: float) -> dict:
    """Apply N runs in `ns` (through `queue`, or directly) and time them to Running."""
    batch, core = kubernetes.client.BatchV1Api(api), kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    watchers = {
        "job": Reached(batch.list_namespaced_job, ns,
                       lambda o: o["metadata"]["labels"].get("flywheel.dev/run")),
        "pods": Reached(core.list_namespaced_pod, ns, _pod_running),
        "running": Reached(lambda namespace, **kw: custom.list_namespaced_custom_object(
            "flywheel.dev", "v1alpha1", namespace, "finetuneruns", **kw), ns, _run_running)}
    if queue:
        watchers["admitted"] = Reached(lambda namespace, **kw: custom.list_namespaced_custom_object(
            "kueue.x-k8s.io", "v1beta2", namespace, "workloads", **kw), ns, _admitted)
    for w in watchers.values():
        w.start()
    time.sleep(1)  # the watches are open
    runs = [run_manifest(f"run-{i}") for i in range(n)]
    for run in runs:
        if queue:
            run["spec"]["queueName"] = queue
    started = time.monotonic()
    applied = post_all(api, f"/apis/flywheel.dev/v1alpha1/namespaces/{ns}/finetuneruns", runs)
    deadline = time.monotonic() + timeout
    running = watchers["running"].seen
    while len(running) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    done = sorted(running)
    # Per run: from Kueue's admission (or, directly, the Job's creation) to the run Running.
    since = watchers["admitted" if queue else "job"].seen
    out = {"running": len(done),
           "apply_to_running": _stats([running[r] - applied[r] for r in done]),
           "runs_running_per_s": round(len(done) / (max(running.values()) - started), 2)
           if done else 0}
    key = "admitted_to_running" if queue else "job_created_to_running"
    out[key] = _stats([running[r] - since[r] for r in done if r in since])
    pods = watchers["pods"].seen
    out["admitted_to_pods_running" if queue else "job_created_to_pods_running"] = _stats(
        [pods[r] - since[r] for r in done if r in since and r in pods])
    if len(done) < n:  # say why: what the watches saw, and what the API server says
        phases = [(r.get("status") or {}).get("phase") for r in json.loads(kubectl(
            "get", "ftr", "-n", ns, "-o", "json"))["items"]]
        out["incomplete"] = {"running_in_api": phases.count("Running"),
                             **{k: {"events": w.events, "seen": len(w.seen),
                                    "errors": w.errors[:3]} for k, w in watchers.items()}}
    if queue:
        out["apply_to_admitted"] = _stats([since[r] - applied[r] for r in done if r in since])
    return out


def kueue(n: int, record: bool) -> None:
    """Admission -> Running through Kueue, beside the direct path (module docstring)."""
    extra_nodes = quiet_cluster(2 * n)  # room for both sets of pods at once
    stamp = datetime.now(UTC).strftime("%H%M%S")
    ns_direct, ns_queued, cq = f"bench-direct-{stamp}", f"bench-kueue-{stamp}", f"bench-{stamp}"
    operator = None
    try:
        for ns in (ns_direct, ns_queued):
            kubectl("create", "namespace", ns)
            kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=60s")
        # A ClusterQueue whose quota holds every run (1 GPU each), and the namespace's LocalQueue.
        kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
                 "metadata": {"name": cq},
                 "spec": {"namespaceSelector": {}, "resourceGroups": [{
                     "coveredResources": ["nvidia.com/gpu", "cpu", "memory"],
                     "flavors": [{"name": "h200", "resources": [
                         {"name": "nvidia.com/gpu", "nominalQuota": n},
                         {"name": "cpu", "nominalQuota": 1000 * n},
                         {"name": "memory", "nominalQuota": f"{1000 * n}Gi"}]}]}]}},
                {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                 "metadata": {"name": "bench", "namespace": ns_queued},
                 "spec": {"clusterQueue": cq}}]}))
        # The operator's defaults (as the plain benchmark runs it), with the Kueue integration on.
        config_file = Path(tempfile.mkdtemp()) / "operator.yaml"
        config_file.write_text(yaml.safe_dump({"kueue": {"enabled": True}}))
        api = kubernetes.config.new_client_from_config(config_file=str(KUBECONFIG))
        api.configuration.connection_pool_maxsize = 32
        log = open(ROOT / ".cache" / "bench-operator.log", "wb")  # noqa: SIM115
        operator = subprocess.Popen(
            [sys.executable, "-m", "flywheel_operator", "--standalone", "--all-namespaces",
             "--metrics-port", str(METRICS_PORT), "--liveness", "", "--config", str(config_file)],
            env={**os.environ, "KUBECONFIG": str(KUBECONFIG)}, stdout=log, stderr=subprocess.STDOUT)
        wait_for_metrics()
        time.sleep(2)  # let the initial listing settle
        direct = _through(api, ns_direct, n, None, timeout=600)
        queued = _through(api, ns_queued, n, "bench", timeout=1200)
    finally:
        teardown(operator, [ns_direct, ns_queued], extra_nodes,
                 lambda: kubectl("delete", "clusterqueue", cq, "--wait=false",
                                 "--ignore-not-found"))
    result = {"mode": "kueue", "runs": n, "kueue": queued, "direct": direct}
    if record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write(f"\n### operator_scale --kueue, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
                      f"`bench/operator_scale.py --kueue --runs {n}` (2-core dev machine, shared, "
                      f"local control plane)\n\n```json\n{json.dumps(result)}\n```\n")
    print(json.dumps(result), flush=True)

