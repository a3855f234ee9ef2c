"""FineTuneSchedule (`kubectl get fts`): a cron schedule that creates FineTuneRuns."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..vocab import API_VERSION, RunPhase
from .common import Condition, FreeText, LabelValue, Timestamp, conditions_field
from .run import FineTuneRunSpec


class TemplateMetadata(BaseModel):
    """Labels and annotations copied onto each run."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Labels.")
    annotations: dict[str, FreeText] = Field(
        default_factory=dict, max_length=64, description="Annotations.")


class RunTemplate(BaseModel):
    """The FineTuneRun each schedule tick creates."""

    model_config = ConfigDict(extra="forbid")

    metadata: TemplateMetadata | None = Field(default=None, description="Run metadata.")
    spec: FineTuneRunSpec = Field(
        description="FineTuneRun spec. Strings in dataset may use {{ isoWeek }}, {{ date }} "
        "placeholders, filled in with the scheduled time.")


CRON_RE = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"


class FineTuneScheduleSpec(BaseModel):
    """A cron schedule that creates FineTuneRuns (like CronJob)."""

    model_config = ConfigDict(extra="forbid")

    schedule: str = Field(
        max_length=128, pattern=CRON_RE, description="Cron expression, e.g. `0 3 * * 1`.")
    timeZone: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_+/-]+$",
                                 description="IANA time zone of the schedule; default UTC.")
    concurrencyPolicy: Literal["Forbid", "Replace", "Allow"] = Field(
        default="Forbid", description="What to do when the previous run is still active.")
    startingDeadlineSeconds: int | None = Field(
        default=None, ge=0, description="Skip a tick missed by more than this many seconds.")
    suspend: bool = Field(default=False, description="Create no new runs.")
    successfulRunsHistoryLimit: int = Field(default=3, ge=0, description="Succeeded runs kept.")
    failedRunsHistoryLimit: int = Field(default=1, ge=0, description="Failed runs kept.")
    runTemplate: RunTemplate = Field(description="Template of the runs.")


class FineTuneScheduleStatus(BaseModel):
    """Observed state of a schedule."""

    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = Field(default=None, ge=0, description="Generation seen.")
    lastScheduleTime: Timestamp | None = Field(default=None, description="Last tick run.")
    nextScheduleTime: Timestamp | None = Field(default=None, description="Next tick.")
    active: list[str] = Field(default_factory=list, description="Names of active runs.")
    lastRun: str | None = Field(default=None, description="Name of the newest run.")
    lastRunPhase: RunPhase | None = Field(default=None, description="Its phase.")
    lastRunCost: float | None = Field(default=None, ge=0, description="Its estimated cost.")
    lastSuccessfulRun: str | None = Field(default=None, description="Newest succeeded run.")
    lastTrigger: str | None = Field(
        default=None, description="Last flywheel.dev/trigger annotation value acted on.")
    conditions: list[Condition] = conditions_field()


class FineTuneSchedule(BaseModel):
    """The retraining flywheel: `kubectl get fts`."""

    model_config = ConfigDict(extra="allow")

    apiVersion: Literal[API_VERSION] = API_VERSION
    kind: Literal["FineTuneSchedule"] = "FineTuneSchedule"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneScheduleSpec
    status: FineTuneScheduleStatus | None = None
