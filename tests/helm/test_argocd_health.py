"""Argo CD health checks (argocd/health/*.lua) run in a real Lua runtime against sample objects."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import yaml

from .support import HEALTH, ROOT, lua_health

KINDS = ("FineTuneRun", "ModelVersion", "Model")
DIGEST = "sha256:" + "ab" * 32


def run(phase: str | None = None, **status) -> dict:
    obj = {
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneRun",
        "metadata": {"name": "flow-agent-w48", "namespace": "ml", "generation": 1},
        "spec": {"modelName": "flow-agent"},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "observedGeneration": 1, **status}
    return obj


def condition(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-26T10:00:00Z", "observedGeneration": 1}


# --- FineTuneRun ----------------------------------------------------------------------------------


def test_run_without_status_is_progressing():
    assert lua_health("FineTuneRun", run())["status"] == "Progressing"


@pytest.mark.parametrize("phase", ["Pending", "Running", "Suspended"])
def test_unfinished_run_is_progressing(phase):
    health = lua_health("FineTuneRun", run(phase, message=f"attempt 1: {phase.lower()}"))
    assert health == {"status": "Progressing", "message": f"{phase}: attempt 1: {phase.lower()}"}


def test_succeeded_run_is_healthy():
    health = lua_health("FineTuneRun", run(
        "Succeeded", message="attempt 1 completed", modelVersion="flow-agent-v3",
        conditions=[condition("Succeeded", "True", "JobComplete")]))
    assert health["status"] == "Healthy"
    assert "attempt 1 completed" in health["message"] and "flow-agent-v3" in health["message"]


def test_failed_run_is_degraded_with_the_operators_message():
    message = ("attempt 4 failed and the restart budget (3) is spent: pod flow-agent-w48-a4-0: "
               "NCCL watchdog timeout")
    health = lua_health("FineTuneRun", run(
        "Failed", message=message,
        conditions=[condition("Failed", "True", "RestartBudgetExhausted", message)]))
    assert health == {"status": "Degraded", "message": message}


def test_failed_run_without_message_uses_the_failed_condition():
    health = lua_health("FineTuneRun", run(
        "Failed", conditions=[condition("Failed", "True", "PreflightFailed", "too few email")]))
    assert health == {"status": "Degraded", "message": "too few email"}


def test_unschedulable_run_is_progressing_and_says_why():
    why = "0/6 nodes are available: 4 Insufficient nvidia.com/gpu"
    health = lua_health("FineTuneRun", run(
        "Pending", message="attempt 1: 0/4 pod(s) running",
        conditions=[condition("Scheduled", "False", "Unschedulable", why)]))
    assert health["status"] == "Progressing" and why in health["message"]


def test_stale_status_says_the_operator_is_behind():
    obj = run("Running", message="attempt 1: 2/2 pod(s) running")
    obj["metadata"]["generation"] = 2
    health = lua_health("FineTuneRun", obj)
    assert health["status"] == "Progressing" and "generation 2" in health["message"]


# --- ModelVersion --------------------------------------------------------------------------------


def model_version(digest: str | None = DIGEST) -> dict:
    artifact = {"uri": "s3://models/flow-agent/v3/", "format": "huggingface-safetensors"}
    if digest:
        artifact["digest"] = digest
    return {"apiVersion": "flywheel.dev/v1alpha1", "kind": "ModelVersion",
            "metadata": {"name": "flow-agent-v3", "namespace": "ml"},
            "spec": {"modelName": "flow-agent", "version": 3, "artifact": artifact}}


def test_model_version_with_digest_is_healthy():
    assert lua_health("ModelVersion", model_version()) == {
        "status": "Healthy", "message": f"flow-agent v3: {DIGEST}"}


def test_model_version_without_digest_is_degraded():
    assert lua_health("ModelVersion", model_version(None))["status"] == "Degraded"


# --- Model ---------------------------------------------------------------------------------------


def model(conditions: list[dict] | None = None, aliases: dict | None = None) -> dict:
    obj = {"apiVersion": "flywheel.dev/v1alpha1", "kind": "Model",
           "metadata": {"name": "flow-agent", "namespace": "ml", "generation": 1},
           "spec": {"promotion": {"alias": "production", "gates": [
               {"metric": "tool_call_accuracy/email-config", "min": 0.9}]}}}
    if conditions is not None or aliases is not None:
        obj["status"] = {"conditions": conditions or [], "aliases": aliases or {}}
    return obj


def alias(version: int) -> dict:
    return {"version": version, "modelVersion": f"flow-agent-v{version}",
            "uri": f"s3://models/flow-agent/v{version}/", "digest": DIGEST}


def test_model_without_status_is_healthy():
    assert lua_health("Model", model()) == {"status": "Healthy",
                                            "message": "No versions registered yet"}


def test_model_with_promoted_candidate_is_healthy_and_lists_aliases():
    health = lua_health("Model", model(
        [condition("Promoted", "True", "Promoted", "v3 promoted to production")],
        {"latest": alias(3), "production": alias(3)}))
    assert health == {"status": "Healthy", "message": "latest -> v3, production -> v3"}


def test_blocked_promotion_is_degraded_and_names_the_gate():
    # As the operator writes it (registry.record_version).
    message = ("version 4: not promoted to production: tool_call_accuracy/email-config=0.84 "
               "< min 0.9")
    health = lua_health("Model", model(
        [condition("Promoted", "False", "GatesFailed", message)],
        {"latest": alias(4), "production": alias(3)}))
    assert health == {"status": "Degraded",
                      "message": f"Promotion blocked (GatesFailed): {message}"}


def test_pinned_alias_is_a_deliberate_rollback_not_degraded():
    message = "version 5: production is pinned by spec.pinnedAliases"
    health = lua_health("Model", model(
        [condition("Promoted", "False", "AliasPinned", message)],
        {"latest": alias(5), "production": alias(3)}))
    assert health == {"status": "Healthy",
                      "message": f"latest -> v5, production -> v3 ({message})"}


# --- the shipped argocd-cm snippet -----------------------------------------------------------


def _render_cm():
    spec = importlib.util.spec_from_file_location("render_cm", ROOT / "argocd" / "render_cm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_argocd_cm_snippet_is_generated_from_the_lua_files():
    module = _render_cm()
    assert (ROOT / "argocd" / "argocd-cm.yaml").read_text() == module.render(), (
        "argocd/argocd-cm.yaml is stale: run `python argocd/render_cm.py`")


def test_argocd_cm_keys_name_the_crd_kinds_and_scripts_behave_the_same():
    cm = yaml.safe_load((ROOT / "argocd" / "argocd-cm.yaml").read_text())
    crd_kinds = {yaml.safe_load(p.read_text())["spec"]["names"]["kind"]
                 for p in (ROOT / "crds").glob("*.yaml")}
    expected = {f"resource.customizations.health.flywheel.dev_{kind}" for kind in KINDS}
    assert set(cm["data"]) == expected and set(KINDS) <= crd_kinds
    samples = {"FineTuneRun": run("Failed", message="boom"), "ModelVersion": model_version(),
               "Model": model([condition("Promoted", "False", "GatesFailed", "gate x")])}
    for kind, obj in samples.items():
        script = cm["data"][f"resource.customizations.health.flywheel.dev_{kind}"]
        assert script == (HEALTH / f"flywheel.dev_{kind}.lua").read_text()
        assert lua_health(kind, copy.deepcopy(obj), script) == lua_health(kind, obj)
