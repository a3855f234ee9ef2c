"""The admin's policy (policy.py): images, pools per namespace, Secrets and ServiceAccount, run
size, the pool boundary; and a refused run failing at once with PolicyDenied (lifecycle)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from flywheel_operator import policy
from flywheel_operator.api import FineTuneRunStatus, Run
from flywheel_operator.config import OperatorConfig
from flywheel_operator.lifecycle import decide
from pydantic import ValidationError

from .conftest_data import make_run

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DEFAULT = "ghcr.io/flywheel-dev/flywheel-trainer:0.1.0"
DIGEST = "sha256:" + "0" * 64


def config(**policy_fields) -> OperatorConfig:
    return OperatorConfig.model_validate({"policy": policy_fields})


def denials(run: Run, cfg: OperatorConfig) -> list[str]:
    return policy.denials(run.spec, run.namespace, cfg)


def refused(run: Run, cfg: OperatorConfig) -> FineTuneRunStatus:
    """The run's status after its first reconcile."""
    return decide(run, [], [], NOW, cfg).status


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "entry", "matches"), [
    ("registry.acme.dev/ml/trainer:1", "registry.acme.dev/", True),
    ("registry.acme.dev.evil.io/trainer:1", "registry.acme.dev/", False),
    ("ghcr.io/acme/trainer:2", "ghcr.io/acme/trainer", True),
    ("ghcr.io/acme/trainer@" + DIGEST, "ghcr.io/acme/trainer", True),
    ("ghcr.io/acme/trainer", "ghcr.io/acme/trainer", True),
    ("ghcr.io/acme/trainer-evil:2", "ghcr.io/acme/trainer", False),
    ("ghcr.io/acme/trainer/sub:2", "ghcr.io/acme/trainer", False),
])
def test_an_entry_is_a_prefix_folder_or_exactly_one_repository(image, entry, matches):
    assert policy.image_matches(image, entry) is matches


def test_images_outside_the_allowlist_are_denied_naming_rule_and_field():
    cfg = config(allowedImages=["registry.acme.dev/"])
    assert denials(make_run(image="registry.acme.dev/ml/trainer:1"), cfg) == []
    assert denials(make_run(), cfg) == []  # no image: the default
    assert denials(make_run(image=DEFAULT), cfg) == []  # the default is always allowed
    (why,) = denials(make_run(image="docker.io/evil/miner:latest"), cfg)
    assert why.startswith("policy.allowedImages: spec.image 'docker.io/evil/miner:latest'")
    assert "registry.acme.dev/" in why and DEFAULT in why
    # Unset: any image; []: only the default.
    assert denials(make_run(image="docker.io/evil/miner:latest"), config()) == []
    assert denials(make_run(image="registry.acme.dev/t:1"), config(allowedImages=[]))


def test_digest_pinning():
    cfg = config(allowedImages=["registry.acme.dev/"], requireImageDigest=True)
    assert denials(make_run(image=f"registry.acme.dev/t@{DIGEST}"), cfg) == []
    (why,) = denials(make_run(image="registry.acme.dev/t:1"), cfg)
    assert why.startswith("policy.requireImageDigest: spec.image")
    assert denials(make_run(), cfg) == []  # the admin's own default image


# --- pools ------------------------------------------------------------------------------------


def test_namespace_pools_with_a_wildcard():
    cfg = config(namespacePools={"team-a": ["h200", "cpu"], "*": ["cpu"]})
    assert policy.allowed_pools(cfg, "team-a") == ["cpu", "h200"]
    assert policy.allowed_pools(cfg, "other") == ["cpu"]
    assert policy.allowed_pools(config(), "any") == ["cpu", "h200", "local"]
    assert policy.allowed_pools(config(namespacePools={"team-a": ["cpu"]}), "b") == [
        "cpu", "h200", "local"]  # not listed, no '*': every pool
    run = make_run(namespace="other", resources={"nodePool": "h200"})
    (why,) = denials(run, cfg)
    assert why == ("policy.namespacePools: spec.resources.nodePool: namespace other may not "
                   "use pool h200; it may use: cpu")
    # The default pool (h200) counts as asked for.
    (why,) = denials(make_run(namespace="other"), cfg)
    assert "spec.resources.nodePool (empty: the default pool h200)" in why


def test_namespace_pools_must_name_known_pools():
    with pytest.raises(ValidationError, match=r"policy.namespacePools.team-a: unknown pool"):
        config(namespacePools={"team-a": ["a100"]})


def test_an_unknown_pool_fails_at_once_naming_the_pools_the_namespace_may_use():
    cfg = config(namespacePools={"ml": ["cpu", "local"]})
    status = refused(make_run(resources={"nodePool": "a100"}), cfg)
    assert status.phase == "Failed"
    (failed,) = [c for c in status.conditions if c.type == "Failed"]
    assert failed.reason == "InvalidSpec"
    assert failed.message == ("spec.resources.nodePool: unknown node pool 'a100'; pools "
                              "namespace ml may use: cpu, local")


# --- the pool boundary ------------------------------------------------------------------------


