"""What the operator's watches cost per event: only the runs' own Jobs and Pods are sent by the
apiserver, kopf keeps no diff base, and an index entry shares the event's values, without
managedFields (pure parts, no cluster)."""

from __future__ import annotations

import asyncio

import kopf
from flywheel_operator import handlers
from flywheel_operator.vocab import RUN_LABEL
from kopf._cogs.structs.references import Resource


def resource(group: str, plural: str, kind: str) -> Resource:
    return Resource(group=group, version="v1", plural=plural, kind=kind,
                    singular=kind.lower(), namespaced=True)


def test_jobs_and_pods_are_watched_by_the_runs_label_only():
    settings, memo = kopf.OperatorSettings(), kopf.Memo(metrics_port=0)
    handlers.configure(settings=settings, memo=memo)
    selectors = settings.watching.label_selectors
    assert list(selectors.collect(resource("", "pods", "Pod"))) == [RUN_LABEL]
    assert list(selectors.collect(resource("batch", "jobs", "Job"))) == [RUN_LABEL]
    # a run, a Model or a Workload is watched whole
    assert list(selectors.collect(resource("flywheel.dev", "finetuneruns", "FineTuneRun"))) == []
    # no diff base: kopf neither copies nor diffs an object per event
    body = kopf.Body({"metadata": {"name": "r", "annotations": {"a": "b"}}, "spec": {"x": 1}})
    assert settings.persistence.diffbase_storage.build(body=body) == {}
    assert settings.persistence.diffbase_storage.fetch(body=body) is None


def test_a_runs_index_entry_drops_managed_fields_and_copies_nothing_else():
    raw = {"apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneRun",
           "metadata": {"name": "r", "namespace": "ns", "resourceVersion": "7",
                        "managedFields": [{"manager": "kubectl"}] * 50},
           "spec": {"modelName": "agent"}, "status": {"phase": "Running"}}
    (entry,) = asyncio.run(handlers.runs(namespace="ns", name="r", body=kopf.Body(raw))).values()
    assert "managedFields" not in entry["metadata"] and entry["metadata"]["name"] == "r"
    assert entry["spec"] is raw["spec"] and entry["status"] is raw["status"]
    assert "managedFields" in raw["metadata"]  # the event itself is left as it came


def test_a_metrics_scrape_reads_the_runs_while_the_event_loop_changes_the_index():
    """kopf's event loop updates the runs index while Prometheus scrapes from the metrics
    server's thread; a scrape counts the runs it saw, never fails with a 500."""
    from collections.abc import Mapping

    from flywheel_operator import metrics

    def run(name: str, phase: str) -> dict:
        return {"metadata": {"namespace": "team", "name": name}, "spec": {"modelName": "m"},
                "status": {"phase": phase}}

    class Changing(Mapping):  # a run arrives between any two reads of the index
        def __init__(self) -> None:
            self.runs = {("team", f"r{i}"): [run(f"r{i}", "Running")] for i in range(3)}

        def __iter__(self):
            return iter(self.runs)

        def __len__(self) -> int:
            return len(self.runs)

        def __getitem__(self, key):
            self.runs[("team", f"new{len(self.runs)}")] = [run("new", "Pending")]
            return self.runs[key]

    collector = metrics._RunsByPhase()
    collector.index = Changing()
    phases = {s.labels["phase"]: s.value for s in next(iter(collector.collect())).samples}
    assert phases["Running"] == 3 and phases["Pending"] == 0
