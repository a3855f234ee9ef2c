"""The local executor: a kubelet for the `local` node pool that really runs pods as processes.

Pods scheduled to nodes labelled `flywheel.dev/executor=local` are executed on this machine:
the container's own command, args and env (with `$(VAR)` expansion, fieldRef, secretKeyRef
and configMapKeyRef resolved like the kubelet does), with ConfigMap volumes and emptyDirs
materialised as local folders (a PersistentVolumeClaim as .cache/pvc/<namespace>/<claim>, so
runs in a namespace share their claims) and every mount path in command, args and env
pointed at them. The only other substitution is the network: each pod gets its own loopback
address (127.10.x.y) as `status.podIP`, and its stable DNS names (hostname + subdomain, as
rank 0's rendezvous address) resolve to it via /etc/hosts entries that the executor adds and
removes. Servers in the pod that bind `$FLYWHEEL_BIND_HOST` (the trainer's progress endpoint)
listen on the pod's own address, so several pods serve the same container port at once, and a
client reaches them at podIP:containerPort exactly as on a real cluster. Running, the exit
code and the termination message are reported through the Pod status, as a kubelet would,
and kept until the apiserver accepts them (hack/local_executor_status.py: retried with backoff
through an apiserver outage; every pod resynced when the watch reconnects, a pod deleted
meanwhile killed). Deleting a pod (gracefully: `kubectl delete`, an eviction, a drain) stops
its process group as a kubelet does: SIGTERM, SIGKILL after the grace period (at most 10 s
here), then the pod's terminal status (Failed unless the process exited 0; an eviction's
DisruptionTarget condition kept), and only then its removal. A pod force-deleted without
finalizers is simply gone: its processes are killed.

Test hook: `.cache/executor/env/<namespace>.json` ({"NAME": "value"}), when it exists, adds
environment variables to every pod of that namespace (e.g. the trainer's
FLYWHEEL_DEBUG_STOP_AT_STEP for the hang test).

Development and tests only; started by `hack/cluster.py up` with the other components.
`local_executor.py KUBECONFIG [SELECTOR]`: the nodes it runs pods for (default
flywheel.dev/executor=local); the tests run a second one for nodes of their own, with its
own loopback range and /etc/hosts mark.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__" and len(sys.argv) > 1:  # before the kubernetes client reads it
    os.environ["KUBECONFIG"] = sys.argv[1]

from flywheel_operator import kube
from flywheel_operator.vocab import EXECUTOR_LABEL, format_time

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_executor_pod import (  # noqa: E402
    PVC,
    ContainerConfigError,
    dns_names,
    expand,
    log_tail,
    materialise_volumes,
    remap,
    resolve_env,
    wait_port_free,
)
from local_executor_status import (  # noqa: E402
    TERMINAL,
    StatusManager,
    call,
    never_ran,
    transient,
    watch_lines,
)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "executor"
#: Storage credentials reach a pod only through its own spec (Secret refs), as on a real node.
HOST_ONLY_ENV = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS")
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# flywheel-local-executor"
NODE_LABEL = f"{EXECUTOR_LABEL}=local"

_hosts_lock = threading.Lock()


def now() -> str:
    return format_time()


def log(msg: str) -> None:
    print(f"{now()} executor: {msg}", flush=True)


class Executor:
    def __init__(self, selector: str = NODE_LABEL) -> None:
        self.selector = selector
        own = selector != NODE_LABEL  # a second executor (the tests'): addresses of its own
        self.hosts_mark = f"{HOSTS_MARK}-{selector.rpartition('=')[2]}" if own else HOSTS_MARK
        self.ip_prefix = "127.11" if own else "127.10"
        self.nodes: set[str] = set()  # ours
        self.all_nodes: set[str] = set()  # every node's name, as last listed
        self.nodes_listed = 0.0  # monotonic time of that listing
        self.procs: dict[str, subprocess.Popen | None] = {}  # pod uid -> process (None: starting)
        self.stopping: set[str] = set()  # pod uids whose deletion is under way
        self.lock = threading.Lock()
        self.ips: dict[str, str] = {}  # pod uid -> its loopback address
        self.next_ip = 0
        self.status = StatusManager(log).start()  # every status write goes through it

    # --- pod lifecycle ---
    def start(self, pod: dict) -> None:
        md, spec = pod["metadata"], pod["spec"]
        uid = md["uid"]
        workdir = WORK / md["namespace"] / md["name"]
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        container = spec["containers"][0]
        volumes = materialise_volumes(pod, workdir)
        mounts = {m["mountPath"]: volumes[m["name"]]
                  for m in container.get("volumeMounts") or [] if m["name"] in volumes}
        for mount_path, path in list(mounts.items()):
            if path.parent.parent == PVC:  # claims mounted side by side: their root too
                mounts.setdefault(str(Path(mount_path).parent), path.parent)
        term_path = container.get("terminationMessagePath", "/dev/termination-log")
        term_file = workdir / "termination-log"
        mounts[term_path] = term_file
        pod_ip = self.allocate_ip(uid)
        env = resolve_env(pod, container, pod_ip)
        env = {k: remap(v, mounts) for k, v in env.items()}
        extra = WORK / "env" / f"{md['namespace']}.json"  # the test hook (module docstring)
        if extra.exists():
            env.update(json.loads(extra.read_text()))
        argv = [remap(expand(a, env), mounts)
                for a in (container.get("command") or []) + (container.get("args") or [])]
        # Every pod here shares the host's loopback: a port a previous attempt's rank 0 still
        # holds (it is being torn down) would be in use. On a real node it is a fresh netns.
        port = next((int(m.group(1)) for a in argv
                     if (m := re.fullmatch(r"--master[-_]port=(\d+)", a))), None)
        if port and any(re.fullmatch(r"--node[-_]rank=0", a) for a in argv):
            wait_port_free(port)
        hostnames = dns_names(pod)
        self.add_hosts(uid, hostnames, pod_ip)
        host_env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY_ENV)}
        full_env = {**host_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "HOSTNAME": spec.get("hostname", md["name"]), "FLYWHEEL_BIND_HOST": pod_ip,
                    **env}
        log(f"start {md['namespace']}/{md['name']}: {' '.join(argv)}")
        with open(workdir / "output.log", "wb") as out:
            proc = subprocess.Popen(argv, env=full_env, cwd=workdir, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        with self.lock:
            deleted = uid not in self.procs  # deleted while starting (terminate() reports it)
            if not deleted:
                self.procs[uid] = proc
        if deleted:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            self.remove_hosts(uid)
            self.release_ip(uid)
            return
        started = now()
        self.status.set(pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}], "startTime": started,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("Initialized", "Ready", "ContainersReady")],
            "containerStatuses": [{"name": container["name"], "image": container["image"],
                                   "ready": True, "restartCount": 0, "started": True,
                                   "state": {"running": {"startedAt": started},
                                             "waiting": None, "terminated": None}}],
        })
        threading.Thread(target=self.wait, args=(pod, proc, term_file, started),
                         daemon=True).start()

    def wait(self, pod: dict, proc: subprocess.Popen, term_file: Path, started: str) -> None:
        code = proc.wait()
        self.remove_hosts(pod["metadata"]["uid"])
        self.release_ip(pod["metadata"]["uid"])
        message = term_file.read_bytes()[:4096].decode(errors="replace") if (
            term_file.exists()) else ""
        policy = pod["spec"]["containers"][0].get("terminationMessagePolicy")
        if not message.strip() and code != 0 and policy == "FallbackToLogsOnError":
            message = log_tail(term_file.parent / "output.log")  # the kubelet's fallback
        if code < 0:  # killed by a signal: report it the way a container runtime does
            code = 128 - code
        log(f"exit {pod['metadata']['namespace']}/{pod['metadata']['name']}: {code}")
        finished = now()
        container = pod["spec"]["containers"][0]
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": started, "finishedAt": finished}
        if message:
            terminated["message"] = message
        with self.lock:
            if self.procs.get(pod["metadata"]["uid"]) is not proc:
                return  # the pod is gone: nothing to report
        self.status.set(pod, {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": t, "status": "False", "lastTransitionTime": finished}
                           for t in ("Ready", "ContainersReady")],
            "containerStatuses": [{"name": container["name"], "image": container["image"],
                                   "ready": False, "restartCount": 0, "started": False,
                                   "state": {"terminated": terminated,
                                             "running": None, "waiting": None}}],
        })

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
        self.remove_hosts(uid)
        self.release_ip(uid)
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

    # --- pod addresses: one loopback address per pod, its DNS names in /etc/hosts ---
    def allocate_ip(self, uid: str) -> str:
        """A loopback address no live pod holds; rotating, so a freed one is not reused soon."""
        with self.lock:
            if uid in self.ips:
                return self.ips[uid]
            taken = set(self.ips.values())
            while True:
                self.next_ip = self.next_ip % (250 * 250) + 1
                ip = f"{self.ip_prefix}.{self.next_ip // 250 + 1}.{self.next_ip % 250 + 1}"
                if ip not in taken:
                    self.ips[uid] = ip
                    return ip

    def release_ip(self, uid: str) -> None:
        with self.lock:
            self.ips.pop(uid, None)

    def add_hosts(self, uid: str, names: list[str], ip: str = "127.0.0.1") -> None:
        with _hosts_lock:
            lines = HOSTS.read_text().splitlines()
            lines.append(f"{ip} {' '.join(names)} {self.hosts_mark} {uid}")
            HOSTS.write_text("\n".join(lines) + "\n")

    def remove_hosts(self, uid: str | None = None) -> None:
        with _hosts_lock:
            lines = HOSTS.read_text().splitlines()
            keep = [ln for ln in lines if f" {self.hosts_mark} " not in ln
                    or (uid is not None and not ln.endswith(f" {self.hosts_mark} {uid}"))]
            if keep != lines:
                HOSTS.write_text("\n".join(keep) + "\n")

    # --- the loop: list, reconcile, watch from the listing; again whenever the watch ends ---
    def run(self) -> None:
        self.remove_hosts()
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
            self.release_ip(uid)
            self.waiting(pod, "CreateContainerConfigError", str(err))
        except Exception as err:
            self.remove_hosts(uid)
            self.release_ip(uid)
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
