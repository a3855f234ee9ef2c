"""Operator configuration: built-in presets, YAML loading, env var."""

from __future__ import annotations

import pytest
from flywheel_operator.config import ENV_VAR, OperatorConfig, load_config
from pydantic import ValidationError


def test_builtin_defaults(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    config = load_config()
    assert config.defaultPool == "h200" and config.preflightPool == "cpu"
    h200 = config.pool(None)
    assert h200.gpusPerNode == 8 and h200.nodeSelector == {"flywheel.dev/pool": "h200"}
    assert [t.model_dump(exclude_none=True) for t in h200.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert config.pool("cpu").gpusPerNode == 0
    local = config.pool("local")
    assert local.nodeSelector == {"flywheel.dev/executor": "local"} and local.gpusPerNode >= 1


def test_load_from_file_merges_presets(tmp_path, monkeypatch):
    path = tmp_path / "operator.yaml"
    path.write_text(
        "defaultImage: example.com/trainer:dev\n"
        "preflightPool: local\n"
        "pools:\n"
        "  h100:\n"
        "    nodeSelector: {flywheel.dev/pool: h100}\n"
        "    gpusPerNode: 8\n"
        "    gpuHourPrice: 2.5\n"
        "    resources: {cpu: '32', memory: 256Gi}\n"
    )
    monkeypatch.setenv(ENV_VAR, str(path))
    config = load_config()
    assert config.defaultImage == "example.com/trainer:dev"
    assert config.preflightPool == "local"
    assert config.pool("h100").resources.memory == "256Gi"
    assert {"h200", "cpu", "local", "h100"} <= set(config.pools)
    assert load_config(path) == config


def test_unknown_pool_is_named():
    with pytest.raises(ValidationError, match="defaultPool"):
        OperatorConfig(defaultPool="a100")
    with pytest.raises(KeyError, match="a100.*known pools: cpu, h200, local"):
        OperatorConfig().pool("a100")


def test_unknown_keys_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pools: {h200: {gpus: 8}}\n")
    with pytest.raises(ValidationError, match="gpus"):
        load_config(path)


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path) == OperatorConfig()
