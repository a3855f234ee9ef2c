"""All of the operator's Kubernetes API calls, in one place.

Objects travel as plain dicts over the kubernetes client's authenticated REST transport (no
typed models: they cost CPU and drop fields they don't know). Everything is idempotent:
creates tolerate AlreadyExists, deletes tolerate NotFound, status writes are JSON merge
patches of the status subresource (no resourceVersion, so no 409), and transient errors are
retried with backoff. Every call has a (connect, read) timeout (`configure`), so a stalled
connection cannot hold a worker and a run's lock.

Children are the run's by owner uid, not by name: `create_owned` accepts an existing object
only when the owner's uid is in its ownerReferences (else `Conflict`, naming the object), and
`delete_owned` deletes only such an object, with a uid precondition.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from . import vocab
from .metrics import API_REQUESTS

log = logging.getLogger("flywheel")
RETRYABLE = {409, 429, 500, 502, 503, 504}
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class NotFound(Exception):
    pass


class Conflict(Exception):
    """An object of the name a child needs exists and belongs to someone else."""

    def __init__(self, kind: str, namespace: str, name: str, owners: str):
        self.kind, self.namespace, self.name = kind, namespace, name
        super().__init__(f"{kind} {namespace}/{name} already exists and is not this run's "
                         f"(owned by {owners}); it is left alone: delete or rename it")


class Terminating(Exception):
    """The namespace is being deleted: nothing new can be created in it."""


#: (connect, read) seconds for every request; set from the operator config at start-up.
TIMEOUT: tuple[float, float] = (5.0, 60.0)


def configure(connect: float, read: float) -> None:
    global TIMEOUT
    TIMEOUT = (connect, read)


@functools.cache
def client() -> kubernetes.client.ApiClient:
    """The shared, authenticated API client (in-cluster config, else $KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    # One kept-alive connection for each reconcile worker and creator (reconciler.py): past
    # the pool, urllib3 opens a connection per request, a TLS handshake each.
    configuration.connection_pool_maxsize = 96
    return kubernetes.client.ApiClient(configuration)


def request(method: str, path: str, body: dict | list | None = None,
            content_type: str = "application/json", query: dict | None = None) -> dict:
    """One API call with retries; returns the decoded response body."""
    api = client()
    for attempt in range(5):
        _, url, headers, payload, _ = api.param_serialize(
            method, path, query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        API_REQUESTS.labels(method).inc()
        try:
            response = api.call_api(method, url, header_params=headers, body=payload,
                                    _request_timeout=TIMEOUT)
            response.read()
            if response.status >= 400:
                raise ApiException(http_resp=response)
            return json.loads(response.data) if response.data else {}
        except urllib3.exceptions.HTTPError:  # timeouts, refused or dropped connections
            if attempt == 4:
                raise
            time.sleep(min(0.1 * 2**attempt, 2.0))
        except ApiException as err:
            if err.status == 404:
                raise NotFound(path) from None
            if err.status not in RETRYABLE or attempt == 4 or (
                err.status == 409 and method in ("POST", "DELETE")
            ):
                raise
            time.sleep(min(0.1 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    """The collection's path in `namespace` (None: in every namespace)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def list_all(path: str, selector: str, page: int = 500) -> tuple[list[dict], str]:
    """Every object of a collection (in pages, so a fleet's pods never arrive as one huge
    response) and the list's resourceVersion, to watch from."""
    items: list[dict] = []
    query: dict = {"labelSelector": selector, "limit": page}
    while True:
        found = request("GET", path, query=query)
        items += found.get("items") or []
        meta = found.get("metadata") or {}
        if not meta.get("continue"):
            return items, meta["resourceVersion"]
        query["continue"] = meta["continue"]


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


def watch(path: str, selector: str, version: str, seconds: int) -> Iterator[dict]:
    """The events of a collection after `version`, decoded, as the apiserver sends them,
    until it closes the watch (after about `seconds`). Bookmarks only move the version on.
    `Gone` when the version is too old; a dropped connection ends the iteration with an
    error, after which the caller watches again from the last version it saw."""
    api = client()
    query = {"labelSelector": selector, "resourceVersion": version, "watch": "true",
             "allowWatchBookmarks": "true", "timeoutSeconds": seconds}
    _, url, headers, _, _ = api.param_serialize(
        "GET", path, query_params=list(query.items()),
        header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
    API_REQUESTS.labels("WATCH").inc()
    response = api.call_api("GET", url, header_params=headers,
                            _request_timeout=(TIMEOUT[0], seconds + TIMEOUT[1])).response
    try:
        if response.status == 410:
            raise Gone(path)
        if response.status >= 400:
            response.read()
            raise ApiException(status=response.status, reason=response.reason,
                               http_resp=response)
        rest = b""
        for chunk in response.stream(None, decode_content=False):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if not line:
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    if (event["object"] or {}).get("code") == 410:
                        raise Gone(path)
                    raise ApiException(status=(event["object"] or {}).get("code", 500),
                                       reason=(event["object"] or {}).get("message", ""))
                yield event
    except BaseException:  # an error, Gone, or the caller done early (GeneratorExit)
        response.close()  # a half-read watch never goes back to the pool
        raise
    response.release_conn()  # read to its end: the connection can be kept


PLURALS = {"Service": "services", "Job": "jobs", "Pod": "pods",
           "InferenceService": "inferenceservices",
           "Deployment": "deployments", "Workload": "workloads",
           "NetworkPolicy": "networkpolicies", **vocab.PLURALS}


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(api_version, PLURALS[kind], namespace)}/{name}"


def create(obj: dict, namespace: str) -> bool:
    """Create `obj`; False when one of its name already exists. `Terminating` when the
    namespace is being deleted."""
    try:
        request("POST", collection_path(obj["apiVersion"], PLURALS[obj["kind"]], namespace), obj)
        return True
    except ApiException as err:
        if err.status == 409:
            return False
        if err.status == 403 and "being terminated" in str(err.body):
            raise Terminating(namespace) from None
        raise


def owners(obj: dict) -> str:
    """Who owns `obj`, in words (for Conflict messages)."""
    refs = obj["metadata"].get("ownerReferences") or []
    return ", ".join(f"{r['kind']} {r['name']} uid {r['uid']}" for r in refs) or "nothing"


def owned_by(obj: dict, uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def create_owned(obj: dict, namespace: str, owner_uid: str) -> bool:
    """Create a child of `owner_uid`; False when it exists already as that owner's (a re-run
    of the same step). An object of the name owned by anyone else raises `Conflict`."""
    for _ in range(3):
        if create(obj, namespace):
            return True
        meta = obj["metadata"]
        existing = get(obj["apiVersion"], obj["kind"], namespace, meta["name"])
        if existing is None:
            continue  # deleted in between: create it again
        if not owned_by(existing, owner_uid):
            raise Conflict(obj["kind"], namespace, meta["name"], owners(existing))
        return False
    raise Conflict(obj["kind"], namespace, obj["metadata"]["name"], "an object that keeps "
                   "coming back")


def get(api_version: str, kind: str, namespace: str, name: str) -> dict | None:
    try:
        return request("GET", object_path(api_version, kind, namespace, name))
    except NotFound:
        return None


def list_objects(api_version: str, kind: str, namespace: str, selector: str = "") -> list[dict]:
    query = {"labelSelector": selector} if selector else None
    path = collection_path(api_version, PLURALS[kind], namespace)
    return request("GET", path, query=query).get("items", [])


def delete(api_version: str, kind: str, namespace: str, name: str,
           uid: str | None = None) -> None:
    """Delete in the background (the garbage collector takes dependents); absent is fine. With
    `uid`, only that very object (a precondition: a namesake created since is kept)."""
    body: dict = {"propagationPolicy": "Background"}
    if uid:
        body["preconditions"] = {"uid": uid}
    try:
        request("DELETE", object_path(api_version, kind, namespace, name), body)
    except NotFound:
        pass
    except ApiException as err:
        if not (uid and err.status == 409):  # 409: the precondition failed, a namesake
            raise


def delete_owned(api_version: str, kind: str, namespace: str, name: str,
                 owner_uid: str) -> None:
    """Delete the object `name` only if `owner_uid` owns it (never someone else's)."""
    existing = get(api_version, kind, namespace, name)
    if existing is not None and owned_by(existing, owner_uid):
        delete(api_version, kind, namespace, name, existing["metadata"]["uid"])


def patch(api_version: str, kind: str, namespace: str, name: str, body: dict,
          subresource: str = "", content_type: str = MERGE_PATCH) -> dict | None:
    """A JSON merge patch (or `content_type`); None when the object is gone."""
    path = object_path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource
                                                              else "")
    try:
        return request("PATCH", path, body, content_type=content_type)
    except NotFound:
        return None


def patch_status(kind: str, namespace: str, name: str, status: dict) -> dict | None:
    """Merge-patch the status subresource of one of our custom objects."""
    return patch(vocab.API_VERSION, kind, namespace, name, {"status": status}, "status")


def queue_positions(namespace: str, queue: str) -> dict[str, int] | None:
    """Pending Workloads of a LocalQueue by name -> position (Kueue's visibility API); None
    where the cluster does not serve it."""
    path = collection_path(vocab.KUEUE_VISIBILITY_API_VERSION, "localqueues", namespace)
    try:
        items = request("GET", f"{path}/{queue}/pendingworkloads").get("items", [])
    except (NotFound, ApiException):
        return None
    return {w["metadata"]["name"]: w.get("positionInLocalQueue", 0) for w in items}


# --- Events ---------------------------------------------------------------------------------

#: Events are posted in the background, by this many threads: no reconcile waits for one.
_poster = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flywheel-event")
EVENT_MESSAGE_LENGTH = 1024
REPORTER = "flywheel"


def post_event(obj: dict, type: str, reason: str, message: str) -> None:
    """Post a core/v1 Event about `obj` (a run, Model or schedule: its apiVersion, kind and
    metadata), as `kubectl describe` shows them; in the background, and one that cannot be
    posted is logged, never raised (an Event is a note, not state)."""
    meta = obj["metadata"]
    if len(message) > EVENT_MESSAGE_LENGTH:
        half = EVENT_MESSAGE_LENGTH // 2 - 2
        message = f"{message[:half]}...{message[-half:]}"
    now = vocab.format_time()
    body = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"namespace": meta["namespace"], "generateName": f"{meta['name']}."},
        "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                           "name": meta["name"], "namespace": meta["namespace"],
                           **({"uid": meta["uid"]} if meta.get("uid") else {})},
        "type": type, "reason": reason, "message": message,
        "source": {"component": REPORTER}, "reportingComponent": REPORTER,
        "reportingInstance": socket.gethostname(),  # in a pod, the pod's name
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
    _poster.submit(_post_event, body)


def _post_event(body: dict) -> None:
    try:
        request("POST", collection_path("v1", "events", body["metadata"]["namespace"]), body)
    except Exception as err:  # noqa: BLE001 - a lost Event must not fail anything
        log.warning("could not post the Event %s for %s %s/%s: %s", body["reason"],
                    body["involvedObject"]["kind"], body["metadata"]["namespace"],
                    body["involvedObject"]["name"], err)
