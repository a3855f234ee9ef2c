"""FineTuneSchedule: the retraining flywheel's schedule logic as pure functions.

Nothing here talks to Kubernetes or imports kopf. The handler lists the schedule's runs (label
`flywheel.dev/schedule=<name>`), calls `plan()` (or the pieces below), creates / deletes the
runs it names and patches the status it returns.

Semantics follow the Kubernetes CronJob controller (pkg/controller/cronjob, v2):

- `due()` finds the most recent schedule tick in `(lastScheduleTime or creation, now]`. Only
  that one tick runs, however many were missed. With `startingDeadlineSeconds`, a tick older
  than `now - deadline` is not run (`missed_too_late`). More than 100 missed ticks (counted
  like the controller: elapsed time over the first interval) gives a `TooManyMissedTimes`
  warning. `lastScheduleTime` only moves when a run is really started, so a tick skipped by
  `concurrencyPolicy: Forbid` stays due and starts once the active run finishes (unless the
  deadline has passed by then).
- The next tick is the first tick after `max(now, lastScheduleTime or creation)`; the handler
  requeues after `requeue_after` seconds (the controller's 100 ms padding included).
- Run names are `<schedule>-<minutes since epoch>` for ticks, so re-creating the same tick
  (say after an operator restart) gets AlreadyExists instead of a duplicate, and
  `<schedule>-m<hash of value>` for the `flywheel.dev/trigger` annotation.

Time zones: ticks are computed in `spec.timeZone` (IANA, default UTC) and returned in UTC.
Like CronJob (robfig/cron), a wall-clock time that does not exist on a spring-forward day is
skipped that day, and one that happens twice on a fall-back day runs twice.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from . import lifecycle, render
from .api import API_VERSION

SCHEDULE_LABEL = "flywheel.dev/schedule"
SCHEDULED_AT_ANNOTATION = "flywheel.dev/scheduled-at"
TRIGGER_ANNOTATION = "flywheel.dev/trigger"
#: The controller gives up listing missed ticks beyond this and warns instead.
MAX_MISSED = 100
#: Padding added to every requeue (CronJob's nextScheduleDelta), against clock skew.
REQUEUE_PADDING = 0.1
RUN_NAME_MAX = 50
#: While a Forbid-skipped tick or trigger is pending, look again at least this often.
FORBID_RECHECK = 30.0
FINISHED = ("Succeeded", "Failed")
RUN_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")

Action = Literal["start", "skip", "replace"]

# --------------------------------------------------------------------------------------------
# Time helpers


def parse_time(value: datetime | str | None) -> datetime | None:
    """An RFC3339 string (`...Z` or with offset) or datetime as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def format_time(value: datetime) -> str:
    """RFC3339 in UTC with second precision: `2026-11-26T03:00:00Z` (Kubernetes style)."""
    return parse_time(value).strftime("%Y-%m-%dT%H:%M:%SZ")  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Cron

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def zone(tz: str | None) -> ZoneInfo:
    """The schedule's time zone (default UTC); ValueError naming spec.timeZone."""
    name = tz or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as err:
        raise ValueError(
            f"spec.timeZone: unknown time zone {name!r} (use an IANA name such as "
            "'Europe/Berlin' or 'UTC')"
        ) from err


def validate_schedule(schedule: str, tz: str | None = None) -> None:
    """Raise ValueError (naming spec.schedule or spec.timeZone) unless CronJob would accept it.

    Standard 5-field cron (minute hour day-of-month month day-of-week, `*`, `?`, lists,
    ranges, steps, month and weekday names) or one of the @yearly..@hourly macros; croniter
    extensions that CronJob rejects (`L`, `W`, `#`, `H`, seconds) are refused here too.
    """
    zone(tz)
    expr = (schedule or "").strip()
    if expr.lower() in _MACROS:
        return
    if expr.startswith("@"):
        raise ValueError(f"spec.schedule: unknown macro {expr!r}; use one of {sorted(_MACROS)}")
    if "TZ=" in expr:
        raise ValueError("spec.schedule: set the time zone with spec.timeZone, not TZ=")
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"spec.schedule: {schedule!r} must have 5 fields (minute hour day-of-month month "
            "day-of-week), e.g. '0 3 * * 1'"
        )
    for text, (what, lo, hi, names) in zip(fields, _FIELDS, strict=True):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and not step.isdigit():
                raise ValueError(f"spec.schedule: bad step {part!r} in the {what} field")
            for atom in base.split("-") if base not in ("*", "?") else ():
                low = atom.lower()
                if atom.isdigit():
                    if not lo <= int(atom) <= hi:
                        raise ValueError(
                            f"spec.schedule: {atom} is out of range {lo}-{hi} in the {what} field"
                        )
                elif low not in names:
                    raise ValueError(f"spec.schedule: {atom!r} is not valid in the {what} field")
    try:
        croniter(expr)
    except (CroniterBadCronError, CroniterError, ValueError) as err:
        raise ValueError(
            f"spec.schedule: {schedule!r} is not a valid cron expression: {err}"
        ) from err


