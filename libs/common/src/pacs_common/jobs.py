"""Jobs: long-running work with progress (``job`` table, migration 0005).

A job is created ``queued``; a worker claims it (``running``, one attempt
more), reports progress, and ends it ``done`` or ``failed``.  Anybody may
cancel a queued or running job; a worker notices at its next progress
report (:meth:`JobRepository.report_progress` answers False once the job is
no longer running) and stops.  A failed or cancelled job can be retried:
back to ``queued`` with its progress and error cleared.

Every transition is one conditional UPDATE, so API replicas and workers
never need to coordinate otherwise; claiming uses ``FOR UPDATE SKIP
LOCKED`` so that workers take different jobs.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Final

import asyncpg
from pydantic import BaseModel, ConfigDict

__all__ = [
    "Job",
    "JobKind",
    "JobNotFoundError",
    "JobRepository",
    "JobState",
    "JobStateError",
]


class JobKind(StrEnum):
    MOVE = "move"
    PREFETCH = "prefetch"
    MIGRATION = "migration"
    AI = "ai"
    EXPORT = "export"
    RESTORE = "restore"
    FORWARD = "forward"
    MAINTENANCE = "maintenance"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


CANCELLABLE: Final = frozenset({JobState.QUEUED, JobState.RUNNING})
RETRYABLE: Final = frozenset({JobState.FAILED, JobState.CANCELLED})


class Job(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    kind: JobKind
    state: JobState
    progress_done: int
    # None while the worker does not know how much there is to do.
    progress_total: int | None
    error: str | None
    params: dict[str, Any]
    attempts: int
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobNotFoundError(LookupError):
    """No job with this id."""


class JobStateError(Exception):
    """The job is in a state that does not allow the transition."""

    def __init__(self, job: Job, action: str) -> None:
        self.job = job
        super().__init__(f"job {job.id} is {job.state}: it cannot be {action}")


_COLUMNS: Final = (
    "id, kind, state, progress_done, progress_total, error, params, attempts, created_by, "
    "created_at, updated_at, started_at, finished_at"
)

Executor = asyncpg.Pool | asyncpg.Connection


def _job(row: asyncpg.Record) -> Job:
    return Job.model_validate(dict(row))


class JobRepository:
    """``job`` over an asyncpg pool (or a connection)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def create(
        self, kind: JobKind, params: dict[str, Any] | None = None, *, created_by: str | None = None
    ) -> Job:
        row = await self._db.fetchrow(
            f"INSERT INTO job (kind, params, created_by) VALUES ($1, $2, $3) RETURNING {_COLUMNS}",
            str(kind),
            params or {},
            created_by,
        )
        assert row is not None
        return _job(row)

    async def start(
        self,
        kind: JobKind,
        params: dict[str, Any] | None = None,
        *,
        total: int | None = None,
        created_by: str | None = None,
    ) -> Job:
        """A job that runs from the moment it is recorded (e.g. a C-MOVE a
        peer asked for): created running, with its total when known."""
        row = await self._db.fetchrow(
            f"""
            INSERT INTO job (kind, params, created_by, state, attempts, started_at, progress_total)
            VALUES ($1, $2, $3, 'running', 1, now(), $4) RETURNING {_COLUMNS}
            """,
            str(kind),
            params or {},
            created_by,
            total,
        )
        assert row is not None
        return _job(row)

    async def get(self, job_id: int) -> Job | None:
        row = await self._db.fetchrow(f"SELECT {_COLUMNS} FROM job WHERE id = $1", job_id)
        return None if row is None else _job(row)

    async def list(
        self,
        *,
        kinds: frozenset[JobKind] | None = None,
        states: frozenset[JobState] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[Job]]:
        """(how many match, this page of them, newest first)."""
        where = "WHERE ($1::text[] IS NULL OR kind = ANY($1)) AND ($2::text[] IS NULL OR state = ANY($2))"
        filters = (
            None if kinds is None else sorted(str(k) for k in kinds),
            None if states is None else sorted(str(s) for s in states),
        )
        total: int = await self._db.fetchval(f"SELECT count(*) FROM job {where}", *filters)
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM job {where} ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
            *filters,
            limit,
            offset,
        )
        return total, [_job(row) for row in rows]

    async def _transition(
        self, job_id: int, allowed: frozenset[JobState], action: str, assignments: str, *values: Any
    ) -> Job:
        """``assignments`` where the job's state is ``allowed`` (``values`` are $3…)."""
        row = await self._db.fetchrow(
            f"""
            UPDATE job SET {assignments}, updated_at = now()
            WHERE id = $1 AND state = ANY($2::text[])
            RETURNING {_COLUMNS}
            """,
            job_id,
            sorted(str(s) for s in allowed),
            *values,
        )
        if row is not None:
            return _job(row)
        job = await self.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        raise JobStateError(job, action)

    async def cancel(self, job_id: int) -> Job:
        """A queued or running job → cancelled."""
        return await self._transition(
            job_id, CANCELLABLE, "cancelled", "state = 'cancelled', finished_at = now()"
        )

    async def retry(self, job_id: int) -> Job:
        """A failed or cancelled job → queued again, progress and error cleared."""
        return await self._transition(
            job_id,
            RETRYABLE,
            "retried",
            "state = 'queued', progress_done = 0, progress_total = NULL, error = NULL, "
            "started_at = NULL, finished_at = NULL",
        )

    # -- the worker's side -----------------------------------------------------

    async def claim(self, kinds: frozenset[JobKind]) -> Job | None:
        """The oldest queued job of ``kinds``, now running (None when there is none)."""
        row = await self._db.fetchrow(
            f"""
            UPDATE job SET state = 'running', attempts = attempts + 1, started_at = now(), updated_at = now()
            WHERE id = (
                SELECT id FROM job WHERE state = 'queued' AND kind = ANY($1::text[])
                ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
            )
            RETURNING {_COLUMNS}
            """,
            sorted(str(k) for k in kinds),
        )
        return None if row is None else _job(row)

    async def report_progress(self, job_id: int, done: int, total: int | None = None) -> bool:
        """Record progress; False when the job is no longer running (cancelled: stop)."""
        result = await self._db.execute(
            """
            UPDATE job SET progress_done = $2, progress_total = coalesce($3, progress_total), updated_at = now()
            WHERE id = $1 AND state = 'running'
            """,
            job_id,
            done,
            total,
        )
        return result != "UPDATE 0"

    async def complete(self, job_id: int) -> Job:
        """A running job → done."""
        return await self._transition(
            job_id, frozenset({JobState.RUNNING}), "completed", "state = 'done', finished_at = now()"
        )

    async def fail(self, job_id: int, error: str) -> Job:
        """A running job → failed, with the reason."""
        return await self._transition(
            job_id,
            frozenset({JobState.RUNNING}),
            "failed",
            "state = 'failed', error = $3, finished_at = now()",
            error,
        )
