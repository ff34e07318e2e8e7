"""On-demand migrations: the parameters of a ``migration`` job, how one is
queued, and the history of migration passes (``hsm_run``).

Without ``to_tier`` a job applies the configured policy rules now (only
those leaving ``from_tier`` when it is given); with ``to_tier`` it moves
every matching instance there, whatever its age (an operator's decision):
those in ``from_tier``, or in any other tier when ``from_tier`` is not
given.  ``study_instance_uids`` restricts either to those studies;
``dry_run`` only counts what would move.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Self

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pacs_common.jobs import Job, JobKind, JobRepository

__all__ = ["MigrationJobParams", "MigrationRun", "create_migration_job", "recent_runs"]

Executor = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy

_UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


class MigrationJobParams(BaseModel):
    """What an on-demand migration does (the job's ``params``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    from_tier: str | None = Field(default=None, min_length=1)
    to_tier: str | None = Field(default=None, min_length=1)
    study_instance_uids: list[str] | None = Field(default=None, min_length=1, max_length=10_000)
    dry_run: bool = False

    @field_validator("from_tier", "to_tier")
    @classmethod
    def _tier(cls, value: str | None) -> str | None:
        return None if value is None else value.strip().lower()

    @field_validator("study_instance_uids")
    @classmethod
    def _uids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = list(dict.fromkeys(uid.strip() for uid in value))
        for uid in cleaned:
            if len(uid) > 64 or not re.match(_UID_PATTERN, uid):
                raise ValueError(f"not a UID: {uid!r}")
        return cleaned

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if self.from_tier is not None and self.from_tier == self.to_tier:
            raise ValueError("from_tier and to_tier must differ")
        return self

    def check_tiers(self, configured: tuple[str, ...] | list[str]) -> None:
        """Raise ValueError naming a tier the deployment does not have."""
        for tier in (self.from_tier, self.to_tier):
            if tier is not None and tier not in configured:
                raise ValueError(f"unknown storage tier {tier!r} (configured: {', '.join(configured)})")


async def create_migration_job(
    db: asyncpg.Pool | asyncpg.Connection, params: MigrationJobParams, *, created_by: str | None = None
) -> Job:
    """Queue a migration job; an hsm-migrator replica claims and runs it."""
    return await JobRepository(db).create(
        JobKind.MIGRATION, params.model_dump(mode="json", exclude_none=True), created_by=created_by
    )


class MigrationRun(BaseModel):
    """One migration pass (``hsm_run``)."""

    model_config = ConfigDict(frozen=True)

    id: int
    trigger: str
    job_id: int | None
    owner: str
    dry_run: bool
    params: dict[str, Any]
    planned: int
    moved: int
    moved_bytes: int
    failed: int
    started_at: datetime
    finished_at: datetime | None


async def recent_runs(db: Executor, *, job_id: int | None = None, limit: int = 20) -> list[MigrationRun]:
    """The newest passes first (only those of ``job_id`` when given)."""
    rows = await db.fetch(
        """
        SELECT pk AS id, trigger, job_id, owner, dry_run, params, planned, moved, moved_bytes, failed,
               started_at, finished_at
        FROM hsm_run
        WHERE $1::bigint IS NULL OR job_id = $1
        ORDER BY started_at DESC, pk DESC
        LIMIT $2
        """,
        job_id,
        limit,
    )
    return [MigrationRun.model_validate(dict(row)) for row in rows]
