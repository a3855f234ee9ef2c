"""FineTuneSchedule: the retraining flywheel's schedule logic as pure functions.

Nothing here talks to Kubernetes or imports kopf. The handler lists the schedule's runs (label
`flywheel.dev/schedule=<name>`), calls `plan()` (or the pieces below), creates / deletes the
runs it names and patches the status it returns. When a tick is due, what a missed tick
means and concurrencyPolicy follow the Kubernetes CronJob controller: see `cron`.

Run names are `<schedule>-<minutes since epoch>` for ticks, so re-creating the same tick
(say after an operator restart) gets AlreadyExists instead of a duplicate, and
`<schedule>-m<hash of value>` for the `flywheel.dev/trigger` annotation.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .api import FineTuneScheduleStatus, checked
from .cron import concurrency_action, due, zone
from .vocab import (
    API_VERSION,
    RUN_PHASES,
    SCHEDULE_LABEL,
    SCHEDULED_AT_ANNOTATION,
    TERMINAL,
    TRIGGER_ANNOTATION,
    format_time,
    owner_reference,
    parse_time,
    set_condition,
)

RUN_NAME_MAX = 50
#: While a Forbid-skipped tick or trigger is pending, look again at least this often.
FORBID_RECHECK = 30.0

# --------------------------------------------------------------------------------------------
# Placeholders

_PLACEHOLDER_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def placeholder_values(when: datetime, tz: str | None = None) -> dict[str, str]:
    """The placeholder values for a scheduled time, in the schedule's time zone."""
    local = parse_time(when).astimezone(zone(tz))  # type: ignore[union-attr]
    iso = local.isocalendar()
    return {"isoWeek": f"{iso.year}-w{iso.week:02d}", "date": local.strftime("%Y-%m-%d"),
            "year": f"{local.year:04d}", "month": f"{local.month:02d}", "day": f"{local.day:02d}",
            "timestamp": local.strftime("%Y%m%d-%H%M")}


