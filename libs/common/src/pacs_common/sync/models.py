"""Sync relations to remote nodes, their runs and the conflicts they found
(tables of migration 0013)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pacs_common.tasks.schedule import validate_cron

__all__ = [
    "ConflictPolicy",
    "Direction",
    "RunState",
    "RunTrigger",
    "ScheduleKind",
    "SyncConflict",
    "SyncFilter",
    "SyncRelation",
    "SyncRelationCreate",
    "SyncRun",
]

_DATE = re.compile(r"^\d{8}$")


class Direction(StrEnum):
    PULL = "pull"  # missing here: C-MOVE from the remote to our gateway
    PUSH = "push"  # missing there: C-STORE to the remote
    BOTH = "both"

    @property
    def pulls(self) -> bool:
        return self in (Direction.PULL, Direction.BOTH)

    @property
    def pushes(self) -> bool:
        return self in (Direction.PUSH, Direction.BOTH)


class ScheduleKind(StrEnum):
    INTERVAL = "interval"
    CRON = "cron"
    CONTINUOUS = "continuous"  # again as soon as a run ends (after a short pause)
    MANUAL = "manual"  # only when asked


class ConflictPolicy(StrEnum):
    KEEP_LOCAL = "keep-local"
    KEEP_REMOTE = "keep-remote"
    KEEP_BOTH_REPORT = "keep-both-report"


class RunState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"  # some instances could not be moved
    FAILED = "failed"


class RunTrigger(StrEnum):
    SCHEDULE = "schedule"
    MANUAL = "manual"


class SyncFilter(BaseModel):
    """Which studies take part; an empty filter: every study."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modalities: tuple[str, ...] = ()
    study_date_from: str | None = None
    study_date_to: str | None = None
    patient_ids: tuple[str, ...] = ()

    @field_validator("study_date_from", "study_date_to")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        if value is not None and not _DATE.match(value):
            raise ValueError("a study date is YYYYMMDD")
        return value

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted({m.strip().upper() for m in value if m.strip()}))

    def date_range(self) -> str:
        """The StudyDate matching key ('' when any date)."""
        if self.study_date_from is None and self.study_date_to is None:
            return ""
        return f"{self.study_date_from or ''}-{self.study_date_to or ''}"

    def admits(self, modalities: tuple[str, ...], study_date: str | None, patient_id: str | None) -> bool:
        """Whether a study with these attributes is in the relation."""
        if self.modalities and not set(self.modalities) & {m.upper() for m in modalities}:
            return False
        if self.patient_ids and patient_id not in self.patient_ids:
            return False
        if self.study_date_from is not None and (study_date is None or study_date < self.study_date_from):
            return False
        return not (
            self.study_date_to is not None and (study_date is None or study_date > self.study_date_to)
        )


class SyncRelationCreate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    remote_ae_title: str = Field(min_length=1, max_length=16)
    direction: Direction = Direction.PULL
    filter: SyncFilter = SyncFilter()
    schedule_kind: ScheduleKind = ScheduleKind.MANUAL
    interval_seconds: int | None = Field(default=None, gt=0)
    cron_expression: str | None = None
    conflict_policy: ConflictPolicy = ConflictPolicy.KEEP_BOTH_REPORT
    # Also compare the content of instances both sides hold (C-GET from the
    # remote, sha256 of the dataset): finds conflicts equal counts hide.
    compare_content: bool = False
    enabled: bool = True

    @field_validator("remote_ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return value.strip(" ")

    @field_validator("cron_expression")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else validate_cron(value)

    @model_validator(mode="after")
    def _schedule(self) -> SyncRelationCreate:
        if self.schedule_kind is ScheduleKind.INTERVAL and self.interval_seconds is None:
            raise ValueError("an interval schedule needs interval_seconds")
        if self.schedule_kind is ScheduleKind.CRON and self.cron_expression is None:
            raise ValueError("a cron schedule needs cron_expression")
        return self


class SyncRelation(SyncRelationCreate):
    id: int
    next_run_at: datetime | None = None
    run_requested_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class SyncRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    relation_id: int
    trigger: RunTrigger
    state: RunState
    started_at: datetime
    finished_at: datetime | None = None
    studies_compared: int = 0
    studies_different: int = 0
    instances_pulled: int = 0
    instances_pushed: int = 0
    instances_failed: int = 0
    conflicts: int = 0
    error: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class SyncConflict(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    relation_id: int
    run_id: int | None
    sop_instance_uid: str
    study_instance_uid: str | None
    local_sha256: str | None
    remote_sha256: str | None
    policy: ConflictPolicy
    resolution: str
    detected_at: datetime
