"""Generated CRDs: no drift from the models, structural schemas, CEL rules where promised."""

from __future__ import annotations

import json

import pytest
import yaml
from flywheel_operator import crdgen

from .conftest_data import ROOT

GENERATED = crdgen.render_all()
CRDS = {name: yaml.safe_load(text) for name, text in GENERATED.items()}


@pytest.mark.parametrize("folder", crdgen.OUT_DIRS)
def test_committed_crds_match_models(folder):
    committed = {p.name: p.read_text() for p in (ROOT / folder).glob("*.y*ml")}
    assert set(committed) == set(crdgen.render_files()), f"{folder}: run `make crds`"
    for name, text in crdgen.render_files().items():
        assert committed[name] == text, f"{folder}/{name} drifted from the models: run `make crds`"


def test_chart_values_schema_is_generated_from_the_operator_config():
    from flywheel_operator.config import OperatorConfig

    committed = (ROOT / crdgen.VALUES_SCHEMA).read_text()
    assert committed == crdgen.render_values_schema(ROOT), "values.schema.json: run `make crds`"
    config = json.loads(committed)["properties"]["config"]
    # every OperatorConfig field but those the chart fills from its own values
    assert set(config["properties"]) == set(OperatorConfig.model_fields) - set(crdgen.CHART_SETS)


