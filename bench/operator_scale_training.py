"""`bench/operator_scale.py --training`: N FineTuneRuns training at once on the fake H200
pool, rank 0 of each answered by a stand-in progress endpoint; measures the operator's CPU,
memory and API writes per run per minute in steady state, and how fresh status.progress is.

    make cluster-down && FLYWHEEL_FAKE_POD_CIDR=127.20.0.0/16 make cluster-up
    .venv/bin/python bench/operator_scale.py --training --runs 200

Fake pods get their IPs from kwok's --cidr (hack/cluster.py passes FLYWHEEL_FAKE_POD_CIDR);
a loopback range (all of 127.0.0.0/8 is routed to `lo` on Linux, no set-up needed) lets one
asyncio thread here listen on every pod's IP at the trainer's progress port (9400), so the
operator reaches "rank 0" exactly as on a cluster: status.podIP and the named port. The
operator runs on its built-in config (progressIntervalSeconds 30 s).

Write counts come from two sides: the operator's own counter (flywheel_api_requests_total)
and the apiserver's (apiserver_request_total, writes to finetuneruns), which also sees what
kopf writes (Events).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime

import kubernetes
from operator_scale import (
    KUBECONFIG,
    METRICS_PORT,
    ROOT,
    PeakRss,
    kubectl,
    percentile,
    post_all,
    quiet_cluster,
    run_manifest,
    start_operator,
    teardown,
    wait_for_metrics,
)


def _say(t0: float, message: str) -> None:
    print(f"[{time.monotonic() - t0:6.0f}s] {message}", file=sys.stderr, flush=True)


class StandIns(threading.Thread):
    """Rank 0 stand-ins: a trainer-like `/progress` on ip:9400 for every pod IP added, all in
    one asyncio loop. Each run's step advances every 2 s from when its server started, its
    loss falls, it checkpoints every 100 steps; `served` counts the documents served."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="standins")
        self.loop = asyncio.new_event_loop()
        self.servers: dict[str, object] = {}
        self.served = 0

    def run(self) -> None:
        self.loop.run_forever()

    def add(self, ip: str) -> None:
        """Serve `ip` (from another thread; returns once it listens)."""
        if ip not in self.servers:
            self.servers[ip] = asyncio.run_coroutine_threadsafe(
                self._serve(ip), self.loop).result(timeout=10)

    def drop(self, ip: str) -> None:
        """Stop serving `ip` (its pod has ended)."""
        server = self.servers.pop(ip, None)
        if server is not None:
            self.loop.call_soon_threadsafe(server.close)

    def stop(self) -> None:
        for server in self.servers.values():
            self.loop.call_soon_threadsafe(server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _serve(self, ip: str):
        from flywheel_operator.vocab import PROGRESS_PORT

        started = time.time()
        return await asyncio.start_server(
            lambda r, w: self._handle(r, w, started), ip, PROGRESS_PORT)

    @staticmethod
    def doc(started: float) -> bytes:
        def iso(t: float) -> str:  # as the trainer writes times
            return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        now, total = time.time(), 100_000
        step = 1 + int((now - started) / 2)
        step_time, ckpt = started + 2 * (step - 1), step // 100 * 100
        return json.dumps({
            "stage": "training", "stageTime": iso(started), "step": step, "totalSteps": total,
            "percent": round(100.0 * step / total, 1), "epoch": 1, "epochs": 1,
            "loss": round(2.0 / (1 + step / 50), 4), "tokensPerSecond": 31000.0 + step % 7,
            "mfu": 0.41, "secondsPerStep": 2.0, "etaSeconds": 2.0 * (total - step),
            "lastCheckpoint": {"step": ckpt, "time": iso(started + 2 * (ckpt - 1))}
            if ckpt else None,
            "heartbeatTime": iso(now), "stepTime": iso(step_time), "startTime": iso(started),
            "attempt": 1, "worldSize": 1,
            "ranks": [{"rank": 0, "stage": "training", "step": step, "stepTime": iso(step_time),
                       "heartbeatTime": iso(now), "where": None}]}).encode()

    async def _handle(self, reader, writer, started: float) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = self.doc(started)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            self.served += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def scrape(name: str) -> dict[str, float]:
    """The operator's counter `name` per verb."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics").read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        rf'^{name}\{{[^}}]*verb="(\w+)"[^}}]*\}} (\S+)', text, re.M)}


WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION")


def apiserver_writes(api: kubernetes.client.ApiClient) -> dict[str, float]:
    """Write requests the apiserver has served, from its own metrics, by resource[/sub]."""
    _, url, headers, _, _ = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    response = api.call_api("GET", url, header_params=headers)
    response.read()
    out: dict[str, float] = {}
    for m in re.finditer(r'^apiserver_request_total\{([^}]*)\} (\S+)',
                         response.data.decode(), re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("verb") in WRITE_VERBS:
            key = labels.get("resource", "") + (f"/{labels['subresource']}"
                                                if labels.get("subresource") else "")
            out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def events_since(ns: str, since: float) -> dict[str, int]:
    """Events in `ns` seen since `since` (epoch s), counted by `component: reason`."""
    from flywheel_operator.vocab import parse_time

    out: dict[str, int] = {}
    for e in json.loads(kubectl("get", "events", "-n", ns, "-o", "json"))["items"]:
        last = parse_time(e.get("lastTimestamp") or e.get("eventTime")
                          or e["metadata"]["creationTimestamp"])
        if last and last.timestamp() >= since:
            who = e.get("reportingComponent") or (e.get("source") or {}).get("component") or "?"
            key = f"{who}: {e.get('reason')}"
            out[key] = out.get(key, 0) + 1
    return out


def memory_map(pid: int) -> dict[str, float]:
    """The process's resident memory by kind of mapping (MB, from /proc/PID/smaps): `files`
    (the interpreter's and libraries' code and data), `brk` (glibc's main malloc arena),
    `arenas_1mib` (maps up to 1 MiB: Python's object arenas), `maps_8mib` (up to 8 MiB: thread
    stacks, glibc's mmap'd large blocks), `malloc_arenas` (larger: glibc's per-thread arenas,
    64 MiB reserved each) and `threads`."""
    out = dict.fromkeys(("files", "brk", "arenas_1mib", "maps_8mib", "malloc_arenas"), 0.0)
    kind = "files"
    with open(f"/proc/{pid}/smaps") as smaps:
        lines = smaps.read().splitlines()
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            kind = ("files" if name.startswith("/") else "brk" if name == "[heap]"
                    else None if name else "arenas_1mib" if end - start <= 2**20
                    else "maps_8mib" if end - start <= 8.1 * 2**20 else "malloc_arenas")
        elif fields[0] == "Rss:" and kind:
            out[kind] += int(fields[1]) / 1024
    return {**{k: round(v, 1) for k, v in out.items()},
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def training(n: int, window: float, record: bool, heap: bool = False) -> None:
    """N runs training at once, rank 0 answered by stand-ins; measure the steady state."""
    from flywheel_operator.config import OperatorConfig
    from flywheel_operator.vocab import parse_time

    t_start = time.monotonic()
    cidr = os.environ.get("FLYWHEEL_FAKE_POD_CIDR", "")
    if not cidr.startswith("127."):
        raise SystemExit("--training: start the cluster with FLYWHEEL_FAKE_POD_CIDR=127.20.0.0/16 "
                         "(fake pods need addresses the stand-ins can listen on)")
    interval = OperatorConfig().progressIntervalSeconds  # the operator runs on its defaults
    extra_nodes = quiet_cluster(n)
    ns = f"bench-train-{datetime.now(UTC):%H%M%S}"
    api = kubernetes.config.new_client_from_config(config_file=str(KUBECONFIG))
    api.configuration.connection_pool_maxsize = 32
    core = kubernetes.client.CoreV1Api(api)
    standins = StandIns()
    standins.start()
    operator, peak = None, None

    def pods_running() -> list[str]:
        """Serve every Running pod's IP; returns them."""
        resp = core.list_namespaced_pod(ns, _preload_content=False)
        ips = [p["status"]["podIP"] for p in json.loads(resp.data)["items"]
               if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        for ip in ips:
            standins.add(ip)
        return ips

    def runs() -> list[dict]:
        return json.loads(kubectl("get", "ftr", "-n", ns, "-o", "json"))["items"]

    def progressing(items: list[dict]) -> dict[str, dict]:
        return {r["metadata"]["name"]: r["status"]["progress"] for r in items
                if (r.get("status") or {}).get("phase") == "Running"
                and (r["status"].get("progress") or {}).get("step")}

    try:
        kubectl("create", "namespace", ns)
        kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=60s")
        # --heap: under tracemalloc (bench/heap.py), a report at the window's end
        heap_out = ROOT / ".cache" / f"heap-{n}.txt"
        heap_out.unlink(missing_ok=True)
        operator, proc = start_operator(heap_out if heap else None)
        peak = PeakRss(proc, every=0.5)
        wait_for_metrics()
        cpu_start = sum(proc.cpu_times()[:2])
        _say(t_start, f"operator up; creating {n} runs in {ns}")
        post_all(api, f"/apis/flywheel.dev/v1alpha1/namespaces/{ns}/finetuneruns",
                 [run_manifest(f"run-{i}") for i in range(n)])
        t_created = time.monotonic()
        _say(t_start, "created; waiting for every rank 0 pod to run")
        deadline, ips = time.monotonic() + 600, []
        while time.monotonic() < deadline:
            ips = pods_running()
            if len(ips) >= n:
                break
            time.sleep(3)
        t_running = time.monotonic()
        _say(t_start, f"{len(ips)} pods running, stand-ins serving; waiting for progress")
        deadline = time.monotonic() + 3 * interval + 60
        while time.monotonic() < deadline:
            pods_running()  # a late pod gets its stand-in too
            settled = len(progressing(runs()))
            if settled >= n:
                break
            time.sleep(5)
        t_settled = time.monotonic()
        cpu_ramp = sum(proc.cpu_times()[:2]) - cpu_start
        _say(t_start, f"{settled} runs show progress; measuring {window:.0f}s of steady state")
        # --- the window: everything that happens while N runs train
        ops0, api0, served0 = (scrape("flywheel_api_requests_total"), apiserver_writes(api),
                               standins.served)
        cpu0, t0, wall0 = sum(proc.cpu_times()[:2]), time.monotonic(), time.time()
        rss0 = proc.memory_info().rss
        before = progressing(runs())
        time.sleep(window)
        ops1, api1, served1 = (scrape("flywheel_api_requests_total"), apiserver_writes(api),
                               standins.served)
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        items = runs()
        now = time.time()
        after = progressing(items)
        rss_end = proc.memory_info().rss
        mapped = memory_map(proc.pid)
        events = events_since(ns, wall0)
        if heap:
            operator.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 120
            while not heap_out.exists() and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(2)
            _say(t_start, f"heap report: {heap_out}")
        _say(t_start, "measured; tearing down")
    finally:
        teardown(operator, [ns], extra_nodes, standins.stop, *([peak.stop.set] if peak else []))
    minutes = (t1 - t0) / 60
    ops = _delta(ops1, ops0)
    op_writes = sum(v for verb, v in ops.items() if verb in WRITE_VERBS)
    server = _delta(api1, api0)
    run_writes = sum(v for k, v in server.items() if k.split("/")[0].split()[0] == "finetuneruns")
    ages = [now - parse_time(p["heartbeatTime"]).timestamp() for p in after.values()
            if p.get("heartbeatTime")]
    phases = {}
    for r in items:
        phase = (r.get("status") or {}).get("phase", "none")
        phases[phase] = phases.get(phase, 0) + 1
    result = {
        "mode": "training", "runs": n, "progress_interval_s": interval,
        "window_s": round(t1 - t0, 1),
        "phases_at_end": phases,
        "runs_with_progress_before_window": len(before),
        "runs_whose_progress_advanced_in_window": sum(
            1 for name, p in after.items() if p["step"] > before.get(name, p)["step"]),
        "operator_cpu_percent_of_a_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "operator_cpu_ms_per_run_per_min": round(1000 * (cpu1 - cpu0) / n / minutes, 2),
        "operator_api_writes_per_run_per_min": round(op_writes / n / minutes, 3),
        "operator_api_reads_per_run_per_min": round(ops.get("GET", 0) / n / minutes, 3),
        "apiserver_finetunerun_writes_per_run_per_min": round(run_writes / n / minutes, 3),
        "apiserver_writes_in_window": {k: int(v) for k, v in sorted(server.items())},
        "events_in_window": events,
        "progress_polls_per_run_per_min": round((served1 - served0) / n / minutes, 3),
        "status_progress_age_s": {"p50": round(percentile(ages, 0.5), 1),
                                  "p99": round(percentile(ages, 0.99), 1),
                                  "max": round(max(ages), 1)} if ages else None,
        "operator_rss_mb": {"window_start": round(rss0 / 2**20, 1),
                            "window_end": round(rss_end / 2**20, 1)},
        "operator_peak_rss_mb": round(peak.peak / 2**20, 1),
        "operator_rss_by_mapping_mb": mapped,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "ramp": {"create_s": round(t_created - t_start, 1),
                 "all_pods_running_s": round(t_running - t_created, 1),
                 "all_progress_s": round(t_settled - t_running, 1),
                 "operator_cpu_s": round(cpu_ramp, 1)},
    }
    if record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write(f"\n### operator_scale --training, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
                      f"`bench/operator_scale.py --training --runs {n} --window {window:g}` "
                      f"(2-core dev machine shared with other work, local control plane)\n\n"
                      f"```json\n{json.dumps(result)}\n```\n")
    print(json.dumps(result), flush=True)
