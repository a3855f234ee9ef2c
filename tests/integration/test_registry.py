"""Registration, promotion gates and serving rollout against the real control plane.

Rank 0's summary reaches the operator the real way, through the Pod's termination message;
kwok writes it from the `flywheel.dev/simulate-message` annotation.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import Cluster, admission_refusal, wait_until
from tests.integration.test_operator import (
    finish_pods,
    manifest,
    run_status,
    running_pods,
    summary,
    wait_phase,
)

pytestmark = pytest.mark.cluster


def train(cluster: Cluster, ns: str, name: str, message: str, expect: str = "Succeeded"):
    cluster.apply(manifest(name, nodes=2, gpus=1), ns)
    pods = running_pods(cluster, ns, name, 1, 2)
    rank0 = [p for p in pods
             if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"]
    others = [p for p in pods if p not in rank0]
    finish_pods(cluster, ns, others, 0)
    finish_pods(cluster, ns, rank0, 0, message)
    return wait_phase(cluster, ns, name, expect)


def model(cluster: Cluster, ns: str) -> dict:
    return cluster.get("model", "flow-agent", "-n", ns)


def promoted(cluster: Cluster, ns: str) -> dict:
    return next(c for c in model(cluster, ns)["status"].get("conditions", [])
                if c["type"] == "Promoted")


def deployment(name: str) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"nodeSelector": {"flywheel.dev/pool": "cpu"},
                                       "containers": [{"name": "server", "image": "vllm"}]}}},
    }


def served(cluster: Cluster, ns: str, name: str) -> tuple[str | None, str | None]:
    template = cluster.get("deployment", name, "-n", ns)["spec"]["template"]
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
    return (env.get("FLYWHEEL_MODEL_URI"),
            (template["metadata"].get("annotations") or {}).get("flywheel.dev/model-digest"))


def test_registration_gates_serving_and_rollback(cluster, operator, namespace):
    cluster.apply(deployment("flow-server"), namespace)
    cluster.apply({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "flow-agent"},
        "spec": {"promotion": {"alias": "production",
                               "gates": [{"metric": "eval_loss", "max": 2.0},
                                         {"metric": "tool_call_accuracy/email", "min": 0.8}],
                               "noRegression": {"metrics": ["eval_loss"], "tolerance": 0.0}},
                 "servingTargets": [{"deployment": "flow-server", "container": "server"}]},
    }, namespace)

    # v1 passes every gate: latest and production move, the Deployment rolls out.
    status = train(cluster, namespace, "week-1", summary("w1", 1.5, 0.9))
    assert status["modelVersion"] == "flow-agent-v1"
    mv1 = cluster.get("mv", "flow-agent-v1", "-n", namespace)
    assert mv1["spec"]["version"] == 1
    assert mv1["metadata"]["labels"]["flywheel.dev/model"] == "flow-agent"
    assert mv1["spec"]["sourceRun"]["name"] == "week-1"
    assert mv1["spec"]["metrics"]["tool_call_accuracy/email"] == 0.9
    digest1 = mv1["spec"]["artifact"]["digest"]
    aliases = model(cluster, namespace)["status"]["aliases"]
    assert aliases["latest"]["version"] == aliases["production"]["version"] == 1
    assert promoted(cluster, namespace)["status"] == "True"
    wait_until(lambda: served(cluster, namespace, "flow-server")
               == ("s3://models/flow-agent/w1/", digest1), message="v1 rolled out")

    # v2 fails the e-mail gate: latest moves, production and serving stay on v1.
    train(cluster, namespace, "week-2", summary("w2", 1.2, 0.5))
    wait_until(lambda: model(cluster, namespace)["status"]["aliases"]["latest"]["version"] == 2)
    aliases = model(cluster, namespace)["status"]["aliases"]
    assert aliases["production"]["version"] == 1
    decision = promoted(cluster, namespace)
    assert decision["status"] == "False" and decision["reason"] == "GatesFailed"
    assert "tool_call_accuracy/email" in decision["message"]
    assert "eval_loss" not in decision["message"]  # only the failing gate is named
    assert served(cluster, namespace, "flow-server")[1] == digest1
    mv2 = cluster.get("mv", "flow-agent-v2", "-n", namespace)
    assert mv2["spec"]["comparison"]["version"] == 1
    assert mv2["spec"]["comparison"]["deltas"]["tool_call_accuracy/email"] == pytest.approx(-0.4)

    # v3 passes: production and serving move to v3.
    train(cluster, namespace, "week-3", summary("w3", 1.0, 0.95))
    wait_until(lambda: model(cluster, namespace)["status"]["aliases"]["production"]["version"]
               == 3, message="v3 promoted")
    digest3 = cluster.get("mv", "flow-agent-v3", "-n", namespace)["spec"]["artifact"]["digest"]
    wait_until(lambda: served(cluster, namespace, "flow-server")[1] == digest3)

    # Manual rollback: pin production to v1; the Deployment rolls back.
    cluster.kubectl("patch", "model", "flow-agent", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"pinnedAliases": {"production": 1}}}')
    wait_until(lambda: served(cluster, namespace, "flow-server")
               == ("s3://models/flow-agent/w1/", digest1), message="rolled back to v1")
    assert model(cluster, namespace)["status"]["aliases"]["production"]["version"] == 1

    # ModelVersions are immutable, and outlive their runs.
    res = cluster.kubectl("patch", "mv", "flow-agent-v1", "-n", namespace, "--type=merge",
                          "-p", '{"spec": {"version": 9}}', check=False)
    assert res.returncode != 0
    cluster.kubectl("delete", "ftr", "week-1", "-n", namespace, "--timeout=30s")
    assert cluster.get("mv", "flow-agent-v1", "-n", namespace)["spec"]["version"] == 1


def test_restarted_operator_never_registers_twice(cluster, operator, namespace):
    train(cluster, namespace, "once", summary("once", 1.0, 0.9))
    operator.kill()
    operator.start()
    cluster.apply(manifest("twice", nodes=2, gpus=1), namespace)
    running_pods(cluster, namespace, "twice", 1, 2)  # the restarted operator is reconciling
    versions = cluster.get("mv", "-n", namespace)["items"]
    assert [v["spec"]["sourceRun"]["name"] for v in versions] == ["once"]
    assert run_status(cluster, namespace, "once")["modelVersion"] == "flow-agent-v1"


def refuse_model_status(namespace: str) -> list[dict]:
    """A ValidatingAdmissionPolicy (and binding, for `namespace` only) that refuses every write
    of a Model's status there: a registration stops right after its ModelVersion exists."""
    return admission_refusal(
        f"fwt-no-model-status-{namespace}", namespace,
        [{"apiGroups": ["flywheel.dev"], "apiVersions": ["*"], "operations": ["UPDATE"],
          "resources": ["models/status"]}],
        "false", "refused: no Model status writes in this test")


