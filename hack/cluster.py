"""The local control plane: real etcd, kube-apiserver, controller-manager, scheduler and kwok,
plus a real S3 server (versitygw, hack/local_s3.py) for the runs' models, data and outputs.

    python hack/cluster.py up      # idempotent: a no-op when the cluster is already healthy
    python hack/cluster.py up --without-kueue   # make run's: the sample queues nothing
    python hack/cluster.py down    # stops every process it started and removes the state
    python hack/cluster.py tools [--without-kueue]   # only build the binaries `up` starts
    python hack/cluster.py restart-apiserver [--down-seconds 30]   # an apiserver outage:
                                   # SIGKILL, N seconds down, then started again as it ran
    python hack/cluster.py restart COMPONENT   # stop one component (SIGTERM) and start it
                                   # again as it ran, e.g. after changing its code or config

Everything lives under .cache/: binaries in .cache/bin (hack/build-tools.sh), state, PKI,
kubeconfigs and logs in .cache/cluster. All components listen on loopback only, with
generated certificates and RBAC on, so anonymous requests are refused.

Node pools (kwok fake nodes), sized by environment variables:
  FLYWHEEL_H200_NODES  (4)  8 x nvidia.com/gpu H200 nodes, tainted nvidia.com/gpu=present
  FLYWHEEL_CPU_NODES   (2)  CPU-only nodes
  FLYWHEEL_LOCAL_NODES (2)  the `local` pool: 2 x nvidia.com/gpu each, same taint, and
                            labelled flywheel.dev/executor=local: their pods really run on
                            this machine (hack/local_executor.py), everything else is kwok's

Kueue (sigs.k8s.io/kueue, hack/tools/kueue) runs out of cluster like the rest, with the admin
objects of hack/kueue/ (how and why: hack/kueue/objects.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pki import PKI, kueue_pki, make_pki, write_kubeconfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".cache" / "bin"
STATE = ROOT / ".cache" / "cluster"
LOGS = STATE / "logs"
RUN = STATE / "run"
KUBECONFIG = STATE / "kubeconfig"
HACK = ROOT / "hack"

APISERVER_PORT = int(os.environ.get("FLYWHEEL_APISERVER_PORT", "16443"))
ETCD_PORT = int(os.environ.get("FLYWHEEL_ETCD_PORT", "12379"))
SERVER = f"https://127.0.0.1:{APISERVER_PORT}"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Start order; down stops them in reverse.
COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
              "kwok-local", "local-executor", "versitygw", "kueue"]


def log(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------

STARTED: dict[str, subprocess.Popen] = {}  # components this invocation started


def pid_of(name: str) -> int | None:
    """The pid recorded for `name` if that process is still alive and still ours."""
    if name in STARTED:  # started by this invocation: ask the child itself
        proc = STARTED[name]
        return proc.pid if proc.poll() is None else None
    pidfile = RUN / f"{name}.pid"
    if not pidfile.exists():
        return None
    pid_text, _, argv0 = pidfile.read_text().partition(" ")
    try:
        cmdline = Path(f"/proc/{pid_text}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return None
    return int(pid_text) if cmdline.decode() == argv0 else None


def start(name: str, args: list[str], argv0: str | None = None,
          env: dict[str, str] | None = None) -> None:
    """Start a component in its own session (it outlives this script), logging to LOGS."""
    if pid_of(name):
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    RUN.mkdir(parents=True, exist_ok=True)
    argv0 = argv0 or str(BIN / name)
    with open(LOGS / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            [argv0, *args], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=STATE,
            env={**os.environ, **env} if env else None,
        )
    (RUN / f"{name}.pid").write_text(f"{proc.pid} {argv0}")
    STARTED[name] = proc


def wait_for(what: str, check, timeout: float = 120.0, component: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if component and not pid_of(component):
            proc = STARTED.get(component)
            code = proc.poll() if proc else None
            tail = (LOGS / f"{component}.log").read_text().splitlines()[-20:]
            raise SystemExit(f"cluster: {component} is not running (exit code {code}); last log "
                             "lines:\n" + "\n".join(tail))
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    tail = (LOGS / f"{component}.log").read_text().splitlines()[-20:] if component else []
    raise SystemExit(f"cluster: timed out waiting for {what} (logs in {LOGS})"
                     + "".join(f"\n{line}" for line in tail))


def apiserver_ready() -> bool:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    ctx.load_cert_chain(str(PKI / "admin.crt"), str(PKI / "admin.key"))
    with urllib.request.urlopen(f"{SERVER}/readyz", context=ctx, timeout=2) as resp:
        return resp.status == 200


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run(
        [str(BIN / "kubectl"), "--kubeconfig", str(KUBECONFIG), *args],
        check=True, capture_output=True, text=True, input=input,
    ).stdout


# --- components --------------------------------------------------------------------------


def start_etcd() -> None:
    peer = f"http://127.0.0.1:{ETCD_PORT + 1}"
    start("etcd", [
        "--name=flywheel", f"--data-dir={STATE / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}",
        f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=flywheel={peer}",
        "--unsafe-no-fsync",  # a throwaway dev/test cluster: trade durability for speed
        "--quota-backend-bytes=8589934592",
    ])


def start_apiserver() -> None:
    start("kube-apiserver", [
        f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        f"--secure-port={APISERVER_PORT}",
        f"--tls-cert-file={PKI / 'apiserver.crt'}",
        f"--tls-private-key-file={PKI / 'apiserver.key'}",
        f"--client-ca-file={PKI / 'ca.crt'}",
        f"--service-account-key-file={PKI / 'sa.pub'}",
        f"--service-account-signing-key-file={PKI / 'sa.key'}",
        f"--service-account-issuer={SA_ISSUER}",
        "--authorization-mode=Node,RBAC",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--allow-privileged=true",
        "--profiling=false",
        "--max-requests-inflight=1000", "--max-mutating-requests-inflight=500",
        # Loopback cannot be advertised as the kubernetes Service endpoint; nothing in this
        # cluster reaches the apiserver through that Service.
        "--endpoint-reconciler-type=none",
    ])


def start_controller_manager() -> None:
    kc = STATE / "controller-manager.kubeconfig"
    write_kubeconfig(kc, "controller-manager", SERVER)
    start("kube-controller-manager", [
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1", "--secure-port=17257", "--leader-elect=false",
        # The default set: job, garbage-collector, serviceaccount(-token), namespace,
        # deployment, replicaset, cronjob, node-lifecycle, ttl-after-finished, ...
        "--controllers=*",
        f"--service-account-private-key-file={PKI / 'sa.key'}",
        f"--root-ca-file={PKI / 'ca.crt'}",
        "--use-service-account-credentials=true",
        "--kube-api-qps=200", "--kube-api-burst=400",
        "--concurrent-job-syncs=20",
    ])


def start_scheduler() -> None:
    kc = STATE / "scheduler.kubeconfig"
    write_kubeconfig(kc, "scheduler", SERVER)
    start("kube-scheduler", [
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1", "--secure-port=17259", "--leader-elect=false",
    ])


def start_kwok() -> None:
    kc = STATE / "kwok.kubeconfig"
    write_kubeconfig(kc, "kwok", SERVER)
    common = [f"--kubeconfig={kc}", "--node-lease-duration-seconds=40",
              f"--config={HACK / 'kwok' / 'node-stages.yaml'}"]
    # Fake pools: kwok plays the kubelet for nodes and pods.
    start("kwok", [
        *common, f"--config={HACK / 'kwok' / 'pod-stages.yaml'}",
        "--manage-nodes-with-label-selector=type=kwok",
        "--server-address=127.0.0.1:17247",
        # fake pods' IPs (bench/operator_scale.py --training gives them loopback ones)
        f"--cidr={os.environ.get('FLYWHEEL_FAKE_POD_CIDR', '10.244.0.0/16')}",
    ])
    # The local pool: kwok keeps the nodes alive; their pods belong to the local executor.
    start("kwok-local", [
        *common, "--manage-nodes-with-label-selector=flywheel.dev/executor=local",
        "--server-address=127.0.0.1:17248",
    ], argv0=str(BIN / "kwok"))


def start_local_executor() -> None:
    start("local-executor", [str(HACK / "local_executor.py"), str(KUBECONFIG)],
          argv0=sys.executable)


def start_s3() -> None:
    """The local S3 server (hack/local_s3.py): versitygw on loopback, generated root keys in
    .cache/cluster/s3.json and s3.env, the demo's and the tests' buckets created."""
    sys.path.insert(0, str(HACK))
    import local_s3

    s3, args, env = local_s3.cluster_server()
    start("versitygw", args[1:], env=env)
    wait_for("S3 server", lambda: local_s3.ready(s3), component="versitygw")
    local_s3.create_buckets(s3)


# --- nodes -------------------------------------------------------------------------------


def node(name: str, labels: dict, allocatable: dict, taints: list | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                       "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", **labels},
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {"taints": taints or []},
        "status": {"allocatable": allocatable, "capacity": allocatable},
    }


def pool_nodes() -> list[dict]:
    h200 = int(os.environ.get("FLYWHEEL_H200_NODES", "4"))
    cpu = int(os.environ.get("FLYWHEEL_CPU_NODES", "2"))
    nodes = [
        node(
            f"h200-{i}",
            {"flywheel.dev/pool": "h200", "nvidia.com/gpu.product": "NVIDIA-H200",
             "nvidia.com/gpu.count": "8", "node.kubernetes.io/instance-type": "h200x8"},
            {"cpu": "192", "memory": "2000Gi", "nvidia.com/gpu": "8", "pods": "110",
             "ephemeral-storage": "10Ti"},
            [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        )
        for i in range(h200)
    ]
    nodes += [
        node(f"cpu-{i}", {"flywheel.dev/pool": "cpu"},
             {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "1Ti"})
        for i in range(cpu)
    ]
    local = int(os.environ.get("FLYWHEEL_LOCAL_NODES", "2"))
    for i in range(local):
        n = node(f"local-{i}", {"flywheel.dev/pool": "local", "flywheel.dev/executor": "local"},
                 {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2", "pods": "110",
                  "ephemeral-storage": "1Ti"},
                 [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        n["metadata"]["labels"]["type"] = "local"  # not kwok's fake pods: see kwok-local
        nodes.append(n)
    return nodes


def ensure_nodes() -> None:
    nodes = pool_nodes()
    kubectl("apply", "--server-side", "--field-manager=flywheel-cluster", "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}))
    names = [n["metadata"]["name"] for n in nodes]

    def all_ready() -> bool:
        items = json.loads(kubectl("get", "nodes", "-o", "json"))["items"]
        ready = {
            n["metadata"]["name"] for n in items
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in n["status"].get("conditions", []))
        }
        return set(names) <= ready

    wait_for("nodes Ready", all_ready, timeout=60, component="kwok")


# --- Kueue (its objects: hack/kueue/objects.py) ------------------------------------------

KUEUE = STATE / "kueue"
KUEUE_WEBHOOK_PORT = 17443  # its webhook server (127.0.0.1): CRD conversion only
KUEUE_HEALTH = "127.0.0.1:17281"
KUEUE_QUEUE_NAMESPACES = ["default", "flywheel-demo"]


def apply(objects: list[dict]) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=flywheel-cluster",
            "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def kueue_ready() -> bool:
    with urllib.request.urlopen(f"http://{KUEUE_HEALTH}/readyz", timeout=2) as resp:
        return resp.status == 200


def start_kueue() -> None:
    from kueue import objects as ko  # hack/kueue/objects.py (PyYAML: not needed by `down`)

    kueue_pki(f"{ko.SERVICE}.{ko.NAMESPACE}.svc")
    certs = KUEUE / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    files = {"tls.crt": "kueue-webhook.crt", "tls.key": "kueue-webhook.key",
             "ca.crt": "kueue-ca.crt", "ca.key": "kueue-ca.key"}
    for name in ("tls.crt", "tls.key"):
        shutil.copyfile(PKI / files[name], certs / name)
    # Its certificate manager finds our certificates valid in this Secret and keeps them.
    secret = {k: base64.b64encode((PKI / v).read_bytes()).decode() for k, v in files.items()}
    module = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kueue"],
                            cwd=HACK / "tools" / "kueue", check=True, capture_output=True,
                            text=True).stdout.strip()
    crds = ko.crds(Path(module), secret["ca.crt"], f"https://127.0.0.1:{KUEUE_WEBHOOK_PORT}")
    apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ko.NAMESPACE}},
           {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": secret,
            "metadata": {"name": ko.SECRET, "namespace": ko.NAMESPACE}}, *crds])
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            *[f"crd/{c['metadata']['name']}" for c in crds])
    config = ko.config(certs, KUEUE_WEBHOOK_PORT, KUEUE_HEALTH)
    (KUEUE / "config.json").write_text(json.dumps(config, indent=2))
    kc = STATE / "kueue.kubeconfig"
    write_kubeconfig(kc, "kueue", SERVER)
    start("kueue", [f"--config={KUEUE / 'config.json'}", f"--kubeconfig={kc}"])
    wait_for("kueue /readyz", kueue_ready, timeout=180, component="kueue")
    apply([*ko.admin(pool_nodes()), *[{"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": n}} for n in KUEUE_QUEUE_NAMESPACES]])
    apply([q for n in KUEUE_QUEUE_NAMESPACES for q in ko.local_queues(n)])


# --- commands ----------------------------------------------------------------------------


def build_tools(kueue: bool = True) -> None:
    """The binaries `up` starts (hack/build-tools.sh: instant when they are built)."""
    subprocess.run([str(HACK / "build-tools.sh"), "etcd", "kubernetes", "versitygw",
                    *(["kueue"] if kueue else [])], check=True)  # kubernetes builds kwok too


def up(kueue: bool = True) -> None:
    """Start what is not running. Without `kueue` (make run: the sample queues nothing) Kueue
    is neither built nor started, which spares a first `make run` its build; a later `up`
    with it (make cluster-up, the tests) adds it to the running cluster."""
    core = [c for c in COMPONENTS if c != "kueue"]
    build_tools(kueue)
    if not (BIN / "kubectl").exists():
        raise SystemExit("cluster: .cache/bin/kubectl missing; run `make setup` first")
    if all(pid_of(c) for c in core) and apiserver_ready():
        ensure_nodes()
        if kueue and not pid_of("kueue"):
            start_kueue()
        log(f"already up; KUBECONFIG={KUBECONFIG}")
        return
    STATE.mkdir(parents=True, exist_ok=True)
    make_pki()
    write_kubeconfig(KUBECONFIG, "admin", SERVER)
    start_etcd()
    start_apiserver()
    wait_for("kube-apiserver /readyz", apiserver_ready, component="kube-apiserver")
    start_controller_manager()
    start_scheduler()
    start_kwok()
    ensure_nodes()
    start_local_executor()
    start_s3()
    if kueue:
        start_kueue()
    wait_for("default service account", lambda: kubectl("get", "sa", "default", "-n", "default"),
             component="kube-controller-manager")
    log(f"up; KUBECONFIG={KUBECONFIG}")


def restart(name: str, down_seconds: float = 0.0, sig: int = signal.SIGTERM) -> None:
    """Stop one running component with `sig` and start it again after `down_seconds`, with
    the command line and environment it ran with (so a cluster started with other settings
    keeps them). kube-apiserver: until /readyz answers again."""
    pid = pid_of(name)
    if not pid:
        raise SystemExit(f"cluster: {name} is not running")
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    env = dict(e.decode().split("=", 1) for e in
               Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    stop(name, sig)
    log(f"{name} stopped ({signal.Signals(sig).name}); starting it in {down_seconds:g}s")
    time.sleep(down_seconds)
    start(name, argv[1:], argv0=argv[0], env=env)
    if name == "kube-apiserver":
        wait_for("kube-apiserver /readyz", apiserver_ready, component="kube-apiserver")
    log(f"{name} started again")


def stop(name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal a component's process group; SIGKILL it if it has not gone within `grace`."""
    if pid := pid_of(name):
        os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while pid_of(name):
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.1)


def down() -> None:
    for name in reversed(COMPONENTS):
        stop(name)
    # What the local executor started (pods' processes, in sessions of their own) goes too.
    work = str(ROOT / ".cache" / "executor")
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(proc / "cwd").startswith(work):
                os.killpg(int(proc.name), signal.SIGKILL)
    shutil.rmtree(STATE, ignore_errors=True)
    log("down")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args in (["up"], ["up", "--without-kueue"]):
        up(kueue=len(args) == 1)
    elif args in (["tools"], ["tools", "--without-kueue"]):
        build_tools(kueue=len(args) == 1)
    elif args == ["down"]:
        down()
    elif args[:1] == ["restart-apiserver"] and args[1:2] in ([], ["--down-seconds"]):
        restart("kube-apiserver", float(args[2]) if len(args) == 3 else 30.0, signal.SIGKILL)
    elif args[:1] == ["restart"] and len(args) == 2 and args[1] in COMPONENTS:
        restart(args[1])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} up|tools [--without-kueue] | down | "
                         "restart-apiserver [--down-seconds N] | restart COMPONENT")
