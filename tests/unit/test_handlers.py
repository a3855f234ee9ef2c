"""What the operator's watches cost per event: only the runs' own Jobs and Pods are sent by the
apiserver, kopf keeps no diff base, and an index entry shares the event's values, without
managedFields (pure parts, no cluster)."""

from __future__ import annotations

import asyncio

import kopf
from flywheel_operator import children, handlers, objects
from flywheel_operator.vocab import RUN_LABEL
from kopf._cogs.structs.references import Resource


def resource(group: str, plural: str, kind: str) -> Resource:
    return Resource(group=group, version="v1", plural=plural, kind=kind,
                    singular=kind.lower(), namespaced=True)


def test_kopf_watches_no_job_or_pod_and_keeps_no_diff_base():
    """The runs' Jobs and Pods are watched off kopf (children.py): kopf's per-event machinery
    runs for the runs, Models and schedules only, and builds no diff base for them."""
    registry = kopf.get_default_registry()
    watched = {h.selector.any_name for reg in (registry._indexing, registry._watching)
               for h in reg.get_all_handlers()}
    assert "pods" not in watched and "jobs" not in watched and "finetuneruns" in watched
    settings, memo = kopf.OperatorSettings(), kopf.Memo(metrics_port=0)
    handlers.configure(settings=settings, memo=memo)
    body = kopf.Body({"metadata": {"name": "r", "annotations": {"a": "b"}}, "spec": {"x": 1}})
    assert settings.persistence.diffbase_storage.build(body=body) == {}
    assert settings.persistence.diffbase_storage.fetch(body=body) is None


def pod(name: str, uid: str, run: str | None, ns: str = "team", phase: str = "Running") -> dict:
    labels = {RUN_LABEL: run} if run else {}
    return {"metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                         "resourceVersion": "1"}, "status": {"phase": phase}}


def test_a_childs_events_keep_its_runs_index_and_wake_the_run():
    index, woken = children.Index(), []
    watch = children.Watch(index, "v1", "Pod", None, objects.pod_summary, woken.append)
    watch.apply("ADDED", pod("a-0", "u0", "a"))
    watch.apply("ADDED", pod("a-1", "u1", "a", phase="Pending"))
    watch.apply("MODIFIED", pod("a-1", "u1", "a"))
    assert sorted(p.name for p in index.get(("team", "a"))) == ["a-0", "a-1"]
    assert {p.phase for p in index.get(("team", "a"))} == {"Running"}
    assert index.run_of("team", "a-1") == ("team", "a") and ("team", "a") in index
    watch.apply("DELETED", pod("a-0", "u0", "a"))
    assert [p.name for p in index.get(("team", "a"))] == ["a-1"]
    # its label changed by hand: it leaves the first run (woken too) for the other
    woken.clear()
    watch.apply("MODIFIED", pod("a-1", "u1", "b"))
    assert index.get(("team", "a"), None) is None and len(index) == 1
    assert set(woken) == {("team", "a"), ("team", "b")}
    watch.apply("MODIFIED", pod("a-1", "u1", None))  # no label: no run's any more
    assert len(index) == 0 and index.run_of("team", "a-1") is None
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
