"""What the operator's watches cost per event: kopf watches neither the runs nor their Jobs
and Pods (watches.py does, the children by the runs' label), kopf keeps no diff base, and an
index entry shares the event's values, without managedFields (pure parts, no cluster)."""

from __future__ import annotations

import kopf
from flywheel_operator import handlers, objects, watches
from flywheel_operator.vocab import RUN_LABEL, SCHEDULE_LABEL


def test_kopf_watches_no_run_job_pod_or_model_and_keeps_no_diff_base():
    """The runs, their Jobs and Pods and the Models are watched off kopf (watches.py): kopf's
    per-event machinery runs for the schedules (and Kueue's Workloads) only."""
    registry = kopf.get_default_registry()
    watched = {h.selector.any_name for reg in (registry._indexing, registry._watching)
               for h in reg.get_all_handlers()}
    assert "finetuneschedules" in watched and watched <= {"finetuneschedules", "workloads"}
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
    woken: list = []
    index = watches.ByRun(objects.pod_summary, woken.append)
    watch = watches.Watch(index, "v1", "Pod", None, RUN_LABEL)
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
def run_body(name: str, uid: str, schedule: str | None = None, ns: str = "team") -> dict:
    labels = {SCHEDULE_LABEL: schedule} if schedule else {}
    return {"apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneRun",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                         "resourceVersion": "7", "managedFields": [{"manager": "kubectl"}] * 50},
            "spec": {"modelName": "agent"}, "status": {"phase": "Running"}}


def test_a_runs_index_entry_drops_managed_fields_and_copies_nothing_else():
    raw = run_body("r", "u1")
    entry = watches.slim(raw)
    assert "managedFields" not in entry["metadata"] and entry["metadata"]["name"] == "r"
    assert entry["spec"] is raw["spec"] and entry["status"] is raw["status"]
    assert "managedFields" in raw["metadata"]  # the event itself is left as it came


def test_the_runs_index_reports_each_change_and_groups_a_schedules_runs():
    seen: list = []
    runs = watches.ByName(watches.slim, lambda *event: seen.append(event), SCHEDULE_LABEL)
    watch = watches.Watch(runs, "flywheel.dev/v1alpha1", "FineTuneRun", None)
    watch.apply("ADDED", run_body("a", "u1", schedule="weekly"))
    watch.apply("ADDED", run_body("b", "u2", schedule="weekly"))
    watch.apply("ADDED", run_body("c", "u3"))
    assert [e[:2] for e in seen] == [("ADDED", ("team", n)) for n in "abc"]
    assert [r["metadata"]["name"] for r in runs.get(("team", "a"))] == ["a"]
    assert sorted(r["metadata"]["name"] for r in runs.group.get(("team", "weekly"))) == [
        "a", "b"]
    # a run deleted: reported with what it was (its model and schedule), gone from its group
    watch.apply("DELETED", run_body("a", "u1", schedule="weekly"))
    assert seen[-1][0] == "DELETED" and seen[-1][2]["spec"]["modelName"] == "agent"
    assert ("team", "a") not in runs and len(runs) == 2
    assert [r["metadata"]["name"] for r in runs.group.get(("team", "weekly"))] == ["b"]
    # applied again under the same name (a new uid) while the delete went by unseen
    watch.apply("ADDED", run_body("b", "u9"))
    assert runs.get(("team", "b"))[0]["metadata"]["uid"] == "u9"
    assert runs.group.get(("team", "weekly"), None) is None
    # a fresh list that no longer has a run: it is reported deleted
    seen.clear()
    runs.forget(None, {"u9"})
    assert [e[:2] for e in seen] == [("DELETED", ("team", "c"))] and list(runs) == [
        ("team", "b")]


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
