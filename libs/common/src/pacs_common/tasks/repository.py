"""``scheduled_task``, ``task_run`` and ``retention_hold`` (migration 0010).

Used by the CLI and the REST API (list, change, pause, resume, trigger,
history, holds) and by the schedulers of the prefetch-scheduler service
(claim, renew, finish).  Every change is one statement or one short
transaction, so any number of API and scheduler replicas work on the same
rows without other coordination:

* a scheduler claims a due task in one transaction: the row is picked with
  ``FOR UPDATE SKIP LOCKED`` (replicas skip each other's), its lease taken,
  its ``next_run_at`` advanced to the next occurrence, and its run recorded;
* while the run goes on its runner renews the lease; a runner that died
  leaves a lease that expires: the next claim records its run as
  interrupted and runs the task again;
* a manual trigger sets ``trigger_requested``: the next scheduler to look
  runs the task (even a paused one) without moving its schedule.

JSON goes in as text and comes out as text (``::text``), so this works on a
pool with the services' jsonb codec and on a bare connection (the CLI).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from pacs_common.tasks.models import (
    RetentionHold,
    RunStatus,
    RunTrigger,
    ScheduledTask,
    TaskKind,
    TaskRun,
    TaskUpdate,
    validate_params,
)
from pacs_common.tasks.schedule import next_run, validate_cron

__all__ = ["Claim", "TaskExistsError", "TaskNotFoundError", "TaskRepository"]

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Executor: TypeAlias = "asyncpg.Pool[asyncpg.Record] | Connection"

_TASK_COLUMNS: Final = """
    id, name, kind, cron, interval_seconds, params::text AS params, paused, next_run_at,
    trigger_requested, lease_owner, lease_expires_at, last_run_id, last_run_status,
    last_run_started_at, last_run_finished_at, last_success_at, created_at, updated_at
"""
_RUN_COLUMNS: Final = """
    id, task_id, task_name, trigger, status, runner_id, started_at, finished_at,
    summary::text AS summary, error
"""

# Free (no live lease) and: triggered, or due, or left by a runner that died
# mid-run (a lease owner whose lease expired: run it again now).
_DUE: Final = """
    (lease_expires_at IS NULL OR lease_expires_at < now())
    AND (trigger_requested
         OR (NOT paused AND (next_run_at <= now() OR lease_owner IS NOT NULL)))
"""


class TaskNotFoundError(LookupError):
    """No task with this name."""


class TaskExistsError(Exception):
    """A task with this name exists."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A task a scheduler took: its run is recorded, its lease held."""

    task: ScheduledTask
    run: TaskRun
    state: dict[str, Any]


def _task(row: asyncpg.Record | dict[str, Any]) -> ScheduledTask:
    values = dict(row)
    values["params"] = json.loads(values["params"])
    return ScheduledTask.model_validate(values)


def _run(row: asyncpg.Record) -> TaskRun:
    values = dict(row)
    values["summary"] = json.loads(values["summary"])
    return TaskRun.model_validate(values)


def _json(value: Any) -> str:
    return json.dumps(value, default=str, allow_nan=False)


