"""The local executor: a kubelet for the `local` node pool that really runs pods as processes.

Pods scheduled to nodes labelled `flywheel.dev/executor=local` are executed on this machine
(hack/local_executor_pod.py: what a container's spec means here): the init containers one
after another, each to exit 0 (a failed one restarted with back-off, `Init:CrashLoopBackOff`,
unless restartPolicy is Never), then the container's own command, args and env ($(VAR),
fieldRef, secretKeyRef, configMapKeyRef as the kubelet resolves them), with ConfigMap,
downward API and emptyDir volumes as local folders (a PersistentVolumeClaim as
.cache/pvc/<namespace>/<claim>) and every mount path in command, args, env and workingDir
pointed at them; Ready once its readinessProbe's httpGet answers. The network is the other
substitution: each pod gets its own loopback address (127.10.x.y) as `status.podIP`, its DNS
names (hostname + subdomain, rank 0's rendezvous address) resolve to it via /etc/hosts, and
servers that bind
`$FLYWHEEL_BIND_HOST` or `status.podIP` listen on it: a client reaches them at
podIP:containerPort as on a real cluster. Status, exit codes and termination messages go
through the Pod status and are kept until the apiserver accepts them
(hack/local_executor_status.py: retried through an outage; every pod resynced when the watch
reconnects). Deleting a pod (`kubectl delete`, an eviction, a drain) stops its process group
as a kubelet does: SIGTERM, SIGKILL after the grace period (at most 10 s here), the terminal
status (an eviction's DisruptionTarget kept), then its removal. A pod force-deleted without
finalizers is simply gone: its processes are killed.

Test hook: `.cache/executor/env/<namespace>.json` ({"NAME": "value"}) adds environment
variables to every pod of that namespace (e.g. FLYWHEEL_DEBUG_STOP_AT_STEP for the hang test).

Development and tests only; started by `hack/cluster.py up` with the other components.
`local_executor.py KUBECONFIG [SELECTOR]`: the nodes it runs pods for (default
flywheel.dev/executor=local); the tests run a second one for nodes of their own, with its
own loopback range and /etc/hosts mark.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

if __name__ == "__main__" and len(sys.argv) > 1:  # before the kubernetes client reads it
    os.environ["KUBECONFIG"] = sys.argv[1]

from flywheel_operator import kube
from flywheel_operator.vocab import EXECUTOR_LABEL, format_time

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_executor_pod import (  # noqa: E402
    WORK,
    ContainerConfigError,
    Network,
    Process,
    VolumeNotReady,
    dns_names,
    log_tail,
    materialise_volumes,
    prepare,
    wait_port_free,
)
from local_executor_status import (  # noqa: E402
    TERMINAL,
    StatusManager,
    call,
    conditions,
    container_status,
    ended,
    never_ran,
    running,
    transient,
    watch_lines,
)

#: Storage credentials reach a pod only through its own spec (Secret refs), as on a real node.
HOST_ONLY_ENV = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS")
NODE_LABEL = f"{EXECUTOR_LABEL}=local"


def now() -> str:
    return format_time()


def log(msg: str) -> None:
    print(f"{now()} executor: {msg}", flush=True)


class Executor:
    def __init__(self, selector: str = NODE_LABEL) -> None:
        self.selector = selector
        own = selector != NODE_LABEL  # a second executor (the tests'): addresses of its own
        # pod addresses: one loopback address per pod, its DNS names in /etc/hosts
        self.net = Network(selector.rpartition("=")[2] if own else None)
        self.nodes: set[str] = set()  # ours
        self.all_nodes: set[str] = set()  # every node's name, as last listed
        self.nodes_listed = 0.0  # monotonic time of that listing
        self.procs: dict[str, subprocess.Popen | None] = {}  # pod uid -> process (None: starting)
        self.stopping: set[str] = set()  # pod uids whose deletion is under way
        self.lock = threading.Lock()
        self.status = StatusManager(log).start()  # every status write goes through it

    # --- pod lifecycle ---
    def start(self, pod: dict) -> None:
        """Prepare the pod's folder, volumes, address and every container (a missing Secret
        raises ContainerConfigError before anything runs), then run it in a thread."""
        md, spec = pod["metadata"], pod["spec"]
        uid = md["uid"]
        workdir = WORK / md["namespace"] / md["name"]
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        volumes = materialise_volumes(pod, workdir)
        pod_ip = self.net.allocate(uid)
        inits = [prepare(pod, c, volumes, workdir, pod_ip, init=True)
                 for c in spec.get("initContainers") or []]
        main = prepare(pod, spec["containers"][0], volumes, workdir, pod_ip)
        # Every pod here shares the host's loopback: a port a previous attempt's rank 0 still
        # holds (it is being torn down) would be in use. On a real node it is a fresh netns.
        port = next((int(m.group(1)) for a in main.argv
                     if (m := re.fullmatch(r"--master[-_]port=(\d+)", a))), None)
        if port and any(re.fullmatch(r"--node[-_]rank=0", a) for a in main.argv):
            wait_port_free(port)
        self.net.add_hosts(uid, dns_names(pod), pod_ip)
        threading.Thread(target=self.run_pod, args=(pod, inits, main, pod_ip),
                         daemon=True).start()

    def run_pod(self, pod: dict, inits: list[Process], main: Process, pod_ip: str) -> None:
        """Init containers one after another, each to exit 0 (a failed one restarted with the
        kubelet's back-off, 10 s doubling, unless restartPolicy is Never), then the main
        container; Ready once its readiness probe answers (at once without one)."""
        uid = pod["metadata"]["uid"]
        started = now()
        addr = {"hostIP": "127.0.0.1", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                "startTime": started}
        done: list[dict] = []  # initContainerStatuses of the inits that completed
        try:
            for i, init in enumerate(inits):
                restarts, last = 0, None
                while True:
                    since = now()
                    waiting = [container_status(p.name, p.image, waiting=("PodInitializing", ""))
                               for p in (*inits[i + 1:], main)]
                    self.status.set(pod, {
                        "phase": "Pending", **addr,
                        "conditions": conditions(since, Initialized=False, Ready=False,
                                                 ContainersReady=False),
                        "initContainerStatuses": [*done, container_status(
                            init.name, init.image, running=since, restarts=restarts,
                            last=last)] + waiting[:-1],
                        "containerStatuses": waiting[-1:]})
                    code, message, proc = self.run_container(pod, init)
                    if proc is None or not self.owns(uid, proc):
                        return  # gone
                    last = ended(code, since, message)
                    if code == 0:
                        done.append(container_status(init.name, init.image, terminated=last,
                                                     restarts=restarts))
                        break
                    never = pod["spec"].get("restartPolicy") == "Never"
                    if never or uid in self.stopping:
                        self.status.set(pod, {"phase": "Failed", "initContainerStatuses": [
                            *done, container_status(init.name, init.image, terminated=last,
                                                    restarts=restarts)]})
                        return
                    restarts += 1
                    backoff = min(10 * 2 ** (restarts - 1), 80)
                    log(f"init {pod['metadata']['name']}/{init.name} exited {code}; "
                        f"restarting in {backoff}s")
                    self.status.set(pod, {"initContainerStatuses": [*done, container_status(
                        init.name, init.image, restarts=restarts, last=last, waiting=(
                            "CrashLoopBackOff", f"back-off {backoff}s restarting failed "
                            f"container={init.name} pod={pod['metadata']['name']}"))]
                        + waiting[:-1]})
                    deadline = time.monotonic() + backoff
                    while time.monotonic() < deadline and uid not in self.stopping:
                        time.sleep(0.5)
                    if uid in self.stopping:
                        self.status.set(pod, {"phase": "Failed"})
                        return
            since = now()
            base = {"phase": "Running", **addr, "initContainerStatuses": done}
            proc = self.spawn(pod, main)
            if proc is None:
                return
            self.status.set(pod, {**base, **running(main.name, main.image, since, not main.probe)})
            if main.probe:
                threading.Thread(target=self.probe, daemon=True,
                                 args=(pod, main, proc, pod_ip, base)).start()
            code, message, _ = self.run_container(pod, main, proc)
            if not self.owns(uid, proc):
                return  # the pod is gone: nothing to report
            self.status.set(pod, {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": conditions(now(), Ready=False, ContainersReady=False),
                "containerStatuses": [container_status(
                    main.name, main.image, terminated=ended(code, since, message))]})
        finally:
            self.net.remove_hosts(uid)
            self.net.release(uid)

    def probe(self, pod: dict, main: Process, proc: subprocess.Popen, pod_ip: str,
              base: dict) -> None:
        """The readiness probe: GET the container's path until it answers 2xx or 3xx."""
        port, path = main.probe
        while self.owns(pod["metadata"]["uid"], proc) and proc.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{pod_ip}:{port}{path}", timeout=2):
                    pass  # urlopen raises on 4xx/5xx (HTTPError is an OSError)
                log(f"ready {pod['metadata']['namespace']}/{pod['metadata']['name']}")
                self.status.set(pod, {**base, **running(main.name, main.image, now(), True)})
                return
            time.sleep(1)

    def spawn(self, pod: dict, p: Process) -> subprocess.Popen | None:
        """Start one container's process; None when the pod was deleted meanwhile."""
        md = pod["metadata"]
        host_env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY_ENV)}
        env = {**host_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "HOSTNAME": pod["spec"].get("hostname", md["name"]),
               "FLYWHEEL_BIND_HOST": self.net.allocate(md["uid"]), **p.env}
        log(f"start {md['namespace']}/{md['name']} {p.name}: {' '.join(p.argv)}")
        p.cwd.mkdir(parents=True, exist_ok=True)
        with open(p.log, "wb") as out:
            proc = subprocess.Popen(p.argv, env=env, cwd=p.cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        with self.lock:
            deleted = md["uid"] not in self.procs  # deleted while starting (see terminate())
            if not deleted:
                self.procs[md["uid"]] = proc
        if deleted:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            return None
        return proc

    def run_container(self, pod: dict, p: Process, proc: subprocess.Popen | None = None
                      ) -> tuple[int, str, subprocess.Popen | None]:
        """Run (or wait for) one container: its exit code and termination message."""
        proc = proc or self.spawn(pod, p)
        if proc is None:
            return -1, "", None
        code = proc.wait()
        message = p.term_file.read_bytes()[:4096].decode(errors="replace") if (
            p.term_file.exists()) else ""
        if not message.strip() and code != 0 and p.fallback_to_logs:
            message = log_tail(p.log)  # the kubelet's fallback
        if code < 0:  # killed by a signal: report it the way a container runtime does
            code = 128 - code
        log(f"exit {pod['metadata']['namespace']}/{pod['metadata']['name']} {p.name}: {code}")
        return code, message, proc

    def owns(self, uid: str, proc: subprocess.Popen) -> bool:
        with self.lock:
            return self.procs.get(uid) is proc

    def terminate(self, pod: dict) -> None:
        """The pod is being deleted: SIGTERM, SIGKILL after its grace period; its terminal
        status written (by wait(), or here when it never ran), then the pod removed."""
        md = pod["metadata"]
        uid = md["uid"]
        with self.lock:
            if uid in self.stopping:
                return
            self.stopping.add(uid)
            proc = self.procs.get(uid)
            if uid in self.procs and proc is None:  # starting, or waiting for a Secret
                del self.procs[uid]
        self.status.delete_when_terminal(pod)
        if proc is not None:  # wait() reports how it ended
            if proc.poll() is None:
                grace = md.get("deletionGracePeriodSeconds")
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30) if (
                    grace is None) else grace
                log(f"stop {md['namespace']}/{md['name']} (grace {grace}s)")
                signal_group(proc, signal.SIGTERM)
                kill = threading.Timer(min(max(grace, 2), 10),
                                       lambda: proc.poll() is None
                                       and signal_group(proc, signal.SIGKILL))
                kill.daemon = True
                kill.start()
            return
        if (self.status.desired(uid) or {}).get("phase") in TERMINAL:
            return  # it ended here: removed once that is written
        if (pod.get("status") or {}).get("phase") in TERMINAL:
            self.status.delete_when_terminal(pod, as_it_is=True)  # it ended before we knew it
            return
        self.status.set(pod, never_ran(pod))  # never ran here

    def gone(self, uid: str) -> None:
        """The pod has left the apiserver: kill what is left of it."""
        with self.lock:
            proc = self.procs.pop(uid, None)
            self.stopping.discard(uid)
        if proc and proc.poll() is None:
            signal_group(proc, signal.SIGKILL)
        self.net.remove_hosts(uid)
        self.net.release(uid)
        self.status.forget(uid)

    def waiting(self, pod: dict, reason: str, message: str, retry_s: float = 10) -> None:
        """Pending with the container waiting for `reason`, as a kubelet reports it; tried
        again after `retry_s` unless the pod has gone."""
        uid = pod["metadata"]["uid"]
        with self.lock:
            if self.procs.get(uid, 0) is not None:  # deleted (popped) or started meanwhile
                return
        log(f"waiting {pod['metadata']['name']}: {reason}: {message}")
        container = pod["spec"]["containers"][0]
        self.status.set(pod, {"phase": "Pending", "containerStatuses": [{
            "name": container["name"], "image": container["image"], "ready": False,
            "restartCount": 0, "started": False,
            "state": {"waiting": {"reason": reason, "message": message}}}]})

        def retry() -> None:
            with self.lock:
                if uid not in self.procs:
                    return
            try:
                current = kube.request("GET", kube.object_path(
                    "v1", "Pod", pod["metadata"]["namespace"], pod["metadata"]["name"]))
            except kube.NotFound:
                return
            except Exception as err:
                if transient(err):  # the apiserver away: later
                    return later(retry_s, retry)
                raise
            if current["metadata"]["uid"] == uid and not current["metadata"].get(
                    "deletionTimestamp"):
                self.start_logged(current)

        later(retry_s, retry)

    # --- the loop: list, reconcile, watch from the listing; again whenever the watch ends ---
    def run(self) -> None:
        self.net.remove_hosts()
        delay = 1.0
        while True:
            try:
                version = self.relist()
                delay = 1.0
                for event in watch_lines("/api/v1/pods", version):
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again
                        raise RuntimeError(event["object"].get("message"))
                    node = event["object"].get("spec", {}).get("nodeName")
                    if node and node not in self.all_nodes:
                        self.list_nodes(fresh=5.0)  # a node that has joined since: ours?
                    if event["type"] != "BOOKMARK" and node in self.nodes:
                        self.handle(event["type"], event["object"])
            except Exception as err:  # a dropped watch, the apiserver away: list again
                log(f"watch: {err!r}; listing again in {delay:.0f}s")
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def relist(self) -> str:
        """Every pod of our nodes as the apiserver has it now, as a kubelet resyncs: new ones
        started, deleting ones stopped, ones gone while the watch was away killed, and each
        status the apiserver lacks written again. The listing's resourceVersion."""
        nodes = self.list_nodes()
        listing = call("GET", "/api/v1/pods")
        pods = {p["metadata"]["uid"]: p for p in listing["items"]
                if p["spec"].get("nodeName") in nodes}
        with self.lock:
            known = set(self.procs)
        for uid in (known | self.status.uids()) - pods.keys():
            self.gone(uid)
        resynced = 0
        for pod in pods.values():
            self.handle("ADDED", pod)
            resynced += self.status.resync(pod)
        if resynced:
            log(f"resync: {resynced} pod status(es) to write again")
        return listing["metadata"]["resourceVersion"]

    def list_nodes(self, fresh: float = 0.0) -> set[str]:
        """Our nodes (listed again unless listed less than `fresh` seconds ago)."""
        if time.monotonic() - self.nodes_listed >= fresh:
            self.nodes_listed = time.monotonic()
            nodes = call("GET", "/api/v1/nodes")["items"]
            self.all_nodes = {n["metadata"]["name"] for n in nodes}
            ours = {n["metadata"]["name"] for n in nodes
                    if labels_match(n["metadata"].get("labels") or {}, self.selector)}
            if ours != self.nodes:
                log(f"executing pods on nodes {sorted(ours)}")
                self.nodes = ours
        return self.nodes

    def handle(self, type_: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if type_ == "DELETED":
            self.gone(uid)
            return
        if pod["metadata"].get("deletionTimestamp"):
            self.terminate(pod)
            return
        with self.lock:
            if pod["status"].get("phase", "Pending") != "Pending" or uid in self.procs:
                return
            self.procs[uid] = None
        threading.Thread(target=self.start_logged, args=(pod,), daemon=True).start()

    def start_logged(self, pod: dict, tries: int = 0) -> None:
        uid = pod["metadata"]["uid"]
        try:
            self.start(pod)
        except ContainerConfigError as err:  # the kubelet's wait-and-retry, in its words
            self.net.release(uid)
            self.waiting(pod, "CreateContainerConfigError", str(err))
        except VolumeNotReady as err:  # the kubelet retries a mount within seconds
            self.net.release(uid)
            self.waiting(pod, "ContainerCreating", str(err), retry_s=2)
        except Exception as err:
            self.net.remove_hosts(uid)
            self.net.release(uid)
            if not transient(err):  # report it on the pod, as a kubelet would
                log(f"cannot start {pod['metadata']['name']}: {err!r}")
                with self.lock:
                    if uid not in self.procs:
                        return  # deleted meanwhile: terminate() has reported it
                self.status.set(pod, {"phase": "Failed", "reason": "ExecutorError",
                                      "message": str(err)[:1024]})
                return
            log(f"cannot start {pod['metadata']['name']} yet: {err!r}")  # the apiserver away

            def again() -> None:
                with self.lock:
                    if self.procs.get(uid, 0) is not None:  # deleted or started meanwhile
                        return
                self.start_logged(pod, tries + 1)

            later(min(2.0**tries, 10.0), again)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def labels_match(labels: dict[str, str], selector: str) -> bool:
    """An equality-based label selector (`k=v,k2=v2`)."""
    return all(labels.get(k) == v for k, _, v in (t.partition("=") for t in selector.split(",")))


def later(delay: float, fn) -> None:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    Executor(*sys.argv[2:3]).run()
