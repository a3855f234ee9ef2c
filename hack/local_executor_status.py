"""The local executor's status manager, as the kubelet's: what each pod's status should be,
kept until the apiserver has accepted it.

`set` records a pod's desired status (merged into what was set before: the Running status's
podIP and startTime stay when the terminated one is added) and a worker writes it: a
strategic merge patch of the status subresource with the pod's uid as a precondition (a pod
of the same name created since is not touched), so conditions merge by type and the
apiserver's own (DisruptionTarget from an eviction) are kept. A write that fails (the
apiserver down, restarting, overloaded) is tried again with backoff, 0.2 s doubling to 5 s,
for as long as the pod exists; nothing is dropped after one failure. `resync` (after the
executor's watch reconnects) writes again every status the apiserver does not show.

A pod being deleted (gracefully: `kubectl delete`, an eviction, a drain) is removed (grace
period 0, uid precondition) only once its terminal status has been accepted, as a kubelet
does: the Job controller and the operator see it `Failed` first.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import urllib3
from flywheel_operator import kube
from flywheel_operator.vocab import format_time
from kubernetes.client.exceptions import ApiException

STRATEGIC = "application/strategic-merge-patch+json"
TIMEOUT = (5.0, 30.0)
BACKOFF = (0.2, 5.0)  # first retry, most between retries (s)
TERMINAL = ("Succeeded", "Failed")


def conditions(at: str, **state: bool) -> list[dict]:
    """Pod conditions (Initialized, Ready, ContainersReady...) as of `at`."""
    return [{"type": t, "status": str(v), "lastTransitionTime": at} for t, v in state.items()]


def container_status(name: str, image: str, *, running: str | None = None,
                     ready: bool = False, terminated: dict | None = None,
                     waiting: tuple[str, str] | None = None, restarts: int = 0,
                     last: dict | None = None) -> dict:
    """One entry of containerStatuses / initContainerStatuses: running since `running`, or
    `terminated` ({exitCode, reason, startedAt, finishedAt, message}), or `waiting` (reason,
    message); `last`: the terminated state before a restart."""
    state = {"running": {"startedAt": running} if running else None,
             "terminated": terminated,
             "waiting": {"reason": waiting[0], "message": waiting[1]} if waiting else None}
    status = {"name": name, "image": image, "ready": ready, "restartCount": restarts,
              "started": bool(running), "state": state}
    if last:
        status["lastState"] = {"terminated": last}
    return status


def running(name: str, image: str, since: str, ready: bool) -> dict:
    """The status of a pod whose (one) container runs since `since`, Ready or not yet."""
    return {"conditions": conditions(since, Initialized=True, Ready=ready, ContainersReady=ready),
            "containerStatuses": [container_status(name, image, running=since, ready=ready)]}


def ended(code: int, started: str, message: str = "") -> dict:
    """A container's terminated state, as a runtime reports it."""
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                  "startedAt": started, "finishedAt": format_time()}
    if message:
        terminated["message"] = message
    return terminated


def never_ran(pod: dict) -> dict:
    """The terminal status of a pod deleted before its container ran, in the kubelet's words."""
    finished = format_time()
    return {"phase": "Failed",
            "conditions": [{"type": t, "status": "False", "lastTransitionTime": finished}
                           for t in ("Ready", "ContainersReady")],
            "containerStatuses": [{
                "name": c["name"], "image": c["image"], "ready": False, "restartCount": 0,
                "started": False, "state": {"waiting": None, "running": None, "terminated": {
                    "exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": finished,
                    "message": "The container could not be located when the pod was "
                               "terminated"}}} for c in pod["spec"]["containers"]]}


def call(method: str, path: str, body: dict | None = None,
         content_type: str = "application/json", query: dict | None = None) -> dict:
    """One API request, no retries (the caller's backoff retries); the decoded body.
    ApiException for HTTP errors, urllib3's HTTPError when the apiserver cannot be reached."""
    api = kube.client()
    _, url, headers, payload, _ = api.param_serialize(
        method, path, query_params=list((query or {}).items()),
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body, auth_settings=["BearerToken"])
    response = api.call_api(method, url, header_params=headers, body=payload,
                            _request_timeout=TIMEOUT)
    response.read()
    if response.status >= 400:
        raise ApiException(http_resp=response)
    return json.loads(response.data) if response.data else {}


def transient(err: Exception) -> bool:
    """An error that passes: the apiserver unreachable, restarting or overloaded."""
    if isinstance(err, ApiException):
        return err.status in (0, 429) or err.status >= 500
    return isinstance(err, urllib3.exceptions.HTTPError)


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


@dataclass
class Entry:
    namespace: str
    name: str
    status: dict = field(default_factory=dict)  # the desired status, accumulated
    version: int = 0  # bumped by every set
    written: int = 0  # the version the apiserver accepted
    delete: bool = False  # remove the pod once its terminal status is in
    as_it_is: bool = False  # ...or at once: it ended before this executor knew it
    deleted: bool = False  # the removal was accepted
    failures: int = 0  # failed tries in a row
    due: float = 0.0  # monotonic time of the next try

    @property
    def terminal(self) -> bool:
        return self.status.get("phase") in TERMINAL

    def work(self) -> str | None:
        if self.version > self.written:
            return "write"
        if self.delete and not self.deleted and (self.terminal or self.as_it_is):
            return "delete"
        return None


