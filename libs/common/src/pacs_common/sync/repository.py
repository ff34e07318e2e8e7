"""``sync_relation``, ``sync_run`` and ``sync_conflict`` over asyncpg.

A run is claimed once across replicas: the claim locks the due relation
(``FOR UPDATE SKIP LOCKED``) and inserts its ``running`` run under a lease;
the partial unique index allows one running run per relation.  A run whose
lease expired (its replica died) is failed by the next claim."""

from __future__ import annotations

import builtins
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from pacs_common.sync.models import (
    RunState,
    RunTrigger,
    ScheduleKind,
    SyncConflict,
    SyncRelation,
    SyncRelationCreate,
    SyncRun,
)
from pacs_common.tasks.schedule import next_run

__all__ = ["RelationExistsError", "RelationNotFoundError", "RunCounts", "RunningClaim", "SyncRepository"]

Executor = asyncpg.Pool | asyncpg.Connection
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

_RELATION = (
    "id, name, remote_ae_title, direction, filter::text AS filter, schedule_kind, interval_seconds, cron_expression, "
    "conflict_policy, compare_content, enabled, next_run_at, run_requested_at, created_at, updated_at"
)
_RUN = (
    "id, relation_id, trigger, state, started_at, finished_at, studies_compared, studies_different, "
    "instances_pulled, instances_pushed, instances_failed, conflicts, error, details::text AS details"
)
_CONFLICT = (
    "id, relation_id, run_id, sop_instance_uid, study_instance_uid, local_sha256, remote_sha256, "
    "policy, resolution, detected_at"
)


class RelationExistsError(Exception):
    """A relation with this name exists already."""


class RelationNotFoundError(LookupError):
    """No relation with this name."""


@dataclass(frozen=True)
class RunningClaim:
    relation: SyncRelation
    run_id: int
    token: uuid.UUID
    trigger: RunTrigger


@dataclass
class RunCounts:
    studies_compared: int = 0
    studies_different: int = 0
    instances_pulled: int = 0
    instances_pushed: int = 0
    instances_failed: int = 0
    conflicts: int = 0


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _relation(row: asyncpg.Record) -> SyncRelation:
    values = dict(row)
    values["filter"] = _loads(values["filter"])
    return SyncRelation.model_validate(values)


def _run(row: asyncpg.Record) -> SyncRun:
    values = dict(row)
    values["details"] = _loads(values["details"])
    return SyncRun.model_validate(values)


def first_run_at(relation: SyncRelationCreate, now: datetime) -> datetime | None:
    """When a new (or re-enabled) relation runs first."""
    if relation.schedule_kind in (ScheduleKind.INTERVAL, ScheduleKind.CONTINUOUS):
        return now
    if relation.schedule_kind is ScheduleKind.CRON:
        return next_run(relation.cron_expression, None, now)
    return None


def following_run_at(relation: SyncRelationCreate, now: datetime, continuous_pause: float) -> datetime | None:
    """When a relation runs again after a run that ended ``now``."""
    if relation.schedule_kind is ScheduleKind.INTERVAL:
        return next_run(None, relation.interval_seconds, now)
    if relation.schedule_kind is ScheduleKind.CRON:
        return next_run(relation.cron_expression, None, now)
    if relation.schedule_kind is ScheduleKind.CONTINUOUS:
        return now + timedelta(seconds=continuous_pause)
    return None


