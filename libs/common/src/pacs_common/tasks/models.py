"""Scheduled maintenance tasks: what a task is, its runs, its parameters
(one model per kind, validated when a schedule is set), and the API's
change model."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "PARAMS_MODELS",
    "IntegrityParams",
    "OrphansParams",
    "RetentionHold",
    "RetentionParams",
    "RetentionRule",
    "RunStatus",
    "RunTrigger",
    "ScheduledTask",
    "TaskKind",
    "TaskRun",
    "TaskUpdate",
    "validate_params",
]


class TaskKind(StrEnum):
    RETENTION = "retention"
    INTEGRITY = "integrity"
    ORPHANS = "orphans"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class RunTrigger(StrEnum):
    SCHEDULED = "scheduled"
    MANUAL = "manual"


class ScheduledTask(BaseModel):
    """One task with its schedule (``cron`` in UTC, or ``interval_seconds``)."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    kind: TaskKind
    cron: str | None
    interval_seconds: int | None
    params: dict[str, Any]
    paused: bool
    # None until a scheduler computed it (a task seeded by the migration).
    next_run_at: datetime | None
    trigger_requested: bool
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_run_id: int | None
    last_run_status: RunStatus | None
    last_run_started_at: datetime | None
    last_run_finished_at: datetime | None
    last_success_at: datetime | None
    created_at: datetime
    updated_at: datetime


class TaskRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    task_id: int
    task_name: str
    trigger: RunTrigger
    status: RunStatus
    runner_id: str
    started_at: datetime
    finished_at: datetime | None
    summary: dict[str, Any]
    error: str | None


class RetentionHold(BaseModel):
    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    reason: str | None
    created_by: str | None
    created_at: datetime


# -- parameters per kind -------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetentionRule(_Params):
    """Studies with this modality are kept ``days`` days after their study
    date (their reception when they have no valid study date)."""

    modality: str = Field(pattern=r"^[A-Z0-9_]{1,16}$")
    days: int = Field(ge=1, le=100 * 366)


class RetentionParams(_Params):
    """No rule: nothing is deleted.  A study with several modalities is kept
    as long as the longest rule among its modalities says; modalities
    without a rule do not shorten that."""

    rules: list[RetentionRule] = Field(default_factory=list, max_length=256)
    dry_run: bool = False
    batch_size: int = Field(default=50, ge=1, le=10_000)
    max_studies_per_run: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _one_rule_per_modality(self) -> RetentionParams:
        modalities = [rule.modality for rule in self.rules]
        if len(modalities) != len(set(modalities)):
            raise ValueError("one retention rule per modality")
        return self


class IntegrityParams(_Params):
    """Each run re-hashes up to ``max_objects_per_run`` objects, continuing
    where the previous run stopped; past the last it starts over."""

    batch_size: int = Field(default=100, ge=1, le=10_000)
    max_objects_per_run: int = Field(default=100_000, ge=1)
    # How many problems the run summary lists (all are logged and counted).
    max_reported: int = Field(default=1_000, ge=0)


class OrphansParams(_Params):
    """An object no index row refers to is deleted once it has been seen so
    for longer than ``grace_seconds``."""

    grace_seconds: int = Field(default=86_400, ge=0)
    dry_run: bool = False
    # None: every configured tier.
    tiers: list[str] | None = None
    batch_size: int = Field(default=1_000, ge=1, le=100_000)
    max_deletes_per_run: int = Field(default=100_000, ge=1)


PARAMS_MODELS: Final[dict[TaskKind, type[_Params]]] = {
    TaskKind.RETENTION: RetentionParams,
    TaskKind.INTEGRITY: IntegrityParams,
    TaskKind.ORPHANS: OrphansParams,
}


def validate_params(kind: TaskKind, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters as stored (defaults left out); ValueError when invalid."""
    try:
        parsed = PARAMS_MODELS[kind].model_validate(params)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", exc)).removeprefix("Value error, ")
        raise ValueError(f"invalid {kind} params: {where + ': ' if where else ''}{message}") from exc
    return parsed.model_dump(mode="json", exclude_unset=True)


class TaskUpdate(BaseModel):
    """A change of a task (PATCH): any of a new schedule (a cron expression
    or an interval, not both), new parameters (replacing the old ones), the
    pause switch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: str | None = Field(default=None, min_length=9, max_length=256)
    interval_seconds: int | None = Field(default=None, ge=1, le=366 * 86_400)
    params: dict[str, Any] | None = None
    paused: bool | None = None

    @model_validator(mode="after")
    def _one_schedule(self) -> TaskUpdate:
        if self.cron is not None and self.interval_seconds is not None:
            raise ValueError("give a cron expression or an interval, not both")
        return self
