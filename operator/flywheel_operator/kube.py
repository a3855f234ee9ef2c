"""All of the operator's Kubernetes API calls, in one place.

Objects travel as plain dicts over the kubernetes client's authenticated REST transport (no
typed models: they cost CPU and drop fields they don't know). Everything is idempotent:
creates tolerate AlreadyExists, deletes tolerate NotFound, status writes are JSON merge
patches of the status subresource (no resourceVersion, so no 409), and transient errors are
retried with backoff.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import vocab
from .metrics import API_REQUESTS

RETRYABLE = {409, 429, 500, 502, 503, 504}
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class NotFound(Exception):
    pass


@functools.cache
def client() -> kubernetes.client.ApiClient:
    """The shared, authenticated API client (in-cluster config, else $KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32
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
            response = api.call_api(method, url, header_params=headers, body=payload)
            response.read()
            if response.status >= 400:
                raise ApiException(http_resp=response)
            return json.loads(response.data) if response.data else {}
        except ApiException as err:
            if err.status == 404:
                raise NotFound(path) from None
            if err.status not in RETRYABLE or attempt == 4 or (
                err.status == 409 and method == "POST"
            ):
                raise
            time.sleep(min(0.1 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def collection_path(api_version: str, plural: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


PLURALS = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs", "Pod": "pods",
           "Deployment": "deployments", "Workload": "workloads", **vocab.PLURALS}


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(api_version, PLURALS[kind], namespace)}/{name}"


def create(obj: dict, namespace: str) -> bool:
    """Create `obj`; False when it already exists (a re-run of the same step)."""
    try:
        request("POST", collection_path(obj["apiVersion"], PLURALS[obj["kind"]], namespace), obj)
        return True
    except ApiException as err:
        if err.status == 409:
            return False
        if err.status == 403 and "being terminated" in str(err.body):
            return False  # the namespace is going away, and the object with it
        raise


def get(api_version: str, kind: str, namespace: str, name: str) -> dict | None:
    try:
        return request("GET", object_path(api_version, kind, namespace, name))
    except NotFound:
        return None


def list_objects(api_version: str, kind: str, namespace: str, selector: str = "") -> list[dict]:
    query = {"labelSelector": selector} if selector else None
    path = collection_path(api_version, PLURALS[kind], namespace)
    return request("GET", path, query=query).get("items", [])


def delete(api_version: str, kind: str, namespace: str, name: str) -> None:
    """Delete in the background (the garbage collector takes dependents); absent is fine."""
    with contextlib.suppress(NotFound):
        request("DELETE", object_path(api_version, kind, namespace, name),
                {"propagationPolicy": "Background"})


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
