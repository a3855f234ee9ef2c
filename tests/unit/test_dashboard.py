"""The Grafana dashboard shipped with the chart: valid JSON, and every metric it queries is one
the operator exports (a renamed metric would leave a panel silently empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "charts/flywheel/dashboards/flywheel.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def exported_metrics() -> set[str]:
    """Every sample name the operator's /metrics can carry (counters as `_total`, histograms
    as `_bucket`/`_sum`/`_count`), from its own registry."""
    import flywheel_operator.metrics  # noqa: F401 (registers the operator's metrics)
    from prometheus_client import REGISTRY

    names = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum",
                    "_count", "_created"], "summary": ["_sum", "_count", "_created"]}
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana `label_values(metric, label)`)."""
    m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*,\s*\w+\s*\)\s*",
                     expr)
    if m:
        return {m.group(1)}
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:  # not a function call
            names.add(m.group(1))
    return names


def queries(dashboard: dict) -> list[str]:
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [t["expr"] for t in inner.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            found.append(q["query"] if isinstance(q, dict) else q)
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_metric_names_parser():
    assert metric_names('sum by (model) (increase(a_total{namespace=~"$ns"}[$__range]))') == \
        {"a_total"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))") == \
        {"h_bucket"}
    assert metric_names("sum(rate(x[1h])) * 3600 / on(run) y") == {"x", "y"}
    assert metric_names("label_values(flywheel_runs, phase)") == {"flywheel_runs"}


def test_dashboard_is_valid_and_queries_only_exported_metrics(dashboard):
    exported = exported_metrics()
    used = set()
    for expr in queries(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        used |= names
    assert used - exported == set(), f"not exported by the operator: {sorted(used - exported)}"
    assert {"flywheel_runs", "flywheel_gpu_hours_total", "flywheel_estimated_cost_total",
            "flywheel_run_progress_percent", "flywheel_run_tokens_per_second",
            "flywheel_run_eta_seconds", "flywheel_run_mfu", "flywheel_run_stalls_total"} <= used


def test_dashboard_panels(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Runs by phase", "Progress", "Throughput (tokens/s)",
            "GPU-hours per model (time range)", "Estimated cost per model (time range)"} <= titles
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