class SyncRepository:
    def __init__(self, db: Executor) -> None:
        self._db = db

    # -- relations ------------------------------------------------------------

    async def add(self, relation: SyncRelationCreate) -> SyncRelation:
        try:
            row = await self._db.fetchrow(
                f"""
                INSERT INTO sync_relation (name, remote_ae_title, direction, filter, schedule_kind,
                    interval_seconds, cron_expression, conflict_policy, enabled, next_run_at, compare_content)
                VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8, $9, $10, $11)
                RETURNING {_RELATION}
                """,
                relation.name,
                relation.remote_ae_title,
                str(relation.direction),
                relation.filter.model_dump_json(),
                str(relation.schedule_kind),
                relation.interval_seconds,
                relation.cron_expression,
                str(relation.conflict_policy),
                relation.enabled,
                first_run_at(relation, datetime.now(UTC)),
                relation.compare_content,
            )
        except asyncpg.UniqueViolationError:
            raise RelationExistsError(f"sync relation {relation.name} exists already") from None
        assert row is not None
        return _relation(row)

    async def list(self) -> builtins.list[SyncRelation]:
        rows = await self._db.fetch(f"SELECT {_RELATION} FROM sync_relation ORDER BY name")
        return [_relation(r) for r in rows]

    async def get(self, name: str) -> SyncRelation | None:
        row = await self._db.fetchrow(f"SELECT {_RELATION} FROM sync_relation WHERE name = $1", name)
        return None if row is None else _relation(row)

    async def require(self, name: str) -> SyncRelation:
        relation = await self.get(name)
        if relation is None:
            raise RelationNotFoundError(f"no sync relation {name}")
        return relation

    async def remove(self, name: str) -> bool:
        result: str = await self._db.execute("DELETE FROM sync_relation WHERE name = $1", name)
        return result != "DELETE 0"

    async def request_run(self, name: str) -> SyncRelation:
        """Ask for a run as soon as a replica is free (whatever the schedule)."""
        row = await self._db.fetchrow(
            f"""
            UPDATE sync_relation SET run_requested_at = now(), updated_at = now()
            WHERE name = $1 RETURNING {_RELATION}
            """,
            name,
        )
        if row is None:
            raise RelationNotFoundError(f"no sync relation {name}")
        return _relation(row)

    # -- runs -----------------------------------------------------------------

    async def claim(self, lease_seconds: float) -> RunningClaim | None:
        """The first due relation, with its new running run; None: nothing due."""
        pool_or_conn = self._db
        async with _connection(pool_or_conn) as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE sync_run SET state = 'failed', finished_at = now(), claim_token = NULL,
                    error = 'the replica running it stopped (lease expired)'
                WHERE state = 'running' AND lease_expires_at < now()
                """
            )
            row = await conn.fetchrow(
                f"""
                SELECT {_RELATION} FROM sync_relation r
                WHERE enabled
                  AND (run_requested_at IS NOT NULL OR (schedule_kind <> 'manual' AND next_run_at <= now()))
                  AND NOT EXISTS (SELECT 1 FROM sync_run s WHERE s.relation_id = r.id AND s.state = 'running')
                ORDER BY coalesce(run_requested_at, next_run_at), id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
                """
            )
            if row is None:
                return None
            relation = _relation(row)
            trigger = RunTrigger.MANUAL if relation.run_requested_at is not None else RunTrigger.SCHEDULE
            token = uuid.uuid4()
            run_id: int = await conn.fetchval(
                """
                INSERT INTO sync_run (relation_id, trigger, claim_token, lease_expires_at)
                VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING id
                """,
                relation.id,
                str(trigger),
                token,
                lease_seconds,
            )
            await conn.execute(
                "UPDATE sync_relation SET run_requested_at = NULL, next_run_at = NULL WHERE id = $1",
                relation.id,
            )
        return RunningClaim(relation, run_id, token, trigger)

    async def renew(self, claim: RunningClaim, lease_seconds: float) -> bool:
        result: str = await self._db.execute(
            """
            UPDATE sync_run SET lease_expires_at = now() + make_interval(secs => $3)
            WHERE id = $1 AND claim_token = $2 AND state = 'running'
            """,
            claim.run_id,
            claim.token,
            lease_seconds,
        )
        return result != "UPDATE 0"

    async def finish(
        self,
        claim: RunningClaim,
        state: RunState,
        counts: RunCounts,
        *,
        error: str | None = None,
        details: dict[str, Any] | None = None,
        continuous_pause: float = 5.0,
    ) -> None:
        now = datetime.now(UTC)
        async with _connection(self._db) as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE sync_run SET state = $3, finished_at = now(), claim_token = NULL,
                    lease_expires_at = NULL, studies_compared = $4, studies_different = $5,
                    instances_pulled = $6, instances_pushed = $7, instances_failed = $8, conflicts = $9,
                    error = $10, details = $11::text::jsonb
                WHERE id = $1 AND claim_token = $2
                """,
                claim.run_id,
                claim.token,
                str(state),
                counts.studies_compared,
                counts.studies_different,
                counts.instances_pulled,
                counts.instances_pushed,
                counts.instances_failed,
                counts.conflicts,
                error,
                json.dumps(details or {}),
            )
            current = await conn.fetchrow(
                f"SELECT {_RELATION} FROM sync_relation WHERE id = $1", claim.relation.id
            )
            if current is not None:
                relation = _relation(current)
                await conn.execute(
                    "UPDATE sync_relation SET next_run_at = $2 WHERE id = $1",
                    relation.id,
                    following_run_at(relation, now, continuous_pause),
                )

    async def get_run(self, run_id: int) -> SyncRun | None:
        row = await self._db.fetchrow(f"SELECT {_RUN} FROM sync_run WHERE id = $1", run_id)
        return None if row is None else _run(row)

    async def history(self, name: str, *, limit: int = 20) -> builtins.list[SyncRun]:
        rows = await self._db.fetch(
            f"""
            SELECT {", ".join("s." + c.strip() for c in _RUN.split(","))}
            FROM sync_run s JOIN sync_relation r ON r.id = s.relation_id
            WHERE r.name = $1 ORDER BY s.started_at DESC, s.id DESC LIMIT $2
            """,
            name,
            limit,
        )
        return [_run(r) for r in rows]

    async def latest_run_after(self, name: str, after_run_id: int) -> SyncRun | None:
        rows = await self.history(name, limit=1)
        return rows[0] if rows and rows[0].id > after_run_id else None

    # -- conflicts ------------------------------------------------------------

    async def record_conflict(
        self,
        claim: RunningClaim,
        *,
        sop_instance_uid: str,
        study_instance_uid: str | None,
        local_sha256: str | None,
        remote_sha256: str | None,
        resolution: str,
        superseded_pk: int | None = None,
    ) -> bool:
        """True when recorded (a superseded object, or a pair of contents, is recorded once per relation)."""
        row = await self._db.fetchrow(
            """
            INSERT INTO sync_conflict (relation_id, run_id, sop_instance_uid, study_instance_uid,
                local_sha256, remote_sha256, policy, resolution, superseded_pk)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT DO NOTHING
            RETURNING id
            """,
            claim.relation.id,
            claim.run_id,
            sop_instance_uid,
            study_instance_uid,
            local_sha256,
            remote_sha256,
            str(claim.relation.conflict_policy),
            resolution,
            superseded_pk,
        )
        return row is not None

    async def conflicts(self, name: str, *, limit: int = 100) -> builtins.list[SyncConflict]:
        rows = await self._db.fetch(
            f"""
            SELECT {", ".join("c." + c.strip() for c in _CONFLICT.split(","))}
            FROM sync_conflict c JOIN sync_relation r ON r.id = c.relation_id
            WHERE r.name = $1 ORDER BY c.detected_at DESC, c.id DESC LIMIT $2
            """,
            name,
            limit,
        )
        return [SyncConflict.model_validate(dict(r)) for r in rows]


@contextlib.asynccontextmanager
async def _connection(db: Executor) -> AsyncIterator[Connection]:
    """A connection of the pool (or the connection given), for a transaction."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db
