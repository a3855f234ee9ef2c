"""Operator scale benchmark on the local control plane.

    .venv/bin/python bench/operator_scale.py --runs 500

Applies N FineTuneRuns at once (1 node x 1 GPU each, enough fake H200 nodes added) and
measures apply -> Job created latency (p50/p99), runs reconciled per second, the operator's
peak RSS and its API requests per run. In the same run it creates N plain Jobs and measures
the native Job controller's Job -> Pod created latency on the same control plane as the
yardstick. Prints one JSON line last and appends the figures to bench/RESULTS.md.

    make cluster-down && FLYWHEEL_FAKE_POD_CIDR=127.20.0.0/16 make cluster-up
    .venv/bin/python bench/operator_scale.py --training --runs 200

`--training`: N runs training at once on the fake pool, rank 0 of each answered by a stand-in
progress endpoint; the operator's CPU and API writes per run per minute in steady state (see
bench/operator_scale_training.py).

`--kueue`: admission -> Running through Kueue beside the direct path (see
bench/operator_scale_kueue.py).

`--soak`: runs created, trained, finished and deleted in waves for `--minutes`, about `--live`
at a time, `--runs` in all; the operator's RSS, tables and status freshness every minute (see
bench/operator_scale_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import kubernetes
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KUBECONFIG = ROOT / ".cache" / "cluster" / "kubeconfig"
KUBECTL = ROOT / ".cache" / "bin" / "kubectl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The operator's metrics endpoint: a port the OS handed out, kept in the environment so the
# mode modules (which import this file again as `operator_scale`) see the same one.
METRICS_PORT = int(os.environ.setdefault("FLYWHEEL_BENCH_METRICS_PORT", str(free_port())))


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run([str(KUBECTL), "--kubeconfig", str(KUBECONFIG), *args], check=True,
                          capture_output=True, text=True, input=input).stdout


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Watcher(threading.Thread):
    """Records when each object of a kind first appears (local clock)."""

    def __init__(self, api, list_fn, namespace: str, key):
        super().__init__(daemon=True)
        self.api, self.list_fn, self.namespace, self.key = api, list_fn, namespace, key
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        # A watch the apiserver closes early (a slow reader in a 1,000-object burst) goes on
        # from the last version seen: an object created meanwhile is still seen, late.
        version, deadline = None, time.monotonic() + 900
        self.ready.set()
        while time.monotonic() < deadline:
            watch = kubernetes.watch.Watch()
            for event in watch.stream(self.list_fn, self.namespace, resource_version=version,
                                      timeout_seconds=int(deadline - time.monotonic()) + 1,
                                      _preload_content=False):
                obj = event["raw_object"]
                version = obj["metadata"].get("resourceVersion") or version
                if event["type"] == "ADDED":
                    key = self.key(obj)
                    if key:
                        self.seen.setdefault(key, time.monotonic())


def post_all(api: kubernetes.client.ApiClient, path: str, bodies: list[dict]) -> dict[str, float]:
    """POST every body concurrently; returns name -> local time the create returned."""
    created: dict[str, float] = {}

    def post(body: dict) -> None:
        _, url, headers, payload, _ = api.param_serialize(
            "POST", path, header_params={"Content-Type": "application/json"}, body=body,
            auth_settings=["BearerToken"])
        resp = api.call_api("POST", url, header_params=headers, body=payload)
        resp.read()
        assert resp.status < 300, resp.data
        created[body["metadata"]["name"]] = time.monotonic()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(post, bodies))
    return created


def run_manifest(name: str) -> dict:
    return {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneRun",
        "metadata": {"name": name},
        "spec": {
            "baseModel": "hf://Qwen/Qwen3-0.6B", "modelName": "bench",
            "dataset": {"train": "s3://data/bench/train.jsonl"},
            "resources": {"nodes": 1, "gpusPerNode": 1, "nodePool": "h200"},
            "output": {"uri": "s3://models/bench/"},
            "preflight": {"enabled": False},
        },
    }


def job_manifest(name: str) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"completions": 1, "parallelism": 1, "backoffLimit": 0,
                 "completionMode": "Indexed",
                 "template": {"spec": {
                     "restartPolicy": "Never",
                     "nodeSelector": {"flywheel.dev/pool": "h200"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                      "effect": "NoSchedule"}],
                     "containers": [{"name": "main", "image": "trainer",
                                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}},
    }


def wait_for_metrics(timeout: float = 60) -> None:
    """Until the operator's metrics endpoint answers (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            scrape_requests()
            return
        except OSError:
            time.sleep(0.5)


