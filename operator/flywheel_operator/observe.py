"""Watching a run while it trains, as pure functions: rank 0's progress document
(flywheel_trainer.contract.Progress, fetched by poller.py) into status, and hang detection
(`stalled`). Nothing here does I/O; what ended an attempt is failures.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from flywheel_trainer.contract import TRAINING

from .api import FineTuneRunSpec, LastCheckpoint, Progress
from .objects import PodSummary
from .vocab import format_time, parse_time

# --- progress ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Polled:
    """What the poller knows about one attempt's rank 0."""

    attempt: int
    doc: dict | None        # the last /progress document fetched, or None
    fetched_at: str | None  # when it was fetched (operator clock)
    polled_at: str          # when the poller last tried (success or not)
    error: str | None = None  # the last try's error
    first_polled_at: str | None = None  # when this operator first tried this attempt


def rank0(pods: list[PodSummary], attempt: int | None) -> PodSummary | None:
    """The pod to poll for a running attempt's progress: its rank 0, once it runs."""
    return next((p for p in pods if p.component == "trainer" and p.attempt == attempt
                 and p.index == 0 and p.phase == "Running"), None)


def progress_url(pod: PodSummary | None) -> str | None:
    """Rank 0's progress URL (None until it has an address and a progress port)."""
    if pod is None or not (pod.ip and pod.progress_port):
        return None
    host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
    return f"http://{host}:{pod.progress_port}/progress"


def progress_status(polled: Polled, old: Progress | None) -> Progress:
    """status.progress from rank 0's document (the last known values when a poll failed)."""
    doc = polled.doc
    if not doc:
        return old or Progress()
    step, total = doc.get("step"), doc.get("totalSteps")
    eta = None
    if doc.get("etaSeconds") is not None and polled.fetched_at:
        eta = format_time(parse_time(polled.fetched_at) + timedelta(seconds=doc["etaSeconds"]))
    return Progress(stage=doc.get("stage"), step=step, totalSteps=total,
                    percent=f"{int(100 * step / total)}%" if step is not None and total else None,
                    epoch=doc.get("epoch"), loss=_round(doc.get("loss"), 4),
                    tokensPerSecond=_round(doc.get("tokensPerSecond"), 1),
                    mfu=_round(doc.get("mfu"), 4), eta=eta,
                    heartbeatTime=doc.get("heartbeatTime"))


def last_checkpoint(polled: Polled, checkpoint_uri: str) -> LastCheckpoint | None:
    """status.lastCheckpoint: the newest complete checkpoint rank 0 reported, in the run's
    checkpoint directory (status.checkpointUri)."""
    ckpt = (polled.doc or {}).get("lastCheckpoint")
    if not ckpt or ckpt.get("step") is None:
        return None
    return LastCheckpoint(step=ckpt["step"], time=ckpt.get("time"),
                          uri=f"{checkpoint_uri.rstrip('/')}/step-{ckpt['step']}")


def _round(value, digits: int):
    return None if value is None else round(float(value), digits)


@dataclass(frozen=True)
class Allowances:
    """Seconds without a sign of life or progress before an attempt counts as stalled."""

    stall: float       # training: heartbeat and step advance
    loading: float     # starting, loading-model, tokenizing (and before the first answer)
    evaluation: float  # evaluating, exporting


def allowances(spec: FineTuneRunSpec, config) -> Allowances:
    """spec.stallTimeoutSeconds (else the operator config's) for training; the config's own
    allowances for loading and evaluation, never below the stall timeout."""
    stall = spec.stallTimeoutSeconds or config.stallTimeoutSeconds
    return Allowances(stall=stall, loading=max(stall, config.loadingTimeoutSeconds),
                      evaluation=max(stall, config.evaluationTimeoutSeconds))


STAGE_ALLOWANCE = {"starting": "loading", "loading-model": "loading", "tokenizing": "loading",
                   "training": "stall", "evaluating": "evaluation", "exporting": "evaluation"}


def _ts(value: str | None) -> float | None:
    t = parse_time(value)
    return None if t is None else t.timestamp()


def ranks_heard(doc: dict, t_doc: float, limit: int = 8) -> str:
    """`rank 1 step 5 (312s ago, in <frame>), rank 0 step 5 (2s ago, in <frame>)`: the
    stalest first."""
    heard = []
    for r in doc.get("ranks") or []:
        hb = _ts(r.get("heartbeatTime"))
        heard.append((float("inf") if hb is None else t_doc - hb, r))
    heard.sort(key=lambda x: -x[0])
    parts = [f"rank {r['rank']} never heard" if age == float("inf")
             else f"rank {r['rank']} step {r.get('step')} ({int(age)}s ago"
             + (f", in {r['where'][:120]})" if r.get("where") else ")")
             for age, r in heard[:limit]]
    more = len(heard) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def stalled(polled: Polled | None, running_since: str | None, now: str,
            allow: Allowances) -> tuple[str, str] | None:
    """(reason, message) when the running attempt shows no life (NoHeartbeat) or no progress
    (NoProgress) for longer than allowed; None while it is fine. Ages inside rank 0's document
    are measured on the trainer's clock, plus the time since the operator last heard it."""
    t_now = _ts(now)
    if polled is None:  # not tried yet (e.g. the operator just started): no judgement
        return None
    if polled.doc is None:
        started = max(_ts(running_since) or 0.0, _ts(polled.first_polled_at) or 0.0)
        if started and t_now - started > allow.loading:
            return ("NoHeartbeat", f"no progress from rank 0 in {int(t_now - started)}s since "
                    f"its pods started: {polled.error or 'no answer'}")
        return None
    doc = polled.doc
    silent = t_now - _ts(polled.fetched_at)
    t_doc = _ts(doc.get("heartbeatTime")) or _ts(polled.fetched_at)
    stage = doc.get("stage")
    where = f"stage {stage}, step {doc.get('step')}/{doc.get('totalSteps')}"
    ranks = ranks_heard(doc, t_doc)
    if silent > allow.stall:
        return ("NoHeartbeat", f"rank 0 has not answered for {int(silent)}s ({where}; "
                f"{polled.error or 'no answer'}); ranks last heard: {ranks}")
    started = _ts(doc.get("startTime")) or t_doc
    for r in doc.get("ranks") or []:
        hb = _ts(r.get("heartbeatTime"))
        if (t_doc - started > allow.loading) if hb is None else (t_doc - hb > allow.stall):
            return ("NoHeartbeat", f"rank {r['rank']} has gone silent ({where}); ranks last "
                    f"heard: {ranks}")
    limit = getattr(allow, STAGE_ALLOWANCE.get(stage, "stall"))
    since = _ts(doc.get("stepTime") if stage == TRAINING else doc.get("stageTime"))
    age = (t_doc - since if since is not None else 0.0) + silent
    if age <= limit:
        return None
    what = (f"no step for {int(age)}s" if stage == TRAINING
            else f"in {stage} for {int(age)}s (allowed {int(limit)}s)")
    return ("NoProgress", f"{what} ({where}); ranks last heard: {ranks}")
