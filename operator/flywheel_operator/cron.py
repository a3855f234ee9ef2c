"""A cron engine with the Kubernetes CronJob controller's semantics (pkg/controller/cronjob,
v2), pure and generic: it knows cron expressions, time zones and ticks, not FineTuneSchedules.

- `due()` finds the most recent schedule tick in `(lastScheduleTime or creation, now]`. Only
  that one tick runs, however many were missed. With `startingDeadlineSeconds`, a tick older
  than `now - deadline` is not run (`missed_too_late`). More than 100 missed ticks (counted
  like the controller: elapsed time over the first interval) gives a `TooManyMissedTimes`
  warning. `lastScheduleTime` only moves when a run is really started, so a tick skipped by
  `concurrencyPolicy: Forbid` stays due and starts once the active run finishes (unless the
  deadline has passed by then).
- The next tick is the first tick after `max(now, lastScheduleTime or creation)`; the caller
  requeues after `requeue_after` seconds (the controller's 100 ms padding included).
- `concurrency_action()` is concurrencyPolicy: Allow, Forbid or Replace.

Time zones: ticks are computed in `spec.timeZone` (IANA, default UTC) and returned in UTC.
Like CronJob (robfig/cron), a wall-clock time that does not exist on a spring-forward day is
skipped that day, and one that happens twice on a fall-back day runs twice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from .vocab import format_time, parse_time

#: The controller gives up listing missed ticks beyond this and warns instead.
MAX_MISSED = 100
#: Padding added to every requeue (CronJob's nextScheduleDelta), against clock skew.
REQUEUE_PADDING = 0.1

Action = Literal["start", "skip", "replace"]

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
           ("month", 1, 12, _MONTHS), ("day of week", 0, 6, _DAYS))
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
            "day-of-week), e.g. '0 3 * * 1'")
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
                            f"spec.schedule: {atom} is out of range {lo}-{hi} in the {what} field")
                elif low not in names:
                    raise ValueError(f"spec.schedule: {atom!r} is not valid in the {what} field")
    try:
        croniter(expr)
    except (CroniterBadCronError, CroniterError, ValueError) as err:
        raise ValueError(f"spec.schedule: {schedule!r} is not a valid cron expression: {err}"
                         ) from err


@lru_cache(maxsize=256)
def _compiled(schedule: str, tz: str | None):
    """(croniter prototype, zone, allowed minutes or None, allowed hours or None); validated."""
    validate_schedule(schedule, tz)
    loc = zone(tz)
    proto = croniter(schedule.strip(), datetime(2000, 1, 1, tzinfo=loc))
    minutes, hours = proto.expanded[0], proto.expanded[1]
    return (proto, loc, None if "*" in minutes else frozenset(minutes),
            None if "*" in hours else frozenset(hours))


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
            hours is not None and local.hour not in hours)
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
    interval = max(int(round((t2 - t1).total_seconds())), 1)
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
                missed=count)
        if earliest < window_start:  # count only ticks inside the window, as the controller
            _, count = _most_recent(schedule, tz, window_start, now)
    warning = reason = None
    if latest is not None and count > MAX_MISSED:
        reason = "TooManyMissedTimes"
        warning = (
            f"too many missed start times ({count}). Set or decrease "
            ".spec.startingDeadlineSeconds or check clock skew")
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