class StatusManager:
    """Each pod's desired status, written until accepted (module docstring)."""

    def __init__(self, log: Callable[[str], None] = print,
                 request: Callable[..., dict] = call) -> None:
        self.log, self.request = log, request
        self.entries: dict[str, Entry] = {}  # pod uid -> entry
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.run, daemon=True, name="status")

    def start(self) -> StatusManager:
        self.thread.start()
        return self

    # --- what the executor tells it ---
    def set(self, pod: dict, status: dict) -> None:
        """`status` is (part of) what the pod's status should be now."""
        md = pod["metadata"]
        with self.cond:
            entry = self.entries.setdefault(md["uid"], Entry(md["namespace"], md["name"]))
            if entry.terminal and status.get("phase") not in (None, *TERMINAL):
                return  # never out of a terminal phase (the apiserver refuses it too)
            entry.status.update(status)
            entry.version += 1
            entry.failures, entry.due = 0, 0.0
            self.cond.notify()

    def delete_when_terminal(self, pod: dict, as_it_is: bool = False) -> None:
        """The pod is being deleted: remove it once its terminal status is accepted (or, with
        `as_it_is`, at once: it has ended and this executor has nothing to write for it)."""
        md = pod["metadata"]
        with self.cond:
            entry = self.entries.setdefault(md["uid"], Entry(md["namespace"], md["name"]))
            if not entry.delete or (as_it_is and not entry.as_it_is):
                entry.delete, entry.as_it_is = True, entry.as_it_is or as_it_is
                entry.failures, entry.due = 0, 0.0
                self.cond.notify()

    def forget(self, uid: str) -> None:
        """The pod is gone from the apiserver."""
        with self.cond:
            self.entries.pop(uid, None)

    def desired(self, uid: str) -> dict | None:
        with self.cond:
            entry = self.entries.get(uid)
            return dict(entry.status) if entry else None

    def uids(self) -> set[str]:
        with self.cond:
            return set(self.entries)

    def resync(self, pod: dict) -> bool:
        """The apiserver shows `pod` (a fresh listing): write its desired status again where
        the apiserver's differs. True when it does."""
        with self.cond:
            entry = self.entries.get(pod["metadata"]["uid"])
            if not entry or not entry.status or entry.version > entry.written:
                return False
            if not differs(pod.get("status") or {}, entry.status):
                return False
            entry.version += 1
            entry.failures, entry.due = 0, 0.0
            self.cond.notify()
            return True

    def idle(self) -> bool:
        """Nothing left to write or delete (tests)."""
        with self.cond:
            return not any(e.work() for e in self.entries.values())

    # --- the worker ---
    def run(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                due = [(uid, e) for uid, e in self.entries.items() if e.work() and e.due <= now]
                if not due:
                    pending = [e.due for e in self.entries.values() if e.work()]
                    self.cond.wait(timeout=max(0.0, min(pending) - now) if pending else None)
                    continue
            for uid, entry in due:
                self.sync(uid, entry)

    def sync(self, uid: str, entry: Entry) -> None:
        with self.cond:
            work, version, status = entry.work(), entry.version, dict(entry.status)
            ns, name = entry.namespace, entry.name
        if work is None:
            return
        try:
            if work == "write":
                self.request("PATCH", pod_path(ns, name) + "/status",
                             {"metadata": {"uid": uid}, "status": status}, STRATEGIC)
            else:
                self.request("DELETE", pod_path(ns, name),
                             {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
        except (urllib3.exceptions.HTTPError, ApiException) as err:
            code = getattr(err, "status", None)
            if code in (404, 409):  # gone, or the name is another pod's now: nothing to do
                self.forget(uid)
                return
            if code == 422 and work == "write":  # refused for good (invalid): not again
                self.log(f"status of {ns}/{name} refused: {err}")
                with self.cond:
                    entry.written = max(entry.written, version)
                return
            with self.cond:
                entry.failures += 1
                delay = min(BACKOFF[0] * 2 ** (entry.failures - 1), BACKOFF[1])
                entry.due = time.monotonic() + delay
            self.log(f"{work} {ns}/{name} failed ({short(err)}); try {entry.failures + 1} "
                     f"in {delay:.1f}s")
            return
        with self.cond:
            retried, entry.failures = entry.failures, 0
            if work == "write":
                entry.written = max(entry.written, version)
            else:
                entry.deleted = True
        if retried:
            self.log(f"{work} {ns}/{name} accepted after {retried} failed tries"
                     + (f" (phase {status.get('phase')})" if work == "write" else ""))


def differs(current: dict, desired: dict) -> bool:
    """Whether the apiserver's status lacks what the executor wants it to show: the phase,
    the address, each container's state."""
    if any(current.get(k) != desired[k] for k in ("phase", "podIP") if k in desired):
        return True
    have = state_kinds(current)
    return any(have.get(name) != kind for name, kind in state_kinds(desired).items())


def state_kinds(status: dict) -> dict[str, str | None]:
    """Container name -> its state (running, waiting or terminated)."""
    return {c["name"]: next((k for k, v in (c.get("state") or {}).items() if v), None)
            for c in status.get("containerStatuses") or []}


def short(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"HTTP {err.status} {err.reason}"
    return type(err).__name__


def watch_lines(path: str, resource_version: str, timeout_s: int = 300):
    """The events of a watch from `resource_version`, decoded (bookmarks included)."""
    from kubernetes.watch.watch import iter_resp_lines

    api = kube.client()
    query = [("watch", "true"), ("resourceVersion", resource_version),
             ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_s))]
    _, url, headers, _, _ = api.param_serialize("GET", path, query_params=query,
                                                auth_settings=["BearerToken"])
    response = api.call_api("GET", url, header_params=headers,
                            _request_timeout=(TIMEOUT[0], timeout_s + 30))
    try:
        if response.status >= 400:
            response.read()
            raise ApiException(http_resp=response)
        for line in iter_resp_lines(response.response):
            if line:
                yield json.loads(line)
    finally:
        response.response.release_conn()