def fill_placeholders(value: Any, when: datetime, tz: str | None = None,
                      path: str = "spec.runTemplate.spec.dataset") -> Any:
    """`value` with `{{ name }}` placeholders filled in, recursively through dicts and lists.

    Names: isoWeek (2026-w48), date (2026-11-26), year, month, day (zero-padded), timestamp
    (20261126-0300), all in the schedule's time zone. Whitespace inside the braces is optional.
    An unknown name raises ValueError naming it and the field path.
    """
    values = placeholder_values(when, tz)

    def fill(v: Any, where: str) -> Any:
        if isinstance(v, str):
            def sub(m: re.Match[str]) -> str:
                key = m.group(1)
                if key not in values:
                    raise ValueError(f"{where}: unknown placeholder {{{{ {key} }}}}; known: "
                                     + ", ".join(values))
                return values[key]

            return _PLACEHOLDER_RE.sub(sub, v)
        if isinstance(v, dict):
            return {k: fill(x, f"{where}.{k}") for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    return fill(value, path)


# --------------------------------------------------------------------------------------------
# Names


def run_name(schedule_name: str, when: datetime) -> str:
    """`<schedule>-<minutes since the epoch>` (CronJob's job name), at most 50 characters."""
    suffix = str(int(parse_time(when).timestamp()) // 60)  # type: ignore[union-attr]
    return _join(schedule_name, suffix)


def trigger_run_name(schedule_name: str, value: str) -> str:
    """`<schedule>-m<8 hex of sha256(value)>` for the trigger annotation; never a tick's name
    (those end in digits only), the same name for the same value."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return _join(schedule_name, "m" + digest)


def _join(prefix: str, suffix: str) -> str:
    room = RUN_NAME_MAX - len(suffix) - 1
    return f"{prefix[:room].rstrip('-')}-{suffix}"


# --------------------------------------------------------------------------------------------
# Runs


def render_run(schedule: dict, when: datetime, name: str, trigger: str | None = None) -> dict:
    """The FineTuneRun a tick (or a trigger) creates, from spec.runTemplate.

    Template labels/annotations are copied, plus label `flywheel.dev/schedule: <schedule>`,
    annotation `flywheel.dev/scheduled-at: <RFC3339 UTC>` and, for a trigger,
    `flywheel.dev/trigger: <value>`. Placeholders in spec.dataset (and `{{ run }}` plus the
    time placeholders in output.uri / checkpoint.uri) are filled in for `when` (ValueError on
    an unknown one). The run is owned (controller) by the schedule.
    """
    meta = schedule["metadata"]
    spec = schedule["spec"]
    template = spec.get("runTemplate") or {}
    tmeta = template.get("metadata") or {}
    run_spec = copy.deepcopy(template.get("spec") or {})
    if "dataset" in run_spec:
        run_spec["dataset"] = fill_placeholders(run_spec["dataset"], when, spec.get("timeZone"))
    # Each run writes (and checkpoints) somewhere of its own: `{{ run }}` and the time
    # placeholders also work in output.uri and checkpoint.uri.
    for part in ("output", "checkpoint"):
        if (run_spec.get(part) or {}).get("uri"):
            uri = re.sub(r"\{\{\s*run\s*\}\}", name, run_spec[part]["uri"])
            run_spec[part]["uri"] = fill_placeholders(
                uri, when, spec.get("timeZone"), path=f"spec.runTemplate.spec.{part}.uri")
    labels = {**(tmeta.get("labels") or {}), SCHEDULE_LABEL: meta["name"]}
    annotations = {**(tmeta.get("annotations") or {}), SCHEDULED_AT_ANNOTATION: format_time(when)}
    if trigger is not None:
        annotations[TRIGGER_ANNOTATION] = trigger
    metadata: dict[str, Any] = {
        "name": name,
        "labels": labels,
        "annotations": annotations,
        "ownerReferences": [owner_reference(schedule, kind="FineTuneSchedule")]}
    if meta.get("namespace"):
        metadata["namespace"] = meta["namespace"]
    return {"apiVersion": API_VERSION, "kind": "FineTuneRun", "metadata": metadata,
            "spec": run_spec}


def run_phase(run: dict) -> str | None:
    return (run.get("status") or {}).get("phase")


def is_finished(run: dict) -> bool:
    return run_phase(run) in TERMINAL


def is_active(run: dict) -> bool:
    """Not Succeeded/Failed and not being deleted (Suspended and Pending runs are active)."""
    return not is_finished(run) and not (run.get("metadata") or {}).get("deletionTimestamp")


def run_time(run: dict) -> datetime:
    """When a run was scheduled: its scheduled-at annotation, else its creationTimestamp."""
    meta = run.get("metadata") or {}
    for value in ((meta.get("annotations") or {}).get(SCHEDULED_AT_ANNOTATION),
                  meta.get("creationTimestamp")):
        try:
            t = parse_time(value)
        except ValueError:
            t = None
        if t is not None:
            return t
    return datetime.min.replace(tzinfo=UTC)


def sort_runs(runs: list[dict]) -> list[dict]:
    """Oldest first by run_time, then name."""
    return sorted(runs, key=lambda r: (run_time(r), (r.get("metadata") or {}).get("name", "")))


def active_runs(runs: list[dict]) -> list[str]:
    """Names of the active runs, oldest first."""
    return [r["metadata"]["name"] for r in sort_runs(runs) if is_active(r)]


def prune(runs: list[dict], successful_limit: int, failed_limit: int) -> list[str]:
    """Names of finished runs to delete, oldest first: Succeeded runs beyond the newest
    `successful_limit`, Failed runs beyond the newest `failed_limit`. Active runs (and runs
    already being deleted) are never returned."""
    doomed: list[dict] = []
    for phase, limit in (("Succeeded", successful_limit), ("Failed", failed_limit)):
        group = [r for r in sort_runs(runs) if run_phase(r) == phase
                 and not (r.get("metadata") or {}).get("deletionTimestamp")]
        keep = max(int(limit), 0)
        doomed += group[: max(len(group) - keep, 0)]
    return [r["metadata"]["name"] for r in sort_runs(doomed)]


def pending_trigger(schedule: dict) -> str | None:
    """The `flywheel.dev/trigger` annotation value if it is new (not status.lastTrigger)."""
    value = ((schedule.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_ANNOTATION)
    if not value:
        return None
    if value == (schedule.get("status") or {}).get("lastTrigger"):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Status


def _cost(run: dict) -> float | None:
    status = run.get("status") or {}
    preflight = status.get("preflight") or {}
    for value in (status.get("estimatedCost"), preflight.get("estimatedCost")):
        if isinstance(value, int | float) and value >= 0:
            return float(value)
    return None


def schedule_status(schedule: dict, runs: list[dict], now: datetime, *,
                    last_schedule_time: datetime | str | None = None,
                    next_schedule_time: datetime | None = None, last_trigger: str | None = None,
                    ready: tuple[bool, str, str] | None = None) -> dict:
    """The schedule's full status (fields of api.FineTuneScheduleStatus only).

    `runs` are the schedule's runs as they are after this reconcile (include runs just
    created, leave out runs just pruned). `last_schedule_time` / `last_trigger` default to
    the current status values. `ready` = (ok, reason, message) for the `Ready` condition
    (default: True/Scheduled, or True/Suspended when spec.suspend). A key set to None should
    be patched as null (removed).
    """
    old = schedule.get("status") or {}
    spec = schedule.get("spec") or {}
    generation = (schedule.get("metadata") or {}).get("generation")
    ordered = sort_runs(runs)
    last = ordered[-1] if ordered else None
    succeeded = [r for r in ordered if run_phase(r) == "Succeeded"]
    phase = run_phase(last) if last else None
    lst = parse_time(last_schedule_time) if last_schedule_time else parse_time(
        old.get("lastScheduleTime"))
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "lastScheduleTime": format_time(lst) if lst else None,
        "nextScheduleTime": format_time(next_schedule_time) if next_schedule_time else None,
        "active": active_runs(runs),
        "lastRun": last["metadata"]["name"] if last else None,
        "lastRunPhase": phase if phase in RUN_PHASES else None,
        "lastRunCost": _cost(last) if last else None,
        "lastSuccessfulRun": succeeded[-1]["metadata"]["name"] if succeeded else None,
        "lastTrigger": last_trigger if last_trigger is not None else old.get("lastTrigger"),
        "conditions": copy.deepcopy(old.get("conditions") or [])}
    if ready is None:
        ready = (True, "Suspended", "spec.suspend is true: no new scheduled runs") if spec.get(
            "suspend") else (True, "Scheduled", f"next run at {status['nextScheduleTime']}")
    set_condition(status, "Ready", ready[0], ready[1], ready[2], format_time(now), generation)
    return checked(FineTuneScheduleStatus, status)


# --------------------------------------------------------------------------------------------
# The whole reconcile as a plan


#: Condition type -> (status, reason, message, event type); events fire only on a change.
Notes = dict[str, tuple[bool, str, str, str]]


@dataclass
class Plan:
    """What the handler should do, in order: delete `delete` (runs, background propagation),
    create `create` (a 409 AlreadyExists counts as created), patch `status`, post `events`
    (type, reason, message) and requeue after `requeue_after` seconds (None: don't)."""

    create: list[dict] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None


def owned_runs(schedule: dict, runs: list[dict]) -> list[dict]:
    """The runs a schedule owns (its uid in their ownerReferences), not just any run that
    carries its label."""
    uid = schedule["metadata"]["uid"]
    return [r for r in runs
            if any(o.get("uid") == uid for o in r["metadata"].get("ownerReferences") or [])]


def plan(schedule: dict, runs: list[dict], now: datetime) -> Plan:
    """One reconcile of a FineTuneSchedule given its runs (label flywheel.dev/schedule).

    - The due tick (see `cron.due`) gets run `run_name(schedule, tick)`; a new
      `flywheel.dev/trigger` value (not yet `status.lastTrigger`) gets run
      `trigger_run_name(schedule, value)` with the current time as its scheduled time.
      A run already in `runs` under that name counts as started (idempotent after a crash).
    - Both honour concurrencyPolicy; a trigger also works while the schedule is suspended
      (like `kubectl create job --from=cronjob/...`). A Forbid-held tick or trigger stays
      pending (lastScheduleTime / lastTrigger unchanged), condition `Waiting=True`, and the
      requeue is capped at `FORBID_RECHECK` seconds so it starts soon after the active run
      finishes. Replace deletes the active runs (`delete`) and creates the new one.
    - History limits prune finished runs (`delete`); status is rebuilt from the runs left.
    - Conditions: `Ready` (False: InvalidSchedule / InvalidTemplate), `Waiting`, `Missed`
      (a tick older than startingDeadlineSeconds). Their events fire only when the
      condition changes, so repeated reconciles don't repeat them; RunCreated, RunReplaced
      and TooManyMissedTimes events fire with the action.
    - An invalid schedule: no requeue (None); a spec change wakes the handler.
    """
    out, notes, waiting = Plan(), Notes(), list[str]()
    spec, name = schedule["spec"], schedule["metadata"]["name"]
    now = parse_time(now)  # type: ignore[assignment]
    old = schedule.get("status") or {}
    old_conditions = {c.get("type") for c in old.get("conditions") or []}
    runs = list(runs)
    last_time, last_trigger = parse_time(old.get("lastScheduleTime")), old.get("lastTrigger")
    try:
        decision = due(spec, old, schedule["metadata"].get("creationTimestamp") or now, now)
    except ValueError as err:
        notes["Ready"] = (False, "InvalidSchedule", str(err), "Warning")
        # no requeue: a spec change wakes the handler
        return _finish(out, schedule, runs, now, notes, last_time, last_trigger, None)
    out.requeue_after = decision.requeue_after
    if decision.warning_reason == "MissSchedule":
        notes["Missed"] = (True, "MissSchedule", decision.warning or "", "Warning")
    elif decision.warning:
        out.events.append(("Warning", decision.warning_reason or "Warning", decision.warning))

    t = decision.scheduled_time
    if t is not None and _start(out, schedule, runs, t, run_name(name, t), None, notes, waiting):
        last_time = t
        if "Missed" in old_conditions:
            notes["Missed"] = (False, "Scheduled", f"Started the run for {format_time(t)}", "")
    trigger = pending_trigger(schedule)
    if trigger is not None and _start(out, schedule, runs, now, trigger_run_name(name, trigger),
                                      trigger, notes, waiting):
        last_trigger = trigger
    if waiting:
        notes["Waiting"] = (True, "RunAlreadyActive", "; ".join(waiting), "Normal")
        out.requeue_after = min(out.requeue_after or FORBID_RECHECK, FORBID_RECHECK)
    elif "Waiting" in old_conditions:
        notes["Waiting"] = (False, "NotWaiting", "", "")

    for victim in prune(runs, spec.get("successfulRunsHistoryLimit", 3),
                        spec.get("failedRunsHistoryLimit", 1)):
        if victim not in out.delete:
            out.delete.append(victim)
    return _finish(out, schedule, runs, now, notes, last_time, last_trigger, decision.next_time)


def _start(out: Plan, schedule: dict, runs: list[dict], when: datetime, name: str,
           trigger: str | None, notes: Notes, waiting: list[str]) -> bool:
    """Start run `name` for `when` under concurrencyPolicy: adds it to `out.create` and
    `runs`, or says why not in `waiting` (Forbid) or `notes` (an invalid template)."""
    if any(r["metadata"]["name"] == name for r in runs):
        return True  # already created (e.g. before a restart): nothing to do
    active = active_runs(runs)
    action = concurrency_action(schedule["spec"].get("concurrencyPolicy") or "Forbid", active)
    if action == "skip":
        waiting.append(f"Not starting {name}: {', '.join(active)} still active and "
                       "concurrencyPolicy is Forbid")
        return False
    try:
        body = render_run(schedule, when, name, trigger)
    except ValueError as err:
        notes["Ready"] = (False, "InvalidTemplate", str(err), "Warning")
        return False
    if action == "replace":
        for victim in active:
            if victim not in out.delete:
                out.delete.append(victim)
                out.events.append(("Normal", "RunReplaced", f"Deleted active run {victim}"))
    out.create.append(body)
    runs.append(body)
    out.events.append(("Normal", "RunCreated", f"Created run {name}"))
    return True


def _finish(out: Plan, schedule: dict, runs: list[dict], now: datetime, notes: Notes,
            last_time: datetime | None, last_trigger: str | None,
            next_schedule_time: datetime | None) -> Plan:
    """`out` with the status rebuilt from the runs left and the noted conditions and events."""
    old = {c.get("type"): c for c in (schedule.get("status") or {}).get("conditions") or []}
    ready = notes.pop("Ready", None)
    out.status = schedule_status(
        schedule, [r for r in runs if r["metadata"]["name"] not in out.delete], now,
        last_schedule_time=last_time, next_schedule_time=next_schedule_time,
        last_trigger=last_trigger, ready=ready[:3] if ready else None)
    if ready and not ready[0]:
        notes["Ready"] = ready
    for type_, (value, reason, message, event_type) in notes.items():
        before = old.get(type_) or {}
        if type_ != "Ready":
            set_condition(out.status, type_, value, reason, message, format_time(now),
                          schedule["metadata"].get("generation"))
        changed = before.get("status") != ("True" if value else "False") or (
            before.get("message") != message)
        if event_type and changed:
            out.events.append((event_type, reason, message))
    checked(FineTuneScheduleStatus, out.status)
    return out