def scrape_requests() -> float:
    return sum(requests_by_verb().values())


def requests_by_verb() -> dict[str, float]:
    """The operator's API requests so far, by HTTP verb (flywheel_api_requests_total)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics").read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^flywheel_api_requests_total\{verb="(\w+)"\} (\S+)', text, re.M)}


class PeakRss(threading.Thread):
    """The peak RSS of a process, sampled `every` seconds until `stop` is set."""

    def __init__(self, proc: psutil.Process, every: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.every, self.peak, self.stop = proc, every, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.every)


def jemalloc() -> str | None:
    """FLYWHEEL_JEMALLOC: a libjemalloc.so.2 to preload into the operator instead of glibc's
    malloc, an experiment (e.g. Debian's, extracted: `apt-get download libjemalloc2 &&
    dpkg-deb -x libjemalloc2_*.deb DIR`); the operator image runs on glibc's."""
    path = os.environ.get("FLYWHEEL_JEMALLOC")
    return path if path and Path(path).is_file() else None


def image_malloc_env() -> dict[str, str]:
    """The allocator settings the operator image sets (`ENV PYTHONMALLOC=... GLIBC_TUNABLES=...`
    in images/operator.Dockerfile), so that the bench measures what a cluster runs; this
    process's environment overrides them (`PYTHONMALLOC=pymalloc GLIBC_TUNABLES=` for
    Python's and glibc's defaults)."""
    dockerfile = (ROOT / "images" / "operator.Dockerfile").read_text()
    image = dict(re.findall(r"\b(PYTHONMALLOC|GLIBC_TUNABLES)=(\S+)", dockerfile))
    return {k: os.environ.get(k, v) for k, v in image.items()}


def operator_env() -> dict[str, str]:
    """The operator's environment: this process's, with the image's allocator settings."""
    from flywheel_operator.config import ENV_VAR

    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    for k, v in image_malloc_env().items():
        if v:
            env[k] = v
        else:
            env.pop(k, None)
    if allocator := jemalloc():
        env["LD_PRELOAD"] = allocator
    return env


def malloc() -> str:
    """The operator's allocators as this bench runs it: glibc's or jemalloc, and the
    environment that tunes them (GLIBC_TUNABLES, MALLOC_*, PYTHONMALLOC); for the record of a
    run."""
    tuned = [f"{k}={v}" for k, v in sorted(operator_env().items())
             if k in ("GLIBC_TUNABLES", "PYTHONMALLOC") or k.startswith("MALLOC_")]
    return " ".join([jemalloc() or "glibc", *tuned])


def start_operator(heap_out: Path | None = None) -> tuple[subprocess.Popen, psutil.Process]:
    """The operator on its built-in config, watching every namespace, its metrics on
    METRICS_PORT and its log in .cache/bench-operator.log (which says its malloc, as `malloc`
    does); with `heap_out`, under bench/heap.py (tracemalloc), which reports there on
    SIGUSR2."""
    log = open(ROOT / ".cache" / "bench-operator.log", "wb")  # noqa: SIM115
    env = operator_env()
    log.write(f"bench: the operator's malloc: {malloc()}\n".encode())
    log.flush()
    command = [str(ROOT / "bench" / "heap.py")] if heap_out else ["-m", "flywheel_operator"]
    operator = subprocess.Popen(
        [sys.executable, *command, "--standalone", "--all-namespaces",
         "--metrics-port", str(METRICS_PORT), "--liveness", ""],
        env={**env, "KUBECONFIG": str(KUBECONFIG), "FLYWHEEL_HEAP_OUT": str(heap_out or "")},
        stdout=log, stderr=subprocess.STDOUT)
    return operator, psutil.Process(operator.pid)


def stop_operator(operator: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    if operator is None or operator.poll() is not None:
        return
    operator.terminate()
    try:
        operator.wait(timeout=30)
    except subprocess.TimeoutExpired:
        operator.kill()
        operator.wait(timeout=30)


def teardown(operator: subprocess.Popen | None, namespaces: list[str], extra_nodes: int,
             *cleanups) -> None:
    """Whatever happened before: every `cleanups` callable, the operator stopped (killed if it
    lingers), the bench namespaces and the extra fake nodes deleted. A failing step is
    reported and the others still run, so no bench leaves its operator or its runs behind."""
    steps = [*cleanups, lambda: stop_operator(operator),
             *[lambda ns=ns: kubectl("delete", "namespace", ns, "--wait=false",
                                     "--ignore-not-found") for ns in namespaces]]
    if extra_nodes:  # after the pods on them have ended (a node gone leaves them to podgc)
        steps += [lambda ns=ns: kubectl("wait", "--for=delete", f"namespace/{ns}",
                                        "--timeout=300s") for ns in namespaces]
        steps.append(lambda: kubectl("delete", "--wait=false", "--ignore-not-found",
                                     *[f"node/h200-{i}" for i in range(4, 4 + extra_nodes)]))
    for step in steps:
        try:
            step()
        except Exception as err:  # noqa: BLE001 (teardown goes on; the error is shown)
            print(f"teardown: {err!r}", file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """SIGTERM (a timeout's kill) unwinds like Ctrl-C: the `finally` teardowns run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def quiet_cluster(pods: int) -> int:
    """The cluster up with fake H200 nodes for `pods` one-GPU pods (8 a node, beside the 4
    of the pool), the CRDs established, and no earlier bench namespace still deleting (the
    operator watches every namespace: its runs would be counted). The extra nodes' count."""
    extra_nodes = (pods + 7) // 8 + 1
    env = {**os.environ, "FLYWHEEL_H200_NODES": str(4 + extra_nodes)}
    subprocess.run([sys.executable, str(ROOT / "hack" / "cluster.py"), "up"], check=True, env=env)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "-f", str(ROOT / "crds"))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and "bench-" in kubectl("get", "namespaces", "-o", "name"):
        time.sleep(2)
    idle_apiserver()
    return extra_nodes


def idle_apiserver(below: float = 0.10, seconds: float = 5.0, wait: float = 180.0) -> None:
    """Wait (at most `wait` s) until kube-apiserver uses under `below` of a core for `seconds`:
    after a namespace's deletion its controllers' Events for gone objects are retried for a
    while (hundreds of requests a second, 20-30% of a core here), which slowed both sides of
    a burst by half when it overlapped one."""
    server = next((p for p in psutil.process_iter(["name"])
                   if p.info["name"] == "kube-apiserver"), None)
    if server is None:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and server.cpu_percent(interval=seconds) / 100 >= below:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--no-record", action="store_true", help="don't append to RESULTS.md")
    parser.add_argument("--training", action="store_true",
                        help="runs training at once with progress endpoints (see above)")
    parser.add_argument("--window", type=float, default=120.0,
                        help="--training: seconds of steady training measured")
    parser.add_argument("--heap", action="store_true",
                        help="--training, --soak: the operator under tracemalloc (bench/heap.py)")
    parser.add_argument("--soak", action="store_true",
                        help="waves of runs created, trained, finished, deleted (see above)")
    parser.add_argument("--live", type=int, default=200, help="--soak: runs in flight")
    parser.add_argument("--minutes", type=float, default=30.0, help="--soak: how long")
    parser.add_argument("--models", type=int, default=50,
                        help="--soak: Models the runs register into (fewer: longer histories)")
    parser.add_argument("--kueue", action="store_true",
                        help="admission -> Running through Kueue beside the direct path")
    args = parser.parse_args()
    n = args.runs
    exit_on_sigterm()
    if args.kueue:
        from operator_scale_kueue import kueue  # bench/operator_scale_kueue.py

        return kueue(n, not args.no_record)
    if args.soak:
        from operator_scale_soak import soak  # bench/operator_scale_soak.py

        return soak(n, args.live, args.minutes, not args.no_record, args.heap, args.models)
    if args.training:
        return training(n, args.window, not args.no_record, args.heap)

    extra_nodes = quiet_cluster(n)
    stamp = datetime.now(UTC).strftime("%H%M%S")
    ns_ops, ns_native = f"bench-ops-{stamp}", f"bench-native-{stamp}"
    operator, rss = None, None
    try:
        for ns in (ns_ops, ns_native):
            kubectl("create", "namespace", ns)
            kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=60s")

        api = kubernetes.config.new_client_from_config(config_file=str(KUBECONFIG))
        api.configuration.connection_pool_maxsize = 32
        core, batch = kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)

        operator, proc = start_operator()
        rss = PeakRss(proc, every=0.1)
        wait_for_metrics()
        time.sleep(2)  # let the initial listing settle
        requests_before = requests_by_verb()
        cpu_before = sum(proc.cpu_times()[:2])

        # --- the operator: FineTuneRun created -> Job created ---
        jobs = Watcher(api, batch.list_namespaced_job, ns_ops,
                       lambda o: o["metadata"]["labels"].get("flywheel.dev/run"))
        jobs.start()
        jobs.ready.wait()
        time.sleep(0.5)
        started = time.monotonic()
        applied = post_all(api, f"/apis/flywheel.dev/v1alpha1/namespaces/{ns_ops}/finetuneruns",
                           [run_manifest(f"run-{i}") for i in range(n)])
        deadline = time.monotonic() + 600
        while len(jobs.seen) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        finished = max(jobs.seen.values())
        ops = [jobs.seen[name] - applied[name] for name in applied if name in jobs.seen]
        runs_per_s = len(ops) / (finished - started)
        time.sleep(3)  # let pod/status events for these runs drain before counting requests
        by_verb = {verb: round((count - requests_before.get(verb, 0.0)) / n, 2)
                   for verb, count in requests_by_verb().items()}
        requests_per_run = sum(by_verb.values())
        cpu_per_run = (sum(proc.cpu_times()[:2]) - cpu_before) / n
        # The yardstick on a settled cluster: the Job controller, the scheduler and kwok
        # done with the runs' pods (else the native Jobs queue behind them), and 3 s more.
        settle = time.monotonic() + 300
        while time.monotonic() < settle and len(core.list_namespaced_pod(
                ns_ops, field_selector="status.phase=Running").items) < n:
            time.sleep(1)
        time.sleep(3)

        # --- the native Job controller: Job created -> Pod created ---
        pods = Watcher(api, core.list_namespaced_pod, ns_native,
                       lambda o: o["metadata"]["labels"].get("job-name"))
        pods.start()
        pods.ready.wait()
        time.sleep(0.5)
        created = post_all(api, f"/apis/batch/v1/namespaces/{ns_native}/jobs",
                           [job_manifest(f"job-{i}") for i in range(n)])
        deadline = time.monotonic() + 600
        while len(pods.seen) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        native = [pods.seen[name] - created[name] for name in created if name in pods.seen]
    finally:
        teardown(operator, [ns_ops, ns_native], extra_nodes, *([rss.stop.set] if rss else []))

    result = {
        "runs": n,
        "operator_p50_s": round(percentile(ops, 0.5), 4),
        "operator_p99_s": round(percentile(ops, 0.99), 4),
        "native_p50_s": round(percentile(native, 0.5), 4),
        "native_p99_s": round(percentile(native, 0.99), 4),
        "runs_per_s": round(runs_per_s, 1),
        "operator_peak_rss_mb": round(rss.peak / 2**20, 1),
        "api_requests_per_run": round(requests_per_run, 2),
        "api_requests_per_run_by_verb": by_verb,
        "operator_cpu_ms_per_run": round(cpu_per_run * 1000, 1),
    }
    if len(ops) < n or len(native) < n:
        result["incomplete"] = {"operator": len(ops), "native": len(native)}
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write(f"\n### operator_scale, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
                      f"`bench/operator_scale.py --runs {n}` (2-core dev machine, local "
                      f"control plane)\n\n```json\n{json.dumps(result)}\n```\n")
    print(json.dumps(result), flush=True)


# --- --training (bench/operator_scale_training.py) --------------------------------------------


def training(n: int, window: float, record: bool, heap: bool = False) -> None:
    from operator_scale_training import training as run

    run(n, window, record, heap)


if __name__ == "__main__":
    main()