@lru_cache(maxsize=256)
def _compiled(schedule: str, tz: str | None):
    """(croniter prototype, zone, allowed minutes or None, allowed hours or None); validated."""
    validate_schedule(schedule, tz)
    loc = zone(tz)
    proto = croniter(schedule.strip(), datetime(2000, 1, 1, tzinfo=loc))
    minutes, hours = proto.expanded[0], proto.expanded[1]
    return (
        proto,
        loc,
        None if "*" in minutes else frozenset(minutes),
        None if "*" in hours else frozenset(hours),
    )


def ticks(schedule: str, tz: str | None, after: datetime) -> Iterator[datetime]:
    """The schedule's ticks strictly after `after`, in order, as aware UTC datetimes."""
    proto, loc, minutes, hours = _compiled(schedule, tz)
    after = parse_time(after)  # type: ignore[assignment]
    it = copy.deepcopy(proto)  # croniter is stateful; the prototype is shared
    it.set_current(after.astimezone(loc), force=True)
    skipped = 0
    while True:
        try:
            t = it.get_next(datetime)
        except CroniterBadDateError as err:
            raise ValueError(f"spec.schedule: {schedule!r} never matches a date") from err
        local = t.astimezone(loc)
        utc = local.astimezone(UTC)
        # croniter moves a wall-clock time that does not exist (spring forward) to another
        # hour; CronJob (robfig/cron) skips it instead.
        moved = (minutes is not None and local.minute not in minutes) or (
            hours is not None and local.hour not in hours
        )
        if utc <= after or moved:
            skipped += 1
            if skipped > 64:  # pragma: no cover - defensive
                raise ValueError(f"spec.schedule: {schedule!r} never matches a date")
            continue
        skipped = 0
        yield utc


def next_time(schedule: str, tz: str | None, after: datetime) -> datetime:
    """The first schedule tick strictly after `after`, as an aware UTC datetime.

    Raises ValueError naming spec.schedule / spec.timeZone for an invalid schedule or one that
    never fires (e.g. `0 0 30 2 *`).
    """
    return next(ticks(schedule, tz, after))


def _interval_seconds(t1: datetime, t2: datetime) -> int:
    return int(round((t2 - t1).total_seconds()))


# --------------------------------------------------------------------------------------------
# The schedule decision


@dataclass(frozen=True)
class Decision:
    """What `due()` found.

    scheduled_time: the tick to start a run for now, or None.
    missed_too_late: a tick was missed but is older than startingDeadlineSeconds: not run.
    missed_time: that too-late tick (for the event message), else None.
    next_time: the next tick (status.nextScheduleTime); None when suspended.
    requeue_after: seconds until the handler should look again (next tick + 100 ms); None
        when suspended (a spec change wakes the handler).
    warning: a warning event message, or None; `warning_reason` is its CamelCase reason
        (`TooManyMissedTimes` or `MissSchedule`).
    missed: how many ticks were missed (the controller's estimate; 1 = just the due one).
    """

    scheduled_time: datetime | None
    missed_too_late: bool
    next_time: datetime | None
    requeue_after: float | None
    warning: str | None = None
    warning_reason: str | None = None
    missed_time: datetime | None = None
    missed: int = 0


def _most_recent(schedule: str, tz: str | None, earliest: datetime, now: datetime):
    """(most recent tick in (earliest, now] or None, number of ticks in that window (estimate))."""
    t1 = next_time(schedule, tz, earliest)
    if t1 > now:
        return None, 0
    t2 = next_time(schedule, tz, t1)
    if t2 > now:
        return t1, 1
    interval = max(_interval_seconds(t1, t2), 1)
    count = int((now - t1).total_seconds()) // interval + 1
    # Walk back from now to the latest tick <= now. Unlike the controller's estimate (which
    # can miss the latest tick of irregular schedules such as `0 3 * * 1-5` across a
    # weekend), this is exact: jump back and walk forward.
    back = timedelta(seconds=interval)
    start = now - back
    while start > t1:
        probe = next_time(schedule, tz, start)
        if probe <= now:
            break
        back *= 2
        start = now - back
    start = max(start, t1 - timedelta(seconds=1))
    latest = None
    for t in ticks(schedule, tz, start):
        if t > now:
            break
        latest = t
    return latest, count