def _walk(node, path="$"):
    yield path, node
    for key in ("properties", "additionalProperties"):
        if isinstance(node.get(key), dict):
            if key == "properties":
                for name, child in node[key].items():
                    yield from _walk(child, f"{path}.{name}")
            else:
                yield from _walk(node[key], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


FORBIDDEN = {
    "$ref",
    "$defs",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "const",
    "title",
    "nullable",
    "discriminator",
    "prefixItems",
}


def _schema(crd):
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name", sorted(CRDS))
def test_schema_is_structural(name):
    for path, node in _walk(_schema(CRDS[name])):
        assert not FORBIDDEN & set(node), f"{path}: {FORBIDDEN & set(node)}"
        assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        assert "x-kubernetes-preserve-unknown-fields" not in node, f"{path}: free-form"
        if path.count(".") >= 2 and path != "$.metadata":
            assert node.get("description") or path.endswith(("[]", ".*")), f"{path}: no description"


@pytest.mark.parametrize("name", sorted(CRDS))
def test_strings_and_lists_are_bounded_where_cel_runs(name):
    """CEL cost estimation needs maxLength/maxItems/maxProperties on everything a rule sees."""
    for path, node in _walk(_schema(CRDS[name])):
        if not node.get("x-kubernetes-validations") or path.endswith(("$", ".spec")):
            continue
        if node["type"] == "string":
            assert "maxLength" in node, path
    for path, node in _walk(_schema(CRDS[name])):
        if node.get("type") == "array" and _has_rules_below(node["items"]):
            assert "maxItems" in node, path
        if (
            node.get("type") == "object"
            and isinstance(node.get("additionalProperties"), dict)
            and _has_rules_below(node["additionalProperties"])
        ):
            assert "maxProperties" in node, path


def _has_rules_below(node) -> bool:
    return any(n.get("x-kubernetes-validations") for _, n in _walk(node))


def test_names_columns_and_subresources():
    ftr = CRDS["finetuneruns.flywheel.dev.yaml"]["spec"]
    assert ftr["group"] == "flywheel.dev" and ftr["scope"] == "Namespaced"
    assert ftr["names"]["shortNames"] == ["ftr"] and ftr["names"]["categories"] == ["flywheel"]
    version = ftr["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    cols = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert cols == ["Phase", "Nodes", "GPUs", "Attempt", "Queue", "Progress", "ETA", "Age"]
    short = {
        n: CRDS[f"{p}.flywheel.dev.yaml"]["spec"]["names"]["shortNames"]
        for n, p in [("mv", "modelversions"), ("model", "models"), ("fts", "finetuneschedules")]
    }
    assert short == {"mv": ["mv"], "model": ["model"], "fts": ["fts"]}
    fts_cols = [
        c["name"]
        for c in CRDS["finetuneschedules.flywheel.dev.yaml"]["spec"]["versions"][0][
            "additionalPrinterColumns"
        ]
        if not c.get("priority")
    ]
    assert fts_cols == ["Schedule", "Last run", "Phase", "Next", "Age"]


def _spec(name):
    return _schema(CRDS[name])["properties"]["spec"]


def _rules(node):
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_run_immutability_rules():
    spec = _spec("finetuneruns.flywheel.dev.yaml")
    for field in ("baseModel", "modelName", "dataset", "resources", "output"):
        assert "self == oldSelf" in _rules(spec["properties"][field]), field
    for field in ("suspend", "maxRestarts", "hyperparameters", "tracking"):
        assert "self == oldSelf" not in _rules(spec["properties"][field]), field
    # The schedule's template uses the same spec schema but stays editable.
    template = _spec("finetuneschedules.flywheel.dev.yaml")["properties"]["runTemplate"]
    for field in ("baseModel", "dataset", "resources"):
        assert "self == oldSelf" not in _rules(template["properties"]["spec"]["properties"][field])
    assert _rules(_spec("modelversions.flywheel.dev.yaml")) == ["self == oldSelf"]


def test_uri_and_secret_rules_in_place():
    props = _spec("finetuneruns.flywheel.dev.yaml")["properties"]
    for node in (
        props["baseModel"],
        props["dataset"]["properties"]["train"],
        props["dataset"]["properties"]["eval"],
        props["output"]["properties"]["uri"],
        props["checkpoint"]["properties"]["uri"],
    ):
        rules = " ".join(_rules(node))
        assert "self.matches(r'^(" in rules and "contains('?')" in rules
    comet = props["tracking"]["properties"]["comet"]["properties"]
    for field in ("workspace", "project"):
        assert any("SECRET" not in r and "sk-" in r for r in _rules(comet[field]))
    assert set(comet) == {"workspace", "project", "apiKeySecretRef"}
    assert "hf://" in " ".join(_rules(props["baseModel"]))
    assert "hf://" not in " ".join(_rules(props["output"]["properties"]["uri"]))


def test_defaults_fill_nested_objects():
    props = _spec("finetuneruns.flywheel.dev.yaml")["properties"]
    for field in ("hyperparameters", "resources", "fsdp", "checkpoint", "tracking", "preflight"):
        assert props[field]["default"] == {}, field
    assert props["resources"]["properties"]["gpusPerNode"]["maximum"] == 8
    assert props["fsdp"]["properties"]["activationCheckpointing"]["enum"] == [
        "none",
        "selective",
        "full",
    ]


def test_metrics_are_number_maps():
    mv = _spec("modelversions.flywheel.dev.yaml")["properties"]
    assert mv["metrics"] == {
        **mv["metrics"],
        "type": "object",
        "additionalProperties": {"type": "number"},
    }


def test_crdgen_writes_both_folders(tmp_path):
    (tmp_path / crdgen.VALUES_SCHEMA).parent.mkdir(parents=True)
    (tmp_path / crdgen.VALUES_SCHEMA).write_text((ROOT / crdgen.VALUES_SCHEMA).read_text())
    written = crdgen.write(tmp_path)
    assert len(written) == 2 * (len(crdgen.KINDS) + 1) + 1  # and the chart's values schema
    for folder in crdgen.OUT_DIRS:
        for name, text in crdgen.render_files().items():
            assert (tmp_path / folder / name).read_text() == text


def test_kopf_peering_crds_ship_with_ours():
    """`kubectl apply -f crds/` then `helm install --skip-crds`: the chart's peering object
    needs kopf's CRDs in crds/ too."""
    docs = list(yaml.safe_load_all(crdgen.render_files()[crdgen.PEERING_FILE]))
    assert {(d["metadata"]["name"], d["spec"]["names"]["kind"], d["spec"]["scope"])
            for d in docs} == {("clusterkopfpeerings.kopf.dev", "ClusterKopfPeering", "Cluster"),
                               ("kopfpeerings.kopf.dev", "KopfPeering", "Namespaced")}
