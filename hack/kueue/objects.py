"""Kueue's objects for the local cluster, as pure functions (hack/cluster.py applies them).

Kept apart from hack/cluster.py so they are unit-tested without a cluster
(tests/unit/test_kueue_objects.py).

Kueue (sigs.k8s.io/kueue, hack/tools/kueue) runs out of cluster like the rest: a kubeconfig,
leader election off, its CRDs from its module source, the admin objects of hack/kueue/
(a ResourceFlavor, ClusterQueue and quota per GPU pool; LocalQueues `h200` and `local` in
`default` and `flywheel-demo`: `kubectl apply -n NS -f hack/kueue/local-queues.yaml` adds
them to another namespace), waitForPodsReady on, only the batch/job integration.
No admission webhooks are registered. Kueue's Job webhook only defaults: it sets
`suspend: true` on a Job that has a queue-name label (and, in a namespace with a LocalQueue
named `default`, adds the label). The operator creates its Jobs suspended and labelled, and
Kueue's Job reconciler does the rest without a webhook (it creates the Workload, unsuspends
on admission with the flavor's nodeSelector and tolerations, suspends again on eviction, and
suspends a labelled Job that starts unsuspended). Without webhooks a Kueue outage cannot
refuse every Job in the cluster, and Jobs without the label are never touched.
Its certificate manager still runs (turning it off makes Kueue read its metrics certificate
from /etc/kueue/metrics/certs): it gets a Secret holding our CA and serving certificate,
valid for the names it checks, and keeps them. It injects that CA into the CRDs' conversion
webhook (v1beta1 <-> v1beta2, served by URL on 127.0.0.1:17443), the one webhook in use.
The visibility API (queue positions) is off: out of cluster it has no Service to be reached
through; the operator reports positions where a cluster serves it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
NAMESPACE = "kueue-system"
SERVICE = "kueue-webhook-service"  # the names Kueue's certificate manager looks for
SECRET = "kueue-webhook-server-cert"
# CRDs whose conversion webhook (v1beta1 <-> v1beta2) Kueue's certificate manager keeps.
CONVERTED = {"localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters"}


def crds(module_dir: Path, ca_bundle: str, webhook_url: str) -> list[dict]:
    """Kueue's CRDs from its module source, conversion served by URL (`ca_bundle`: base64)."""
    out = []
    for path in sorted((module_dir / "config" / "components" / "crd" / "bases").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "conversionReviewVersions": ["v1"],
                "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": ca_bundle}}}
        out.append(crd)
    return out


def config(cert_dir: Path, webhook_port: int, health_address: str) -> dict:
    """Kueue's Configuration: out of cluster, one replica, all-or-nothing admission."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": NAMESPACE,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": health_address},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": True, "webhookServiceName": SERVICE,
                                   "webhookSecretName": SECRET},
        # All or nothing: an admitted workload whose pods are not all Ready within the
        # timeout is evicted and requeued; other admissions wait meanwhile (blockAdmission).
        "waitForPodsReady": {"timeout": "5m", "blockAdmission": True, "requeuingStrategy": {
            "timestamp": "Eviction", "backoffBaseSeconds": 10, "backoffMaxSeconds": 300}},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "clientConnection": {"qps": 200, "burst": 400},
        # Out of cluster the visibility API server has no Service to be reached through, the
        # apiserver here has no aggregation layer (front-proxy certificates), and v0.19 keeps
        # its serving certificates in the fixed directory /visibility (pkg/visibility/server.go).
        # So the queue position (status.queue.position) is unit-tested only.
        "featureGates": {"VisibilityOnDemand": False},
    }


def _load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((HERE / name).read_text()) if d]


def _times(quantity: str, n: int) -> str:
    """'8' x 4 -> '32', '2000Gi' x 4 -> '8000Gi' (whole-number quantities only)."""
    digits = quantity.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return f"{int(digits) * n}{quantity[len(digits):]}"


def admin(nodes: list[dict]) -> list[dict]:
    """cluster-queues.yaml, each ClusterQueue's quota set to what its flavor's nodes hold."""
    docs = _load("cluster-queues.yaml")
    labels = {d["metadata"]["name"]: d["spec"]["nodeLabels"] for d in docs
              if d["kind"] == "ResourceFlavor"}
    for cq in (d for d in docs if d["kind"] == "ClusterQueue"):
        for flavor in (f for g in cq["spec"]["resourceGroups"] for f in g["flavors"]):
            matching = [n for n in nodes
                        if labels[flavor["name"]].items() <= n["metadata"]["labels"].items()]
            for res in flavor["resources"]:
                per_node = matching[0]["status"]["allocatable"].get(res["name"], "0") \
                    if matching else "0"
                res["nominalQuota"] = _times(per_node, len(matching))
    return docs


def local_queues(namespace: str) -> list[dict]:
    """local-queues.yaml in `namespace`."""
    docs = _load("local-queues.yaml")
    for d in docs:
        d["metadata"]["namespace"] = namespace
    return docs
