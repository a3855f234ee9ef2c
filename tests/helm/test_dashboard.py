"""The chart ships the Grafana dashboard as a labelled ConfigMap, off by default."""

from __future__ import annotations

import json

from .support import CHART, find, one, render


def test_dashboard_configmap_is_off_by_default_and_carries_the_sidecar_label():
    assert not [c for c in find(render(), "ConfigMap") if c["metadata"]["name"].endswith(
        "-dashboard")]
    objs = render({"metrics": {"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring",
        "annotations": {"grafana_folder": "Flywheel"}}}})
    cm = one(objs, "ConfigMap", "fw-flywheel-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Flywheel"}
    shipped = json.loads(cm["data"]["flywheel.json"])
    assert shipped == json.loads((CHART / "dashboards" / "flywheel.json").read_text())
