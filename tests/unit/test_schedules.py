"""FineTuneSchedule computation: cron, CronJob missed-tick semantics, concurrency, placeholders,
names, rendering, history and status. Pure functions, no cluster."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import pytest
from flywheel_operator import cron as c
from flywheel_operator import schedules as s
from flywheel_operator import vocab
from flywheel_operator.api import FineTuneRun, FineTuneScheduleSpec, FineTuneScheduleStatus

from .conftest_data import minimal_spec


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def spec(**over) -> dict:
    body = {
        "schedule": "0 3 * * 1",
        "concurrencyPolicy": "Forbid",
        "suspend": False,
        "successfulRunsHistoryLimit": 3,
        "failedRunsHistoryLimit": 1,
        "runTemplate": {"spec": minimal_spec()},
    }
    body.update(over)
    return body


def schedule(name="weekly", status=None, annotations=None, **over) -> dict:
    return {
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": "0a1b2c3d-0000-4000-8000-000000000001",
            "generation": 2,
            "creationTimestamp": "2026-11-01T00:00:00Z",
            "annotations": annotations or {},
        },
        "spec": spec(**over),
        "status": status or {},
    }


def run(name, phase=None, at=None, cost=None, deleting=False) -> dict:
    meta = {"name": name, "labels": {vocab.SCHEDULE_LABEL: "weekly"}, "annotations": {}}
    if at is not None:
        meta["annotations"][vocab.SCHEDULED_AT_ANNOTATION] = vocab.format_time(at)
    if deleting:
        meta["deletionTimestamp"] = "2026-11-26T00:00:00Z"
    status = {}
    if phase:
        status["phase"] = phase
    if cost is not None:
        status["estimatedCost"] = cost
    return {"metadata": meta, "spec": minimal_spec(), "status": status}


# --------------------------------------------------------------------------------------------
# next_time


def test_next_time_utc_and_strictly_after():
    # 2026-11-26 is a Thursday; `0 3 * * 1` is Monday 03:00.
    assert c.next_time("0 3 * * 1", None, utc(2026, 11, 26, 12)) == utc(2026, 11, 30, 3)
    assert c.next_time("0 3 * * 1", "UTC", utc(2026, 11, 30, 3)) == utc(2026, 12, 7, 3)
    assert c.next_time("*/15 * * * *", None, utc(2026, 1, 1, 0, 0, 30)) == utc(2026, 1, 1, 0, 15)
    assert c.next_time("@weekly", None, utc(2026, 11, 26)) == utc(2026, 11, 29)
    t = c.next_time("0 3 * * 1", None, utc(2026, 11, 26))
    assert t.tzinfo is not None and t.utcoffset() == timedelta(0)


def test_next_time_time_zone():
    # Berlin: CET (UTC+1) in winter, CEST (UTC+2) in summer.
    assert c.next_time("0 3 * * *", "Europe/Berlin", utc(2026, 11, 26, 12)) == utc(2026, 11, 27, 2)
    assert c.next_time("0 3 * * *", "Europe/Berlin", utc(2026, 7, 1, 12)) == utc(2026, 7, 2, 1)
    assert c.next_time("0 9 * * *", "America/New_York", utc(2026, 1, 5)) == utc(2026, 1, 5, 14)
    # A naive `after` is taken as UTC.
    assert c.next_time("0 3 * * *", "Europe/Berlin", datetime(2026, 11, 26, 12)) == utc(
        2026, 11, 27, 2
    )


def _ticks(expr, tz, start, n):
    out, t = [], start
    for _ in range(n):
        t = c.next_time(expr, tz, t)
        out.append(t)
    return out


def test_dst_spring_forward_and_fall_back():
    berlin = "Europe/Berlin"
    # 03:00 daily keeps its wall-clock time across both changes (02:00 / 01:00 UTC).
    spring = _ticks("0 3 * * *", berlin, utc(2026, 3, 27, 12), 3)
    assert spring == [utc(2026, 3, 28, 2), utc(2026, 3, 29, 1), utc(2026, 3, 30, 1)]
    autumn = _ticks("0 3 * * *", berlin, utc(2026, 10, 24, 12), 3)
    assert autumn == [utc(2026, 10, 25, 2), utc(2026, 10, 26, 2), utc(2026, 10, 27, 2)]
    # 02:30 does not exist on 2026-03-29 in Berlin: skipped that day, like CronJob.
    gap = _ticks("30 2 * * *", berlin, utc(2026, 3, 27, 12), 3)
    assert gap == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]
    # 02:30 happens twice on 2026-10-25: it runs at both instants, like CronJob.
    twice = _ticks("30 2 * * *", berlin, utc(2026, 10, 24, 12), 3)
    assert twice == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30), utc(2026, 10, 26, 1, 30)]
    # Hourly across both days: strictly increasing, exactly one hour apart in real time.
    for start in (utc(2026, 3, 28, 20), utc(2026, 10, 24, 20)):
        hourly = _ticks("0 * * * *", berlin, start, 12)
        assert all(b - a == timedelta(hours=1) for a, b in zip(hourly, hourly[1:], strict=False))


@pytest.mark.parametrize(
    ("expr", "tz", "needle"),
    [
        ("0 3 * *", None, "spec.schedule"),
        ("61 * * * *", None, "spec.schedule"),
        ("0 0 * * 7", None, "spec.schedule"),
        ("0 0 L * *", None, "spec.schedule"),
        ("0 0 * * 1#2", None, "spec.schedule"),
        ("0 0 * * * *", None, "spec.schedule"),
        ("@every 1h", None, "spec.schedule"),
        ("CRON_TZ=UTC 0 0 * * *", None, "spec.schedule"),
        ("0 0 30 2 *", None, "never matches"),
        ("0 3 * * 1", "Mars/Olympus", "spec.timeZone"),
    ],
)
def test_invalid_schedules_name_the_field(expr, tz, needle):
    with pytest.raises(ValueError, match=needle):
        c.next_time(expr, tz, utc(2026, 1, 1))


def test_valid_schedule_forms():
    for expr in ("0 3 * * 1", "*/5 1-5 ? JAN-Jun mon-fri", "0 0 1,15 * *", "@daily", "@hourly"):
        c.validate_schedule(expr, "Europe/Berlin")


# --------------------------------------------------------------------------------------------
# due: CronJob semantics

CREATED = utc(2026, 11, 1)  # a Sunday


def test_nothing_due_before_first_tick():
    d = c.due(spec(), {}, CREATED, utc(2026, 11, 1, 12))
    assert d.scheduled_time is None and not d.missed_too_late and d.warning is None
    assert d.next_time == utc(2026, 11, 2, 3)
    assert d.requeue_after == pytest.approx(15 * 3600 + 0.1)


def test_due_at_and_after_tick_then_done():
    d = c.due(spec(), {}, CREATED, utc(2026, 11, 2, 3))
    assert d.scheduled_time == utc(2026, 11, 2, 3)
    assert d.next_time == utc(2026, 11, 9, 3)
    assert d.requeue_after == pytest.approx(7 * 86400 + 0.1)
    late = c.due(spec(), {}, "2026-11-01T00:00:00Z", utc(2026, 11, 2, 5, 17))
    assert late.scheduled_time == utc(2026, 11, 2, 3) and late.missed == 1
    # Once lastScheduleTime records it, it is not due again.
    done = c.due(spec(), {"lastScheduleTime": "2026-11-02T03:00:00Z"}, CREATED,
                 utc(2026, 11, 2, 5, 17))
    assert done.scheduled_time is None and done.next_time == utc(2026, 11, 9, 3)


def test_several_missed_only_most_recent_runs():
    status = {"lastScheduleTime": "2026-11-02T03:00:00Z"}
    d = c.due(spec(), status, CREATED, utc(2026, 11, 26, 13))  # missed 9th, 16th, 23rd
    assert d.scheduled_time == utc(2026, 11, 23, 3)
    assert d.missed == 3 and d.warning is None and not d.missed_too_late
    assert d.next_time == utc(2026, 11, 30, 3)


def test_starting_deadline_within_and_too_late():
    status = {"lastScheduleTime": "2026-11-16T03:00:00Z"}
    now = utc(2026, 11, 23, 3, 4)
    ok = c.due(spec(startingDeadlineSeconds=300), status, CREATED, now)
    assert ok.scheduled_time == utc(2026, 11, 23, 3) and not ok.missed_too_late
    late = c.due(spec(startingDeadlineSeconds=200), status, CREATED, now)
    assert late.scheduled_time is None and late.missed_too_late
    assert late.missed_time == utc(2026, 11, 23, 3)
    assert late.warning_reason == "MissSchedule" and "2026-11-23T03:00:00Z" in late.warning
    assert late.next_time == utc(2026, 11, 30, 3)
    assert late.requeue_after == pytest.approx((utc(2026, 11, 30, 3) - now).total_seconds() + 0.1)
    # Exactly at the deadline counts as too late (CronJob schedules only after now - deadline).
    edge = c.due(spec(startingDeadlineSeconds=240), status, CREATED, now)
    assert edge.scheduled_time is None and edge.missed_too_late


def test_deadline_with_many_missed_runs_latest_in_window():
    # Hourly, controller down for two days, deadline one hour: the latest tick runs, no warning.
    sp = spec(schedule="0 * * * *", startingDeadlineSeconds=3600)
    d = c.due(sp, {"lastScheduleTime": "2026-11-20T00:00:00Z"}, CREATED, utc(2026, 11, 22, 5, 30))
    assert d.scheduled_time == utc(2026, 11, 22, 5) and d.warning is None and d.missed == 1


def test_more_than_100_missed_warns_and_still_runs_latest():
    sp = spec(schedule="0 * * * *")
    d = c.due(sp, {"lastScheduleTime": "2026-11-20T00:00:00Z"}, CREATED, utc(2026, 11, 26, 12, 5))
    assert d.scheduled_time == utc(2026, 11, 26, 12)
    assert d.missed > 100 and d.warning_reason == "TooManyMissedTimes"
    assert "startingDeadlineSeconds" in d.warning and str(d.missed) in d.warning
    few = c.due(sp, {"lastScheduleTime": "2026-11-26T00:00:00Z"}, CREATED, utc(2026, 11, 26, 12, 5))
    assert few.scheduled_time == utc(2026, 11, 26, 12) and few.warning is None


def test_irregular_schedule_finds_latest_tick_across_weekend():
    # Weekdays at 03:00; last ran Monday, now is the next Monday 02:00: Friday's tick is due.
    sp = spec(schedule="0 3 * * 1-5")
    d = c.due(sp, {"lastScheduleTime": "2026-11-16T03:00:00Z"}, CREATED, utc(2026, 11, 23, 2))
    assert d.scheduled_time == utc(2026, 11, 20, 3)
    assert d.next_time == utc(2026, 11, 23, 3)


def test_due_matches_brute_force():
    rng = random.Random(7)
    exprs = ["0 3 * * 1", "*/20 * * * *", "30 2 * * *", "0 9-17/4 * * 1-5", "15 0 1,15 * *"]
    for _ in range(40):
        expr, tz = rng.choice(exprs), rng.choice([None, "Europe/Berlin", "Asia/Kolkata"])
        earliest = utc(2026, 3, 20) + timedelta(minutes=rng.randrange(0, 40 * 24 * 60))
        now = earliest + timedelta(minutes=rng.randrange(0, 2 * 24 * 60), seconds=rng.randrange(60))
        latest = t = None
        for t in c.ticks(expr, tz, earliest):  # noqa: B007 - t is the first tick after now
            if t > now:
                break
            latest = t
        last = {"lastScheduleTime": vocab.format_time(earliest)}
        d = c.due(spec(schedule=expr, timeZone=tz), last, CREATED, now)
        assert d.scheduled_time == latest, (expr, tz, earliest, now)
        assert d.next_time == t


def test_suspend_nothing_due():
    d = c.due(spec(suspend=True), {}, CREATED, utc(2026, 11, 26))
    assert d == c.Decision(None, False, None, None)


def test_creation_or_last_schedule_in_the_future():
    d = c.due(spec(), {"lastScheduleTime": "2026-12-07T03:00:00Z"}, CREATED, utc(2026, 11, 26))
    assert d.scheduled_time is None and d.next_time == utc(2026, 12, 14, 3)


# --------------------------------------------------------------------------------------------
# Concurrency


def test_concurrency_policies():
    assert c.concurrency_action("Allow", []) == "start"
    assert c.concurrency_action("Allow", ["a"]) == "start"
    assert c.concurrency_action("Forbid", []) == "start"
    assert c.concurrency_action("Forbid", ["a"]) == "skip"
    assert c.concurrency_action("Replace", []) == "start"
    assert c.concurrency_action("Replace", ["a", "b"]) == "replace"
    with pytest.raises(ValueError, match="concurrencyPolicy"):
        c.concurrency_action("Sometimes", ["a"])


# --------------------------------------------------------------------------------------------
# Placeholders


def test_placeholders_all_names_and_spacing():
    when = utc(2026, 11, 26, 3, 7)
    ds = {
        "train": "s3://data/flow/{{ isoWeek }}/train.jsonl",
        "eval": "s3://data/{{year}}/{{  month}}/{{day  }}/{{date}}/{{ timestamp }}.jsonl",
        "requiredCategories": ["edit-{{ isoWeek }}"],
        "minExamplesPerCategory": 5,
    }
    out = s.fill_placeholders(ds, when, None)
    assert out["train"] == "s3://data/flow/2026-w48/train.jsonl"
    assert out["eval"] == "s3://data/2026/11/26/2026-11-26/20261126-0307.jsonl"
    assert out["requiredCategories"] == ["edit-2026-w48"]
    assert out["minExamplesPerCategory"] == 5
    assert ds["train"].endswith("{{ isoWeek }}/train.jsonl")  # input untouched


@pytest.mark.parametrize(
    ("day", "week"),
    [((2026, 12, 31), "2026-w53"), ((2027, 1, 1), "2026-w53"), ((2027, 1, 4), "2027-w01"),
     ((2025, 12, 29), "2026-w01"), ((2026, 1, 5), "2026-w02")],
)
def test_iso_week_year_boundary(day, week):
    iso = date(*day).isocalendar()
    assert week == f"{iso.year}-w{iso.week:02d}"
    assert s.fill_placeholders("{{ isoWeek }}", utc(*day, 12), None) == week


def test_placeholders_use_schedule_time_zone():
    # Monday 00:30 in Tokyo is Sunday 15:30 UTC: the local date (and ISO week) is used.
    when = utc(2026, 11, 29, 15, 30)
    assert s.fill_placeholders("{{date}} {{isoWeek}}", when, "Asia/Tokyo") == "2026-11-30 2026-w49"
    assert s.fill_placeholders("{{date}} {{isoWeek}}", when, None) == "2026-11-29 2026-w48"


def test_unknown_placeholder_names_it_and_path():
    with pytest.raises(ValueError) as err:
        s.fill_placeholders({"train": "s3://d/{{ week }}/x.jsonl"}, utc(2026, 1, 1), None)
    text = str(err.value)
    assert "spec.runTemplate.spec.dataset.train" in text and "{{ week }}" in text
    assert "isoWeek" in text  # lists the known names
    with pytest.raises(ValueError, match=r"dataset\.requiredCategories\[1\]"):
        s.fill_placeholders({"requiredCategories": ["a", "{{x}}"]}, utc(2026, 1, 1), None)


# --------------------------------------------------------------------------------------------
# Names


def test_run_name_deterministic_like_cronjob():
    when = utc(2026, 11, 30, 3)
    name = s.run_name("weekly", when)
    assert name == f"weekly-{int(when.timestamp()) // 60}" == "weekly-29933460"
    assert s.run_name("weekly", when) == name
    assert s.run_name("weekly", when + timedelta(seconds=30)) == name  # minute granularity
    assert s.run_name("weekly", when + timedelta(weeks=1)) != name


def test_names_fit_in_50_and_are_dns_labels():
    import re

    longest = "a" * 39 + "b"  # the CRD allows 40
    for name in (
        s.run_name(longest, utc(2026, 11, 30, 3)),
        s.run_name(longest, utc(2200, 1, 1)),  # 9-digit minutes: truncated, still unique-ish
        s.trigger_run_name(longest, "2026-11-26T10:00"),
    ):
        assert len(name) <= 50 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert s.run_name(longest, utc(2026, 11, 30, 3)).startswith(longest + "-")


def test_trigger_names_deterministic_and_distinct():
    a = s.trigger_run_name("weekly", "now-1")
    assert a == s.trigger_run_name("weekly", "now-1")
    assert a != s.trigger_run_name("weekly", "now-2")
    assert a.startswith("weekly-m") and not a.rsplit("-", 1)[1].isdigit()
    assert s.run_name("weekly", utc(2026, 11, 30, 3)).rsplit("-", 1)[1].isdigit()


# --------------------------------------------------------------------------------------------
# Rendering


def test_render_run():
    sched = schedule(
        runTemplate={
            "metadata": {"labels": {"team": "agents"}, "annotations": {"note": "weekly"}},
            "spec": {**minimal_spec(),
                     "dataset": {"train": "s3://data/flow/{{ isoWeek }}/train.jsonl",
                                 "eval": "s3://data/flow/{{ date }}/eval.jsonl"},
                     "output": {"uri": "s3://models/flow-agent/{{ isoWeek }}/"}},
        }
    )
    when = utc(2026, 11, 30, 3)
    body = s.render_run(sched, when, s.run_name("weekly", when))
    meta = body["metadata"]
    assert body["apiVersion"] == "flywheel.dev/v1alpha1" and body["kind"] == "FineTuneRun"
    assert meta["name"] == "weekly-29933460" and meta["namespace"] == "ml"
    assert meta["labels"] == {"team": "agents", "flywheel.dev/schedule": "weekly"}
    assert meta["annotations"] == {"note": "weekly",
                                   "flywheel.dev/scheduled-at": "2026-11-30T03:00:00Z"}
    assert meta["ownerReferences"] == [{
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FineTuneSchedule", "name": "weekly",
        "uid": sched["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
    }]
    assert body["spec"]["dataset"] == {"train": "s3://data/flow/2026-w49/train.jsonl",
                                       "eval": "s3://data/flow/2026-11-30/eval.jsonl"}
    assert body["spec"]["output"]["uri"] == "s3://models/flow-agent/2026-w49/"  # per-run output
    assert "{{" in sched["spec"]["runTemplate"]["spec"]["dataset"]["train"]  # not mutated
    FineTuneRun.model_validate({**body, "spec": {**body["spec"], "output": {"uri": "s3://m/x"}}})

    trig = s.render_run(sched, when, s.trigger_run_name("weekly", "go"), trigger="go")
    assert trig["metadata"]["annotations"]["flywheel.dev/trigger"] == "go"


def test_template_validates_as_schedule_spec():
    FineTuneScheduleSpec.model_validate(schedule()["spec"])


# --------------------------------------------------------------------------------------------
# History


def test_prune_history_limits():
    t0 = utc(2026, 1, 5, 3)
    runs = [run(f"r{i}", phase, t0 + timedelta(weeks=i))
            for i, phase in enumerate(["Succeeded", "Failed", "Succeeded", "Succeeded",
                                       "Failed", "Succeeded", "Running", "Failed"])]
    runs.append(run("r8", None, t0 + timedelta(weeks=8)))  # just created: no phase yet
    assert s.prune(runs, 3, 1) == ["r0", "r1", "r4"]
    assert s.prune(runs, 0, 0) == ["r0", "r1", "r2", "r3", "r4", "r5", "r7"]
    assert s.prune(runs, 10, 10) == []
    assert s.prune(list(reversed(runs)), 1, 1) == ["r0", "r1", "r2", "r3", "r4"]


def test_prune_orders_by_scheduled_at_then_creation_and_skips_deleting():
    a = run("b-old", "Succeeded", utc(2026, 1, 1))
    b = run("a-new", "Succeeded")
    b["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    c = run("c-gone", "Succeeded", utc(2025, 1, 1), deleting=True)
    assert s.prune([b, a, c], 1, 1) == ["b-old"]
    assert s.active_runs([run("x", "Running", deleting=True), run("y", "Suspended"), a]) == ["y"]


# --------------------------------------------------------------------------------------------
# Status


def test_schedule_status_validates_and_reports_last_run():
    t0 = utc(2026, 11, 2, 3)
    runs = [run("weekly-1", "Succeeded", t0, cost=41.5),
            run("weekly-2", "Failed", t0 + timedelta(weeks=1), cost=12.0),
            run("weekly-3", "Running", t0 + timedelta(weeks=2), cost=40.0)]
    sched = schedule(status={"lastTrigger": "old"})
    now = utc(2026, 11, 16, 4)
    st = s.schedule_status(sched, runs, now, last_schedule_time=t0 + timedelta(weeks=2),
                           next_schedule_time=t0 + timedelta(weeks=3))
    FineTuneScheduleStatus.model_validate(st)
    assert st["lastScheduleTime"] == "2026-11-16T03:00:00Z"
    assert st["nextScheduleTime"] == "2026-11-23T03:00:00Z"
    assert st["active"] == ["weekly-3"]
    assert (st["lastRun"], st["lastRunPhase"], st["lastRunCost"]) == ("weekly-3", "Running", 40.0)
    assert st["lastSuccessfulRun"] == "weekly-1" and st["lastTrigger"] == "old"
    assert st["observedGeneration"] == 2
    (cond,) = st["conditions"]
    assert cond["type"] == "Ready" and cond["status"] == "True" and cond["reason"] == "Scheduled"
    assert cond["lastTransitionTime"] == "2026-11-16T04:00:00Z"
    # The transition time is kept while the status stays the same.
    sched["status"] = st
    again = s.schedule_status(sched, runs, now + timedelta(hours=1))
    assert again["conditions"][0]["lastTransitionTime"] == "2026-11-16T04:00:00Z"
    assert again["lastScheduleTime"] == "2026-11-16T03:00:00Z"
    FineTuneScheduleStatus.model_validate(s.schedule_status(schedule(), [], now))


def test_status_cost_falls_back_to_preflight_estimate():
    r = run("weekly-1", "Pending", utc(2026, 11, 2, 3))
    r["status"]["preflight"] = {"estimatedCost": 7.25}
    st = s.schedule_status(schedule(), [r], utc(2026, 11, 2, 4))
    assert st["lastRunCost"] == 7.25 and st["lastRunPhase"] == "Pending"
    FineTuneScheduleStatus.model_validate(st)


# --------------------------------------------------------------------------------------------
# plan: the whole reconcile


def test_plan_creates_due_run_and_records_it():
    sched = schedule(status={"lastScheduleTime": "2026-11-16T03:00:00Z"})
    p = s.plan(sched, [], utc(2026, 11, 23, 3, 0, 5))
    assert [b["metadata"]["name"] for b in p.create] == [s.run_name("weekly", utc(2026, 11, 23, 3))]
    assert p.delete == [] and p.status["lastScheduleTime"] == "2026-11-23T03:00:00Z"
    assert p.status["active"] == [p.create[0]["metadata"]["name"]]
    assert p.status["nextScheduleTime"] == "2026-11-30T03:00:00Z"
    assert p.requeue_after == pytest.approx(7 * 86400 - 5 + 0.1)
    FineTuneScheduleStatus.model_validate(p.status)
    # Same inputs plus the created run: nothing more to do (idempotent).
    sched["status"] = p.status
    again = s.plan(sched, p.create, utc(2026, 11, 23, 3, 1))
    assert again.create == [] and again.delete == []


def test_plan_forbid_keeps_tick_pending_then_runs_it():
    busy = run("weekly-29400000", "Running", utc(2026, 11, 16, 3))
    sched = schedule(status={"lastScheduleTime": "2026-11-16T03:00:00Z"})
    p = s.plan(sched, [busy], utc(2026, 11, 23, 3, 1))
    assert p.create == [] and p.status["lastScheduleTime"] == "2026-11-16T03:00:00Z"
    assert p.requeue_after == s.FORBID_RECHECK
    assert any(e[1] == "RunAlreadyActive" for e in p.events)
    busy["status"]["phase"] = "Succeeded"
    later = s.plan(sched, [busy], utc(2026, 11, 23, 9))
    assert [b["metadata"]["name"] for b in later.create] == [
        s.run_name("weekly", utc(2026, 11, 23, 3))  # named after the tick, not the start
    ]


def test_plan_replace_and_allow():
    busy = run("weekly-29400000", "Running", utc(2026, 11, 16, 3))
    now = utc(2026, 11, 23, 3, 1)
    status = {"lastScheduleTime": "2026-11-16T03:00:00Z"}
    rep = s.plan(schedule(status=status, concurrencyPolicy="Replace"), [busy], now)
    assert rep.delete == ["weekly-29400000"] and len(rep.create) == 1
    assert rep.status["active"] == [rep.create[0]["metadata"]["name"]]
    allow = s.plan(schedule(status=status, concurrencyPolicy="Allow"), [busy], now)
    assert allow.delete == [] and len(allow.create) == 1
    assert len(allow.status["active"]) == 2


def test_plan_trigger_fills_placeholders_and_is_recorded():
    sched = schedule(
        annotations={vocab.TRIGGER_ANNOTATION: "t1"}, suspend=True,
        runTemplate={"spec": {**minimal_spec(),
                              "dataset": {"train": "s3://data/{{ isoWeek }}/train.jsonl"}}},
    )
    now = utc(2026, 11, 26, 10, 30)
    p = s.plan(sched, [], now)
    (body,) = p.create
    assert body["metadata"]["name"] == s.trigger_run_name("weekly", "t1")
    assert body["spec"]["dataset"]["train"] == "s3://data/2026-w48/train.jsonl"
    assert body["metadata"]["annotations"][vocab.SCHEDULED_AT_ANNOTATION] == "2026-11-26T10:30:00Z"
    assert p.status["lastTrigger"] == "t1" and p.status["nextScheduleTime"] is None
    assert p.status["conditions"][0]["reason"] == "Suspended" and p.requeue_after is None
    sched["status"] = p.status
    assert s.plan(sched, p.create, now).create == []  # same value: no second run


def test_plan_prunes_history_and_reports_invalid():
    t0 = utc(2026, 1, 5, 3)
    runs = [run(f"weekly-{i}", "Succeeded", t0 + timedelta(weeks=i)) for i in range(5)]
    p = s.plan(schedule(status={"lastScheduleTime": "2026-02-02T03:00:00Z"}), runs,
               utc(2026, 2, 3))
    assert p.delete == ["weekly-0", "weekly-1"] and p.status["lastRun"] == "weekly-4"
    bad = s.plan(schedule(schedule="0 3 * *"), runs, utc(2026, 2, 3))
    assert bad.create == [] and bad.requeue_after is None
    assert bad.status["conditions"][0]["status"] == "False"
    assert "spec.schedule" in bad.status["conditions"][0]["message"]
    FineTuneScheduleStatus.model_validate(bad.status)
    tmpl = schedule(status={"lastScheduleTime": "2026-01-26T03:00:00Z"},
                    runTemplate={"spec": {**minimal_spec(),
                                          "dataset": {"train": "s3://d/{{ wk }}/t.jsonl"}}})
    invalid = s.plan(tmpl, [], utc(2026, 2, 2, 3, 1))
    assert invalid.create == [] and invalid.status["conditions"][0]["reason"] == "InvalidTemplate"
    assert invalid.status["lastScheduleTime"] == "2026-01-26T03:00:00Z"


def test_plan_conditions_dedupe_events():
    busy = run("weekly-29400000", "Running", utc(2026, 11, 16, 3))
    sched = schedule(status={"lastScheduleTime": "2026-11-16T03:00:00Z"})
    first = s.plan(sched, [busy], utc(2026, 11, 23, 3, 1))
    waiting = {c["type"]: c for c in first.status["conditions"]}["Waiting"]
    assert waiting["status"] == "True" and waiting["reason"] == "RunAlreadyActive"
    assert [e[1] for e in first.events] == ["RunAlreadyActive"]
    FineTuneScheduleStatus.model_validate(first.status)
    sched["status"] = first.status
    second = s.plan(sched, [busy], utc(2026, 11, 23, 3, 2))
    assert second.events == [] and second.create == []  # still waiting, no repeated event
    busy["status"]["phase"] = "Succeeded"
    third = s.plan(sched, [busy], utc(2026, 11, 23, 3, 3))
    assert len(third.create) == 1
    assert {c["type"]: c for c in third.status["conditions"]}["Waiting"]["status"] == "False"


def test_plan_missed_too_late_condition_once():
    sched = schedule(status={"lastScheduleTime": "2026-11-16T03:00:00Z"},
                     startingDeadlineSeconds=60)
    first = s.plan(sched, [], utc(2026, 11, 23, 4))
    assert first.create == [] and [e[1] for e in first.events] == ["MissSchedule"]
    missed = {c["type"]: c for c in first.status["conditions"]}["Missed"]
    assert missed["status"] == "True" and "2026-11-23T03:00:00Z" in missed["message"]
    assert first.status["lastScheduleTime"] == "2026-11-16T03:00:00Z"  # like CronJob
    sched["status"] = first.status
    assert s.plan(sched, [], utc(2026, 11, 23, 5)).events == []
    nxt = s.plan(sched, [], utc(2026, 11, 30, 3, 0, 30))
    assert len(nxt.create) == 1
    assert {c["type"]: c for c in nxt.status["conditions"]}["Missed"]["status"] == "False"
    FineTuneScheduleStatus.model_validate(nxt.status)


def test_placeholder_uris_pass_the_crd_uri_rule():
    import re

    from flywheel_operator.api import DATA_URI_RE

    for uri in ("s3://data/flow/{{ isoWeek }}/train.jsonl", "file:///data/{{date}}/t.jsonl",
                "pvc://datasets/flow/{{ timestamp }}.jsonl"):
        assert re.match(DATA_URI_RE, uri), uri
        assert re.match(DATA_URI_RE, s.fill_placeholders(uri, utc(2026, 11, 26), None))


def test_the_local_schedule_example_trains_make_runs_sample():
    """`make run-schedule` applies examples/finetuneschedule-local.yaml: the same sample, so
    the same hyperparameters, FSDP options, data floor and checkpoint interval as `make run`."""
    from pathlib import Path

    import yaml

    from hack import run as demo

    path = Path(__file__).resolve().parents[2] / "examples" / "finetuneschedule-local.yaml"
    schedule = yaml.safe_load(path.read_text())
    spec = schedule["spec"]["runTemplate"]["spec"]
    FineTuneScheduleSpec.model_validate(schedule["spec"])
    sample = demo.run_manifest("x", "file:///m", "file:///t", "file:///e", "file:///o")["spec"]
    for field in ("hyperparameters", "fsdp", "checkpoint", "resources", "maxRestarts"):
        assert spec[field] == sample[field], field
    assert (spec["dataset"]["minExamplesPerCategory"]
            == sample["dataset"]["minExamplesPerCategory"])