class TaskRepository:
    """The tasks over an asyncpg pool (or one connection)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        if isinstance(self._db, asyncpg.Pool):
            async with self._db.acquire() as connection, connection.transaction():
                yield connection
        else:
            async with self._db.transaction():
                yield self._db

    # -- what administrators see and change ---------------------------------

    async def list(self) -> list[ScheduledTask]:
        rows = await self._db.fetch(f"SELECT {_TASK_COLUMNS} FROM scheduled_task ORDER BY name")
        return [_task(row) for row in rows]

    async def get(self, name: str) -> ScheduledTask | None:
        row = await self._db.fetchrow(f"SELECT {_TASK_COLUMNS} FROM scheduled_task WHERE name = $1", name)
        return None if row is None else _task(row)

    async def require(self, name: str) -> ScheduledTask:
        task = await self.get(name)
        if task is None:
            raise TaskNotFoundError(f"no task named {name!r}")
        return task

    async def create(
        self,
        name: str,
        kind: TaskKind,
        *,
        cron: str | None = None,
        interval_seconds: int | None = None,
        params: dict[str, Any] | None = None,
        paused: bool = False,
        now: datetime | None = None,
    ) -> ScheduledTask:
        """A new task, first due at its schedule's next occurrence."""
        cron = None if cron is None else validate_cron(cron)
        first = next_run(cron, interval_seconds, now or datetime.now(UTC))
        stored = validate_params(kind, params or {})
        try:
            row = await self._db.fetchrow(
                f"""
                INSERT INTO scheduled_task (name, kind, cron, interval_seconds, params, paused, next_run_at)
                VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7)
                RETURNING {_TASK_COLUMNS}
                """,
                name,
                str(kind),
                cron,
                interval_seconds,
                _json(stored),
                paused,
                first,
            )
        except asyncpg.UniqueViolationError as exc:
            raise TaskExistsError(f"a task named {name!r} exists") from exc
        assert row is not None
        return _task(row)

    async def update(self, name: str, change: TaskUpdate) -> ScheduledTask:
        """Apply ``change``; a new schedule (or a resume) recomputes the next
        run from now.  TaskNotFoundError, or ValueError for a bad schedule
        or bad parameters."""
        async with self._transaction() as connection:
            row = await connection.fetchrow(
                f"SELECT {_TASK_COLUMNS} FROM scheduled_task WHERE name = $1 FOR UPDATE", name
            )
            if row is None:
                raise TaskNotFoundError(f"no task named {name!r}")
            task = _task(row)
            cron, interval = task.cron, task.interval_seconds
            if change.cron is not None:
                cron, interval = validate_cron(change.cron), None
            elif change.interval_seconds is not None:
                cron, interval = None, change.interval_seconds
            params = task.params if change.params is None else validate_params(task.kind, change.params)
            paused = task.paused if change.paused is None else change.paused
            rescheduled = (cron, interval) != (task.cron, task.interval_seconds)
            resumed = task.paused and not paused
            next_at = task.next_run_at
            if rescheduled or resumed or next_at is None:
                next_at = next_run(cron, interval, datetime.now(UTC))
            updated = await connection.fetchrow(
                f"""
                UPDATE scheduled_task
                SET cron = $2, interval_seconds = $3, params = $4::text::jsonb, paused = $5,
                    next_run_at = $6, updated_at = now()
                WHERE id = $1
                RETURNING {_TASK_COLUMNS}
                """,
                task.id,
                cron,
                interval,
                _json(params),
                paused,
                next_at,
            )
        assert updated is not None
        return _task(updated)

    async def pause(self, name: str) -> ScheduledTask:
        return await self.update(name, TaskUpdate(paused=True))

    async def resume(self, name: str) -> ScheduledTask:
        return await self.update(name, TaskUpdate(paused=False))

    async def trigger(self, name: str) -> ScheduledTask:
        """Ask for a run now (also of a paused task); the schedule stays."""
        row = await self._db.fetchrow(
            f"""
            UPDATE scheduled_task SET trigger_requested = true, updated_at = now()
            WHERE name = $1 RETURNING {_TASK_COLUMNS}
            """,
            name,
        )
        if row is None:
            raise TaskNotFoundError(f"no task named {name!r}")
        return _task(row)

    async def remove(self, name: str) -> bool:
        result = await self._db.execute("DELETE FROM scheduled_task WHERE name = $1", name)
        return result != "DELETE 0"

    async def runs(self, name: str, *, limit: int = 20, offset: int = 0) -> builtins.list[TaskRun]:
        """The task's runs, newest first."""
        task = await self.require(name)
        rows = await self._db.fetch(
            f"""
            SELECT {_RUN_COLUMNS} FROM task_run WHERE task_id = $1
            ORDER BY started_at DESC, id DESC LIMIT $2 OFFSET $3
            """,
            task.id,
            limit,
            offset,
        )
        return [_run(row) for row in rows]

    async def get_run(self, run_id: int) -> TaskRun | None:
        row = await self._db.fetchrow(f"SELECT {_RUN_COLUMNS} FROM task_run WHERE id = $1", run_id)
        return None if row is None else _run(row)

    # -- retention holds ------------------------------------------------------

    async def hold(
        self, study_instance_uid: str, *, reason: str | None = None, created_by: str | None = None
    ) -> RetentionHold:
        row = await self._db.fetchrow(
            """
            INSERT INTO retention_hold (study_instance_uid, reason, created_by) VALUES ($1, $2, $3)
            ON CONFLICT (study_instance_uid) DO UPDATE
                SET reason = coalesce(EXCLUDED.reason, retention_hold.reason)
            RETURNING study_instance_uid, reason, created_by, created_at
            """,
            study_instance_uid,
            reason,
            created_by,
        )
        assert row is not None
        return RetentionHold.model_validate(dict(row))

    async def unhold(self, study_instance_uid: str) -> bool:
        result = await self._db.execute(
            "DELETE FROM retention_hold WHERE study_instance_uid = $1", study_instance_uid
        )
        return result != "DELETE 0"

    async def holds(self) -> builtins.list[RetentionHold]:
        rows = await self._db.fetch(
            "SELECT study_instance_uid, reason, created_by, created_at FROM retention_hold "
            "ORDER BY created_at, study_instance_uid"
        )
        return [RetentionHold.model_validate(dict(row)) for row in rows]

    # -- the schedulers' side ---------------------------------------------------

    async def schedule_unscheduled(self) -> int:
        """Compute ``next_run_at`` of the tasks that have none yet (seeded
        ones); returns how many were scheduled."""
        rows = await self._db.fetch(
            "SELECT id, cron, interval_seconds FROM scheduled_task WHERE next_run_at IS NULL"
        )
        now = datetime.now(UTC)
        for row in rows:
            await self._db.execute(
                "UPDATE scheduled_task SET next_run_at = $2 WHERE id = $1 AND next_run_at IS NULL",
                row["id"],
                next_run(row["cron"], row["interval_seconds"], now),
            )
        return len(rows)

    async def claim(self, runner_id: str, lease_seconds: float) -> Claim | None:
        """Take one due task (or one a trigger asked for), if any: lease it,
        advance its schedule, record its run; a run left ``running`` by a
        runner whose lease expired is recorded as interrupted first."""
        async with self._transaction() as connection:
            row = await connection.fetchrow(
                f"""
                SELECT {_TASK_COLUMNS}, state::text AS state, now() AS now FROM scheduled_task
                WHERE {_DUE}
                ORDER BY trigger_requested DESC, next_run_at NULLS LAST, id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
                """
            )
            if row is None:
                return None
            values = dict(row)
            now: datetime = values.pop("now")
            state: dict[str, Any] = json.loads(values.pop("state"))
            task = _task(values)
            await connection.execute(
                """
                UPDATE task_run SET status = 'interrupted', finished_at = now(),
                    error = coalesce(error, 'the runner stopped without finishing (lease expired)')
                WHERE task_id = $1 AND status = 'running'
                """,
                task.id,
            )
            due = task.next_run_at is not None and task.next_run_at <= now
            scheduled_run = due and not task.paused
            trigger = (
                RunTrigger.SCHEDULED if scheduled_run and not task.trigger_requested else RunTrigger.MANUAL
            )
            next_at = task.next_run_at
            if due or next_at is None:
                next_at = next_run(task.cron, task.interval_seconds, now)
            run_row = await connection.fetchrow(
                f"""
                INSERT INTO task_run (task_id, task_name, trigger, runner_id, started_at)
                VALUES ($1, $2, $3, $4, now())
                RETURNING {_RUN_COLUMNS}
                """,
                task.id,
                task.name,
                str(trigger),
                runner_id,
            )
            assert run_row is not None
            run = _run(run_row)
            claimed = await connection.fetchrow(
                f"""
                UPDATE scheduled_task
                SET lease_owner = $2, lease_expires_at = now() + make_interval(secs => $3),
                    trigger_requested = false, next_run_at = $4, last_run_id = $5,
                    last_run_status = 'running', last_run_started_at = now(), last_run_finished_at = NULL
                WHERE id = $1
                RETURNING {_TASK_COLUMNS}
                """,
                task.id,
                runner_id,
                float(lease_seconds),
                next_at,
                run.id,
            )
        assert claimed is not None
        return Claim(task=_task(claimed), run=run, state=state)

    async def renew(self, task_id: int, runner_id: str, lease_seconds: float) -> bool:
        """Extend the lease; False when this runner no longer holds it."""
        renewed = await self._db.fetchval(
            """
            UPDATE scheduled_task SET lease_expires_at = now() + make_interval(secs => $3)
            WHERE id = $1 AND lease_owner = $2 RETURNING id
            """,
            task_id,
            runner_id,
            float(lease_seconds),
        )
        return renewed is not None

    async def save_state(self, task_id: int, runner_id: str, state: dict[str, Any]) -> bool:
        """Keep the task's state (e.g. a cursor) while it runs; False when
        this runner no longer holds the lease (nothing is written)."""
        saved = await self._db.fetchval(
            """
            UPDATE scheduled_task SET state = $3::text::jsonb
            WHERE id = $1 AND lease_owner = $2 RETURNING id
            """,
            task_id,
            runner_id,
            _json(state),
        )
        return saved is not None

    async def finish(
        self,
        claim: Claim,
        runner_id: str,
        status: RunStatus,
        *,
        summary: dict[str, Any],
        error: str | None = None,
        run_again_now: bool = False,
    ) -> TaskRun:
        """Record how the run ended and release the lease; ``run_again_now``
        makes the task due at once (an interrupted run resumes at the next
        scheduler's look)."""
        async with self._transaction() as connection:
            run_row = await connection.fetchrow(
                f"""
                UPDATE task_run SET status = $2, finished_at = now(), summary = $3::text::jsonb, error = $4
                WHERE id = $1
                RETURNING {_RUN_COLUMNS}
                """,
                claim.run.id,
                str(status),
                _json(summary),
                error,
            )
            assert run_row is not None
            await connection.execute(
                """
                UPDATE scheduled_task
                SET lease_owner = NULL, lease_expires_at = NULL,
                    last_run_status = CASE WHEN last_run_id = $3 THEN $4 ELSE last_run_status END,
                    last_run_finished_at = CASE WHEN last_run_id = $3 THEN now() ELSE last_run_finished_at END,
                    last_success_at = CASE WHEN $4 = 'succeeded' THEN now() ELSE last_success_at END,
                    next_run_at = CASE WHEN $5 THEN least(next_run_at, now()) ELSE next_run_at END
                WHERE id = $1 AND lease_owner = $2
                """,
                claim.task.id,
                runner_id,
                claim.run.id,
                str(status),
                run_again_now,
            )
        return _run(run_row)