def due(spec: dict, status: dict | None, created: datetime | str, now: datetime) -> Decision:
    """The CronJob decision for one schedule at `now` (see the module docstring).

    `spec` is the FineTuneSchedule spec, `status` its status (only lastScheduleTime is read),
    `created` its metadata.creationTimestamp. Raises ValueError naming spec.schedule or
    spec.timeZone when those are invalid.
    """
    status = status or {}
    schedule = spec.get("schedule", "")
    tz = spec.get("timeZone")
    _compiled(schedule, tz)  # validates (cached)
    now = parse_time(now)  # type: ignore[assignment]
    if spec.get("suspend"):
        return Decision(None, False, None, None)
    earliest = parse_time(status.get("lastScheduleTime")) or parse_time(created)
    assert earliest is not None and now is not None

    latest, count = _most_recent(schedule, tz, earliest, now)
    nxt = next_time(schedule, tz, max(earliest, now))
    requeue = (nxt - now).total_seconds() + REQUEUE_PADDING

    deadline = spec.get("startingDeadlineSeconds")
    if latest is not None and deadline is not None:
        window_start = now - timedelta(seconds=int(deadline))
        if latest <= window_start:
            # CronJob: nothing below now - deadline is ever scheduled.
            return Decision(
                None,
                True,
                nxt,
                requeue,
                warning=f"Missed scheduled time to start a run: {format_time(latest)} "
                f"(more than startingDeadlineSeconds={deadline} ago)",
                warning_reason="MissSchedule",
                missed_time=latest,
                missed=count,
            )
        if earliest < window_start:  # count only ticks inside the window, as the controller
            _, count = _most_recent(schedule, tz, window_start, now)
    warning = reason = None
    if latest is not None and count > MAX_MISSED:
        reason = "TooManyMissedTimes"
        warning = (
            f"too many missed start times ({count}). Set or decrease "
            ".spec.startingDeadlineSeconds or check clock skew"
        )
    return Decision(latest, False, nxt, requeue, warning, reason, None, count)


def concurrency_action(policy: str, active: list[str]) -> Action:
    """What to do with a due tick given the active runs' names.

    Allow -> start. Forbid -> skip while any run is active (the tick stays due; the handler
    must not move lastScheduleTime). Replace -> replace when runs are active (delete them,
    then start), start when none are.
    """
    if not active or policy == "Allow":
        return "start"
    if policy == "Replace":
        return "replace"
    if policy in ("Forbid", "", None):
        return "skip"
    raise ValueError(f"spec.concurrencyPolicy: unknown policy {policy!r} (Forbid, Replace, Allow)")


# --------------------------------------------------------------------------------------------
# Placeholders

_PLACEHOLDER_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def placeholder_values(when: datetime, tz: str | None = None) -> dict[str, str]:
    """The placeholder values for a scheduled time, in the schedule's time zone."""
    local = parse_time(when).astimezone(zone(tz))  # type: ignore[union-attr]
    iso = local.isocalendar()
    return {
        "isoWeek": f"{iso.year}-w{iso.week:02d}",
        "date": local.strftime("%Y-%m-%d"),
        "year": f"{local.year:04d}",
        "month": f"{local.month:02d}",
        "day": f"{local.day:02d}",
        "timestamp": local.strftime("%Y%m%d-%H%M"),
    }


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
                    raise ValueError(
                        f"{where}: unknown placeholder {{{{ {key} }}}}; known: "
                        + ", ".join(values)
                    )
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


def owner_reference(schedule: dict) -> dict[str, Any]:
    """Controller ownerReference to the schedule (deleting it deletes its runs)."""
    return render.owner_reference(schedule, kind="FineTuneSchedule")


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
        "ownerReferences": [owner_reference(schedule)],
    }
    if meta.get("namespace"):
        metadata["namespace"] = meta["namespace"]
    return {"apiVersion": API_VERSION, "kind": "FineTuneRun", "metadata": metadata,
            "spec": run_spec}


def run_phase(run: dict) -> str | None:
    return (run.get("status") or {}).get("phase")


def is_finished(run: dict) -> bool:
    return run_phase(run) in FINISHED


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


def set_condition(status: dict, type_: str, value: bool, reason: str, message: str,
                  now: datetime, generation: int | None) -> None:
    """lifecycle.set_condition with a datetime."""
    lifecycle.set_condition(status, type_, value, reason, message, format_time(now), generation)


