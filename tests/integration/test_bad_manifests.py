"""The API server rejects every bad manifest, and its message names the field.

Each file in bad_manifests/ starts with `# expect: <substring of the server's error>`.
Manifests are applied with server-side dry-run, so nothing is created.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BAD = sorted((HERE / "bad_manifests").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("finetunerun*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    return first.removeprefix("# expect: ").strip()


def dry_run(cluster, text: str, namespace: str = "default"):
    return cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=text,
        check=False,
    )


def test_corpus_is_well_formed():
    assert len(BAD) >= 18
    kinds = set()
    for path in BAD:
        assert expected(path)
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "flywheel.dev/v1alpha1"
        kinds.add(doc["kind"])
    assert kinds == {"FineTuneRun", "ModelVersion", "Model", "FineTuneSchedule"}


@pytest.mark.cluster
@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_manifest_is_rejected(cluster, crds, path):
    proc = dry_run(cluster, path.read_text())
    assert proc.returncode != 0, f"{path.name} was accepted:\n{proc.stdout}"
    assert expected(path) in proc.stderr, proc.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted(cluster, crds, path):
    proc = dry_run(cluster, path.read_text())
    assert proc.returncode == 0, proc.stderr


IMMUTABLE_CHANGES = [
    ("baseModel", lambda s: s.update(baseModel="hf://Qwen/Qwen3-8B")),
    ("modelName", lambda s: s.update(modelName="other-agent")),
    ("dataset", lambda s: s["dataset"].update(train="s3://data/flow/2026-w49/train.jsonl")),
    ("resources", lambda s: s["resources"].update(nodeSelector={"zone": "a"})),
    ("output", lambda s: s["output"].update(uri="s3://models/elsewhere/")),
]


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("field", "change"), IMMUTABLE_CHANGES, ids=[c[0] for c in IMMUTABLE_CHANGES]
)
def test_run_fields_are_immutable(cluster, crds, namespace, field, change):
    run = yaml.safe_load(EXAMPLES[0].read_text())
    run["spec"]["suspend"] = True  # nothing should run for this test
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(run))
    changed = yaml.safe_load(yaml.safe_dump(run))
    change(changed["spec"])
    proc = dry_run(cluster, yaml.safe_dump(changed), namespace)
    assert proc.returncode != 0, f"changing spec.{field} was accepted"
    assert f"spec.{field}" in proc.stderr and "immutable" in proc.stderr, proc.stderr
    # Fields outside the immutable set stay editable.
    editable = yaml.safe_load(yaml.safe_dump(run))
    editable["spec"].update(maxRestarts=5, suspend=False)
    proc = dry_run(cluster, yaml.safe_dump(editable), namespace)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.cluster
def test_model_version_spec_is_immutable(cluster, crds, namespace):
    mv = {
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": "flow-agent-v1", "labels": {"flywheel.dev/model": "flow-agent"}},
        "spec": {
            "modelName": "flow-agent",
            "version": 1,
            "artifact": {"uri": "s3://models/flow-agent/v1/", "digest": "sha256:" + "a" * 64},
            "baseModel": "hf://Qwen/Qwen3-32B",
            "sourceRun": {"name": "r", "uid": "u"},
            "dataset": {"train": "s3://data/flow/train.jsonl"},
            "metrics": {"eval_loss": 1.5, "tool_call_accuracy/email": 0.9},
        },
    }
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(mv))
    mv["spec"]["metrics"]["eval_loss"] = 0.1
    proc = dry_run(cluster, yaml.safe_dump(mv), namespace)
    assert proc.returncode != 0 and "immutable" in proc.stderr, proc.stderr


@pytest.mark.cluster
def test_defaults_are_applied(cluster, crds):
    proc = cluster.kubectl(
        "create",
        "--dry-run=server",
        "-o",
        "yaml",
        "-n",
        "default",
        "-f",
        "-",
        input=re.sub(r"(?m)^  maxRestarts: .*\n", "", EXAMPLES[0].read_text()),
    )
    spec = yaml.safe_load(proc.stdout)["spec"]
    assert spec["maxRestarts"] == 3 and spec["preflight"] == {"enabled": True}
    assert spec["fsdp"]["compile"] is False and spec["checkpoint"]["keep"] == 2