def test_an_operator_killed_between_a_version_and_its_models_status_records_it_once(
        cluster, operator, namespace):
    """A crash between a ModelVersion's create and its Model's status write, caused for real:
    admission refuses the Model's status writes, so the registration stops (and is retried)
    right after its ModelVersion exists; the operator is SIGKILLed there, the refusal lifted
    and the operator started again: the same ModelVersion is recorded in the Model, none is
    created twice, and the run succeeds with it."""
    refusal = refuse_model_status(namespace)
    cluster.apply({"apiVersion": "flywheel.dev/v1alpha1", "kind": "Model",
                   "metadata": {"name": "probe"}, "spec": {}}, namespace)

    def status_write_refused() -> bool:
        return "refused" in cluster.kubectl(
            "patch", "model", "probe", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": {"conditions": []}}),
            "--dry-run=server", check=False).stderr

    try:
        cluster.apply(refusal)
        wait_until(status_write_refused, timeout=30, message="the refusal in force")
        cluster.apply(manifest("lost", nodes=2, gpus=1), namespace)
        pods = running_pods(cluster, namespace, "lost", 1, 2)
        finish_pods(cluster, namespace, pods, 0, summary("lost", 1.0, 0.9))
        wait_until(lambda: cluster.get("mv", "-n", namespace)["items"], timeout=60,
                   message="the ModelVersion created, its Model's status refused")
        assert run_status(cluster, namespace, "lost")["phase"] != "Succeeded"
        operator.kill()
    finally:
        for obj in reversed(refusal):
            cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"],
                            "--ignore-not-found")
    wait_until(lambda: not status_write_refused(), timeout=30, message="the refusal lifted")
    operator.start()
    status = wait_phase(cluster, namespace, "lost", "Succeeded")
    versions = cluster.get("mv", "-n", namespace)["items"]
    assert [v["metadata"]["name"] for v in versions] == ["flow-agent-v1"]
    assert status["modelVersion"] == "flow-agent-v1"
    recorded = model(cluster, namespace)["status"]
    assert [v["version"] for v in recorded["versions"]] == [1]
    assert recorded["aliases"]["latest"]["version"] == 1


@pytest.mark.parametrize("message, reason", [
    (" ", "no summary"),  # blank: rank 0 wrote nothing
    ("this is not json", "not JSON"),
    ('{"artifact": {"uri": "s3://m/x/"}, "steps": 1, "tokens": 1}', "artifact.digest"),
])
def test_missing_or_malformed_summary_fails_without_registering(
        cluster, operator, namespace, message, reason):
    status = train(cluster, namespace, "broken", message, expect="Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSummary" and reason in failed["message"]
    assert cluster.get("mv", "-n", namespace)["items"] == []