def _cost(run: dict) -> float | None:
    status = run.get("status") or {}
    preflight = status.get("preflight") or {}
    for value in (status.get("estimatedCost"), preflight.get("estimatedCost")):
        if isinstance(value, int | float) and value >= 0:
            return float(value)
    return None


def schedule_status(
    schedule: dict,
    runs: list[dict],
    now: datetime,
    *,
    last_schedule_time: datetime | str | None = None,
    next_schedule_time: datetime | None = None,
    last_trigger: str | None = None,
    ready: tuple[bool, str, str] | None = None,
) -> dict:
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
        "conditions": copy.deepcopy(old.get("conditions") or []),
    }
    if ready is None:
        ready = (True, "Suspended", "spec.suspend is true: no new scheduled runs") if spec.get(
            "suspend") else (True, "Scheduled", f"next run at {status['nextScheduleTime']}")
    set_condition(status, "Ready", ready[0], ready[1], ready[2], now, generation)
    return status


# --------------------------------------------------------------------------------------------
# The whole reconcile as a plan


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
    decision: Decision | None = None


def plan(schedule: dict, runs: list[dict], now: datetime) -> Plan:
    """One reconcile of a FineTuneSchedule given its runs (label flywheel.dev/schedule).

    - The due tick (see `due`) gets run `run_name(schedule, tick)`; a new
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
    out = Plan()
    meta = schedule["metadata"]
    spec = schedule["spec"]
    name = meta["name"]
    now = parse_time(now)  # type: ignore[assignment]
    old = schedule.get("status") or {}
    old_conditions = {c.get("type"): c for c in old.get("conditions") or []}
    runs = list(runs)
    last_time = parse_time(old.get("lastScheduleTime"))
    last_trigger = old.get("lastTrigger")
    # Condition type -> (status, reason, message, event type); events only fire on change.
    notes: dict[str, tuple[bool, str, str, str]] = {}

    def finish(next_schedule_time: datetime | None) -> Plan:
        ready = notes.pop("Ready", None)
        out.status = schedule_status(
            schedule, [r for r in runs if r["metadata"]["name"] not in out.delete], now,
            last_schedule_time=last_time, next_schedule_time=next_schedule_time,
            last_trigger=last_trigger, ready=ready[:3] if ready else None)
        if ready and not ready[0]:
            notes["Ready"] = ready
        for type_, (value, reason, message, event_type) in notes.items():
            before = old_conditions.get(type_) or {}
            if type_ != "Ready":
                set_condition(out.status, type_, value, reason, message, now,
                              meta.get("generation"))
            changed = before.get("status") != ("True" if value else "False") or (
                before.get("message") != message)
            if event_type and changed:
                out.events.append((event_type, reason, message))
        return out

    try:
        decision = due(spec, old, meta.get("creationTimestamp") or now, now)
    except ValueError as err:
        notes["Ready"] = (False, "InvalidSchedule", str(err), "Warning")
        return finish(None)  # no requeue: a spec change wakes the handler
    out.decision = decision
    out.requeue_after = decision.requeue_after
    if decision.warning_reason == "MissSchedule":
        notes["Missed"] = (True, "MissSchedule", decision.warning or "", "Warning")
    elif decision.warning:
        out.events.append(("Warning", decision.warning_reason or "Warning", decision.warning))
    policy = spec.get("concurrencyPolicy") or "Forbid"
    waiting: list[str] = []

    def start(when: datetime, run_name_: str, trigger: str | None) -> bool:
        if any(r["metadata"]["name"] == run_name_ for r in runs):
            return True  # already created (e.g. before a restart): nothing to do
        active = active_runs(runs)
        action = concurrency_action(policy, active)
        if action == "skip":
            waiting.append(f"Not starting {run_name_}: {', '.join(active)} still active and "
                           "concurrencyPolicy is Forbid")
            return False
        try:
            body = render_run(schedule, when, run_name_, trigger)
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
        out.events.append(("Normal", "RunCreated", f"Created run {run_name_}"))
        return True

    if decision.scheduled_time is not None:
        t = decision.scheduled_time
        if start(t, run_name(name, t), None):
            last_time = t
            if "Missed" in old_conditions:
                notes["Missed"] = (False, "Scheduled", f"Started the run for {format_time(t)}",
                                   "")
    trigger = pending_trigger(schedule)
    if trigger is not None and start(now, trigger_run_name(name, trigger), trigger):
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
    return finish(decision.next_time)
