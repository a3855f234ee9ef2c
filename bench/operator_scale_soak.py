"""`bench/operator_scale.py --soak`: a fleet's day compressed. For `--minutes`, runs are
created, trained (rank 0 answered by the stand-ins of --training, its progress polled),
finished (rank 0 exits 0 with a trainer summary, so each registers a ModelVersion) and
deleted, in waves, keeping about `--live` runs in flight, until `--runs` were created. Every
minute it samples the operator's RSS, its tables (`flywheel_operator_table_entries`) and how
old the running runs' status.progress is; the curve goes to RESULTS.md.

    make cluster-down && FLYWHEEL_FAKE_POD_CIDR=127.20.0.0/16 make cluster-up
    .venv/bin/python bench/operator_scale.py --soak --runs 5000 --live 200 --minutes 30
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
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
    malloc,
    percentile,
    post_all,
    quiet_cluster,
    run_manifest,
    start_operator,
    teardown,
    wait_for_metrics,
)
from operator_scale_training import StandIns, _say, memory_map

#: Seconds a run trains once its rank 0 answers: at least two progress polls (30 s apart).
LIFETIME = 75.0
#: The runs register into this many Models by default (`--models`): versions pile up in each,
#: as in a registry.
MODELS = 50
TICK = 5.0


def summary(run: str) -> str:
    """A trainer's summary (flywheel_trainer.contract.Summary) for rank 0's exit."""
    return json.dumps({
        "artifact": {"uri": f"s3://models/soak/{run}/",
                     "digest": "sha256:" + hashlib.sha256(run.encode()).hexdigest()},
        "metrics": {"train_loss": 1.0, "eval_loss": 1.1, "tool_call_accuracy": 0.9},
        "steps": 10, "tokens": 1000})


def slope(samples: list[dict]) -> float | None:
    """RSS's least-squares slope in MB a minute: a creep, where the samples' spread is noise."""
    if len(samples) < 3:
        return None
    ts, ys = [s["t_s"] / 60 for s in samples], [s["rss_mb"] for s in samples]
    tm, ym = sum(ts) / len(ts), sum(ys) / len(ys)
    return round(sum((t - tm) * (y - ym) for t, y in zip(ts, ys, strict=True))
                 / sum((t - tm) ** 2 for t in ts), 3)


def tables() -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics").read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^flywheel_operator_table_entries\{table="(\w+)"\} (\S+)', text, re.M)}


def soak(total: int, live: int, minutes: float, record: bool, heap: bool = False,
         models: int = MODELS) -> None:
    from flywheel_operator.config import OperatorConfig
    from flywheel_operator.vocab import parse_time

    t_start = time.monotonic()
    if not os.environ.get("FLYWHEEL_FAKE_POD_CIDR", "").startswith("127."):
        raise SystemExit("--soak: start the cluster with FLYWHEEL_FAKE_POD_CIDR=127.20.0.0/16 "
                         "(fake pods need addresses the stand-ins can listen on)")
    interval = OperatorConfig().progressIntervalSeconds
    extra_nodes = quiet_cluster(live)
    ns = f"bench-soak-{datetime.now(UTC):%H%M%S}"
    api = kubernetes.config.new_client_from_config(config_file=str(KUBECONFIG))
    api.configuration.connection_pool_maxsize = 32
    core = kubernetes.client.CoreV1Api(api)
    runs_path = f"/apis/flywheel.dev/v1alpha1/namespaces/{ns}/finetuneruns"
    standins = StandIns()
    standins.start()
    operator, peak = None, None
    served: dict[str, tuple[float, str, str]] = {}  # run -> (stand-in since, pod IP, pod)
    ending: set[str] = set()
    counts = {"created": 0, "succeeded": 0, "failed": 0}
    samples: list[dict] = []
    mapped: dict | None = None

    def call(method: str, path: str) -> dict:
        _, url, headers, _, _ = api.param_serialize(method, path, auth_settings=["BearerToken"])
        response = api.call_api(method, url, header_params=headers)
        response.read()
        return json.loads(response.data)

    def sample(now: float, runs: list[dict]) -> None:
        wall = time.time()
        ages = [wall - parse_time(p["heartbeatTime"]).timestamp() for r in runs
                if (s := r.get("status") or {}).get("phase") == "Running"
                and (p := s.get("progress") or {}).get("heartbeatTime")]
        samples.append({
            "t_s": round(now - t_start), **counts, "in_flight": len(runs),
            "running": sum((r.get("status") or {}).get("phase") == "Running" for r in runs),
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "status_age_p99_s": round(percentile(ages, 0.99), 1) if ages else None,
            "tables": {k: int(v) for k, v in tables().items()},
            "rss_by_mapping_mb": memory_map(proc.pid)})
        if heap:
            operator.send_signal(signal.SIGUSR2)
        _say(t_start, json.dumps(samples[-1]))

    try:
        kubectl("create", "namespace", ns)
        kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=60s")
        # --heap: under bench/heap.py, a report each minute (FLYWHEEL_HEAP_FRAMES=0: glibc's
        # heap and the objects by type, without tracemalloc's cost)
        heap_out = ROOT / ".cache" / "heap-soak.txt" if heap else None
        if heap_out:
            heap_out.unlink(missing_ok=True)
        operator, proc = start_operator(heap_out)
        peak = PeakRss(proc, every=1.0)
        wait_for_metrics()
        _say(t_start, f"operator up; soaking {minutes:g} min in {ns}")
        t0 = time.monotonic()
        end, next_sample = t0 + 60 * minutes, t0
        while True:
            now = time.monotonic()
            runs = call("GET", runs_path)["items"]
            for pod in call("GET", f"/api/v1/namespaces/{ns}/pods")["items"]:
                run, ip = pod["metadata"]["labels"].get("flywheel.dev/run"), pod["status"].get(
                    "podIP")
                if run and ip and pod["status"].get("phase") == "Running" and run not in served:
                    standins.add(ip)
                    served[run] = (now, ip, pod["metadata"]["name"])
            for r in runs:
                name, phase = r["metadata"]["name"], (r.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed") and not r["metadata"].get(
                        "deletionTimestamp"):
                    counts["succeeded" if phase == "Succeeded" else "failed"] += 1
                    call("DELETE", f"{runs_path}/{name}")
                    standins.drop(served.pop(name, (0, "", ""))[1])
                    ending.discard(name)
                elif (phase == "Running" and name not in ending and name in served
                      and now - served[name][0] >= LIFETIME):
                    try:
                        core.patch_namespaced_pod(served[name][2], ns, {"metadata": {
                            "annotations": {"flywheel.dev/simulate-exit": "0",
                                            "flywheel.dev/simulate-message": summary(name)}}})
                        ending.add(name)
                    except kubernetes.client.ApiException as e:
                        if e.status != 404:
                            raise
                        standins.drop(served.pop(name)[1])  # its pod is gone (a new attempt)
            if now >= next_sample:
                sample(now, runs)
                next_sample += 60
            if now >= end:
                break
            wanted = min(live - len(runs), total - counts["created"], 50)
            if wanted > 0:
                first = counts["created"]
                manifests = [run_manifest(f"run-{i}") for i in range(first, first + wanted)]
                for i, m in enumerate(manifests, first):
                    m["spec"]["modelName"] = f"soak-{i % models}"
                post_all(api, runs_path, manifests)
                counts["created"] += wanted
            time.sleep(max(0.0, TICK - (time.monotonic() - now)))
        mapped = memory_map(proc.pid)
        _say(t_start, "soaked; tearing down")
    finally:
        teardown(operator, [ns], extra_nodes, standins.stop, *([peak.stop.set] if peak else []))
    warm = [s for s in samples if s["t_s"] >= samples[0]["t_s"] + 600] or samples
    result = {
        "mode": "soak", "minutes": minutes, "live": live, "models": models, **counts,
        "progress_interval_s": interval, "malloc": malloc(),
        "rss_slope_mb_per_min_after_warm_up": slope(warm),
        "rss_mb": {"after_warm_up_min": min(s["rss_mb"] for s in warm),
                   "after_warm_up_max": max(s["rss_mb"] for s in warm),
                   "end": samples[-1]["rss_mb"], "peak": round(peak.peak / 2**20, 1)},
        "status_age_p99_s_max": max((s["status_age_p99_s"] or 0) for s in warm),
        "operator_rss_by_mapping_mb_end": mapped,
        "samples": samples,
    } if samples else {"mode": "soak", "samples": []}
    if record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write(f"\n### operator_scale --soak, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
                      f"`bench/operator_scale.py --soak --runs {total} --live {live} "
                      f"--minutes {minutes:g} --models {models}` (2-core dev machine, "
                      f"local control plane)\n\n"
                      f"```json\n{json.dumps(result)}\n```\n")
    print(json.dumps(result), flush=True)