def test_a_run_may_narrow_its_pool_never_leave_it():
    cfg = config()
    ok = make_run(resources={"nodePool": "cpu", "nodeSelector": {"zone": "a"},
                             "tolerations": [{"key": "dedicated", "operator": "Equal",
                                              "value": "ml", "effect": "NoSchedule"}]})
    assert denials(ok, cfg) == []
    escape = make_run(resources={
        "nodePool": "cpu", "nodeSelector": {"flywheel.dev/pool": "h200"},
        "tolerations": [{"operator": "Exists"},
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    found = denials(escape, cfg)
    assert len(found) == 3, found
    assert found[0].startswith("pool boundary: spec.resources.nodeSelector['flywheel.dev/pool'] "
                               "is 'h200' but pool cpu selects flywheel.dev/pool=cpu")
    assert "spec.resources.tolerations[0] tolerates every taint" in found[1]
    assert "spec.resources.tolerations[1] tolerates nvidia.com/gpu" in found[2]
    # Even the GPU pool's own taint comes from the pool only, never from the run.
    gpu = make_run(resources={"nodePool": "h200", "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists"}]})
    assert "tolerations[0] tolerates nvidia.com/gpu" in denials(gpu, cfg)[0]


def test_scheduling_keeps_the_pool_whatever_the_run_asks():
    cfg = config()
    spec = make_run(resources={
        "nodePool": "cpu", "nodeSelector": {"flywheel.dev/pool": "h200", "zone": "a"},
        "tolerations": [{"operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Exists"},
                        {"key": "dedicated", "operator": "Exists"}]}).spec
    selector, tolerations = policy.scheduling(cfg.pools["cpu"], spec, cfg.pools)
    assert selector == {"flywheel.dev/pool": "cpu", "zone": "a"}
    assert tolerations == [{"key": "dedicated", "operator": "Exists"}]


# --- credentials and size ---------------------------------------------------------------------


def test_runs_without_secrets_of_their_own():
    cfg = OperatorConfig.model_validate({
        "storage": {"s3": {"endpoint": "https://minio.storage:9000", "credentialsSecret": "s3"},
                    "hf": {"tokenSecretRef": {"name": "hub", "key": "token"}}},
        "policy": {"allowRunSecrets": False, "allowedSecrets": ["comet"],
                   "allowRunServiceAccount": False}})
    comet = {"comet": {"workspace": "w", "project": "p",
                       "apiKeySecretRef": {"name": "comet", "key": "k"}}}
    ok = make_run(tracking=comet, storage={"s3": {"credentialsSecret": "s3"},
                                           "hf": {"tokenSecretRef": {"name": "hub", "key": "t"}}})
    assert denials(ok, cfg) == []
    bad = make_run(
        tracking={"comet": {**comet["comet"], "apiKeySecretRef": {"name": "ops", "key": "k"}}},
        storage={"s3": {"credentialsSecret": "prod-keys", "endpoint": "https://evil.io"},
                 "gcs": {"keySecretRef": {"name": "gcp", "key": "k"}},
                 "hf": {"tokenSecretRef": {"name": "other", "key": "t"}},
                 "serviceAccountName": "admin-sa"})
    found = denials(bad, cfg)
    fields = ["spec.storage.s3.credentialsSecret names Secret 'prod-keys'",
              "spec.storage.gcs.keySecretRef names Secret 'gcp'",
              "spec.storage.hf.tokenSecretRef names Secret 'other'",
              "spec.tracking.comet.apiKeySecretRef names Secret 'ops'",
              "spec.storage.s3.endpoint 'https://evil.io'",
              "policy.allowRunServiceAccount: spec.storage.serviceAccountName 'admin-sa'"]
    assert len(found) == len(fields), found
    for why, field in zip(found, fields, strict=True):
        assert field in why, (why, field)
    assert "only use the operator config's Secrets and comet, hub, s3" in found[0]
    # Allowed by default.
    assert denials(bad, OperatorConfig(storage=cfg.storage)) == []


def test_size_limits_count_gpus_on_gpu_pools_only():
    cfg = config(maxNodes=4, maxGpusPerRun=16)
    assert denials(make_run(resources={"nodes": 2, "gpusPerNode": 8}), cfg) == []
    (why,) = denials(make_run(resources={"nodes": 3, "gpusPerNode": 8}), cfg)
    assert why == ("policy.maxGpusPerRun: spec.resources.nodes x gpusPerNode is 24 GPUs, more "
                   "than 16")
    assert denials(make_run(resources={"nodes": 4, "gpusPerNode": 8, "nodePool": "cpu"}), cfg) == []
    (why,) = denials(make_run(resources={"nodes": 5, "gpusPerNode": 1, "nodePool": "cpu"}), cfg)
    assert why == "policy.maxNodes: spec.resources.nodes is 5, more than 4"


# --- the refusal ------------------------------------------------------------------------------


def test_a_refused_run_fails_at_once_with_policy_denied_and_creates_nothing():
    cfg = config(allowedImages=["registry.acme.dev/"], maxNodes=2)
    run = make_run(image="docker.io/x/y:1", resources={"nodes": 4, "gpusPerNode": 8})
    plan = decide(run, [], [], NOW, cfg)
    assert plan.status.phase == "Failed" and plan.status.completionTime
    assert not plan.create_attempt and not plan.create_preflight
    (failed,) = [c for c in plan.status.conditions if c.type == "Failed"]
    assert failed.reason == "PolicyDenied"
    assert failed.message.startswith("refused by the operator's policy: policy.allowedImages: "
                                     "spec.image 'docker.io/x/y:1'")
    assert "; policy.maxNodes: spec.resources.nodes is 4, more than 2" in failed.message
    assert plan.events == [("Warning", "PolicyDenied", failed.message)]
    # A run within the policy starts (preflight first).
    plan = decide(make_run(image="registry.acme.dev/t:1"), [], [], NOW, cfg)
    assert plan.create_preflight and plan.status.phase == "Pending"
