"""``hsm_move`` rows: the recorded intent of each move and how far it got.

Every change of a move is one conditional UPDATE that names the state it
expects and the lease owner, so a migrator that lost its lease (it was too
slow, another replica took the move over) cannot push the move further:
its next transition fails with :class:`LeaseLostError` and it stops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from pacs_common.hsm.policy import Selection, selection_args, selection_sql

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["LeaseLostError", "Move", "MoveState", "MoveStore", "TargetPlan"]


class MoveState(StrEnum):
    PENDING = "pending"
    COPIED = "copied"
    VERIFIED = "verified"
    SWITCHED = "switched"
    DONE = "done"
    FAILED = "failed"
    ABANDONED = "abandoned"


FINAL_STATES: Final = frozenset({MoveState.DONE, MoveState.FAILED, MoveState.ABANDONED})

_COLUMNS: Final = (
    "pk, instance_fk, run_fk, study_instance_uid, state, source_tier, source_backend, source_key, "
    "size, sha256, target_tier, target_backend, target_key, target_availability, target_written, "
    "attempts, error"
)


class LeaseLostError(Exception):
    """Another migrator owns the move now (or it changed under us)."""


@dataclass(frozen=True, slots=True)
class Move:
    pk: int
    instance_fk: int
    run_fk: int | None
    study_instance_uid: str
    state: MoveState
    source_tier: str
    source_backend: str
    source_key: str
    size: int
    sha256: str
    target_tier: str
    target_backend: str
    target_key: str
    target_availability: str
    target_written: bool
    attempts: int
    error: str | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Move:
        values = dict(row)
        values["state"] = MoveState(values["state"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class TargetPlan:
    """Where a selection's instances go: the tier's backend and the
    availability an instance has there."""

    tier: str
    backend: str
    availability: str


class MoveStore:
    """The moves of one migrator (``owner``), over the pool."""

    def __init__(self, pool: asyncpg.Pool, owner: str, *, lease_seconds: float) -> None:
        self._pool = pool
        self.owner = owner
        self._lease = float(lease_seconds)

    # -- runs ------------------------------------------------------------------

    async def start_run(
        self, trigger: str, *, job_id: int | None, params: dict[str, Any], dry_run: bool
    ) -> int:
        pk: int = await self._pool.fetchval(
            """
            INSERT INTO hsm_run (trigger, job_id, owner, params, dry_run) VALUES ($1, $2, $3, $4, $5)
            RETURNING pk
            """,
            trigger,
            job_id,
            self.owner,
            params,
            dry_run,
        )
        return pk

    async def finish_run(
        self, run_pk: int, *, planned: int, moved: int, moved_bytes: int, failed: int, discard: bool = False
    ) -> None:
        """Record what the run did; ``discard``: forget the run instead (a
        policy pass that found nothing to do: one every interval per
        replica would be noise), unless a move names it."""
        if discard:
            await self._pool.execute(
                "DELETE FROM hsm_run r WHERE pk = $1 AND NOT EXISTS (SELECT 1 FROM hsm_move m WHERE m.run_fk = r.pk)",
                run_pk,
            )
        await self._pool.execute(
            """
            UPDATE hsm_run SET planned = $2, moved = $3, moved_bytes = $4, failed = $5, finished_at = now()
            WHERE pk = $1
            """,
            run_pk,
            planned,
            moved,
            moved_bytes,
            failed,
        )

    async def renew(self, move_pk: int) -> bool:
        """Extend the lease of a move in progress; False once it is not ours."""
        result = await self._pool.execute(
            """
            UPDATE hsm_move SET lease_expires_at = clock_timestamp() + make_interval(secs => $3)
            WHERE pk = $1 AND lease_owner = $2 AND state NOT IN ('done', 'failed', 'abandoned')
            """,
            move_pk,
            self.owner,
            self._lease,
        )
        return result != "UPDATE 0"

    # -- planning ---------------------------------------------------------------

    async def count(
        self, selection: Selection, *, failure_backoff_seconds: float, lock_holder: str
    ) -> tuple[int, int]:
        """(instances, bytes) ``selection`` matches now."""
        row = await self._pool.fetchrow(
            selection_sql(count=True),
            *selection_args(
                selection, failure_backoff_seconds=failure_backoff_seconds, lock_holder=lock_holder
            ),
        )
        assert row is not None
        return int(row["instances"]), int(row["bytes"])

    async def claim(
        self,
        selection: Selection,
        target: TargetPlan,
        *,
        run_pk: int,
        limit: int,
        failure_backoff_seconds: float,
        lock_holder: str,
    ) -> list[Move]:
        """Record moves for up to ``limit`` instances ``selection`` matches,
        leased to this migrator.  The candidate rows are locked (SKIP
        LOCKED) while the moves are inserted, and the partial unique index
        drops an instance another migrator recorded meanwhile: what is
        returned is this migrator's alone."""
        args = selection_args(
            selection, failure_backoff_seconds=failure_backoff_seconds, lock_holder=lock_holder
        )
        sql = selection_sql(run_pk_param=True)
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(sql, *args, limit, run_pk)
            if not rows:
                return []
            inserted = await connection.fetch(
                f"""
                INSERT INTO hsm_move (
                    instance_fk, run_fk, study_instance_uid, source_tier, source_backend, source_key,
                    size, sha256, target_tier, target_backend, target_key, target_availability,
                    lease_owner, lease_expires_at
                )
                SELECT c.instance_fk, $1, c.study_instance_uid, c.tier, c.backend, c.key,
                       c.size, c.sha256, $2, $3, c.key, $4, $5,
                       clock_timestamp() + make_interval(secs => $6)
                FROM unnest($7::bigint[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::text[],
                            $13::text[])
                     AS c(instance_fk, tier, backend, key, size, sha256, study_instance_uid)
                ORDER BY c.instance_fk
                ON CONFLICT (instance_fk) WHERE state NOT IN ('done', 'failed', 'abandoned') DO NOTHING
                RETURNING {_COLUMNS}
                """,
                run_pk,
                target.tier,
                target.backend,
                target.availability,
                self.owner,
                self._lease,
                [r["instance_fk"] for r in rows],
                [r["tier"] for r in rows],
                [r["backend"] for r in rows],
                [r["key"] for r in rows],
                [r["size"] for r in rows],
                [r["sha256"] for r in rows],
                [r["study_instance_uid"] for r in rows],
            )
        return sorted((Move.from_row(row) for row in inserted), key=lambda m: m.pk)

    async def take_over_expired(self, *, limit: int) -> list[Move]:
        """Open moves whose lease expired (their migrator died or gave them
        back for later), now leased to this migrator."""
        rows = await self._pool.fetch(
            f"""
            UPDATE hsm_move SET lease_owner = $1, lease_expires_at = clock_timestamp() + make_interval(secs => $2),
                                updated_at = now()
            WHERE pk IN (
                SELECT pk FROM hsm_move
                WHERE state IN ('pending', 'copied', 'verified', 'switched')
                  AND (lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp())
                ORDER BY pk LIMIT $3 FOR UPDATE SKIP LOCKED
            )
            RETURNING {_COLUMNS}
            """,
            self.owner,
            self._lease,
            limit,
        )
        return sorted((Move.from_row(row) for row in rows), key=lambda m: m.pk)

    # -- transitions -------------------------------------------------------------

    async def advance(
        self,
        move: Move,
        state: MoveState,
        *,
        connection: Connection | None = None,
        target_key: str | None = None,
        target_written: bool | None = None,
        error: str | None = None,
    ) -> Move:
        """``move`` (in the state it says) → ``state``, lease renewed."""
        db: Any = connection if connection is not None else self._pool
        result = await db.execute(
            """
            UPDATE hsm_move SET
                state = $4,
                target_key = coalesce($5, target_key),
                target_written = coalesce($6, target_written),
                error = coalesce($7, error),
                lease_expires_at = CASE WHEN $4 IN ('done', 'failed', 'abandoned') THEN NULL
                                        ELSE clock_timestamp() + make_interval(secs => $8) END,
                lease_owner = CASE WHEN $4 IN ('done', 'failed', 'abandoned') THEN NULL ELSE lease_owner END,
                switched_at = CASE WHEN $4 = 'switched' THEN now() ELSE switched_at END,
                finished_at = CASE WHEN $4 IN ('done', 'failed', 'abandoned') THEN now() ELSE NULL END,
                updated_at = now()
            WHERE pk = $1 AND lease_owner = $2 AND state = $3
            """,
            move.pk,
            self.owner,
            str(move.state),
            str(state),
            target_key,
            target_written,
            error,
            self._lease,
        )
        if result == "UPDATE 0":
            raise LeaseLostError(f"move {move.pk} is no longer {move.state} under this migrator")
        return replace(
            move,
            state=state,
            target_key=target_key if target_key is not None else move.target_key,
            target_written=target_written if target_written is not None else move.target_written,
            error=error if error is not None else move.error,
        )

    async def record_failure(self, move: Move, error: str, *, retry_in_seconds: float) -> Move:
        """One more failed attempt; the lease is given back to expire in
        ``retry_in_seconds`` (then any migrator tries again)."""
        row = await self._pool.fetchrow(
            f"""
            UPDATE hsm_move SET attempts = attempts + 1, error = $3,
                                lease_expires_at = clock_timestamp() + make_interval(secs => $4),
                                updated_at = now()
            WHERE pk = $1 AND lease_owner = $2 AND state NOT IN ('done', 'failed', 'abandoned')
            RETURNING {_COLUMNS}
            """,
            move.pk,
            self.owner,
            error[:2000],
            float(retry_in_seconds),
        )
        if row is None:
            raise LeaseLostError(f"move {move.pk} is no longer under this migrator")
        return Move.from_row(row)

    async def postpone(self, move: Move, *, seconds: float) -> None:
        """Give the move back, to be taken again in ``seconds``."""
        await self._pool.execute(
            """
            UPDATE hsm_move SET lease_expires_at = clock_timestamp() + make_interval(secs => $3), updated_at = now()
            WHERE pk = $1 AND lease_owner = $2
            """,
            move.pk,
            self.owner,
            float(seconds),
        )

    # -- what references an object ---------------------------------------------

    async def is_referenced(self, move: Move, tier: str, key: str) -> bool:
        """Whether the index still names ``key`` in ``tier`` for the move's
        instance: as its location, or as an object set aside (keys are made
        from the SOP Instance UID, so no other instance names them)."""
        referenced: bool = await self._pool.fetchval(
            """
            SELECT EXISTS (SELECT 1 FROM instance_location WHERE instance_fk = $1 AND tier = $2 AND key = $3)
                OR EXISTS (
                    SELECT 1 FROM instance_superseded s
                    WHERE s.sop_instance_uid = (SELECT sop_instance_uid FROM instance WHERE pk = $1)
                      AND s.tier = $2 AND s.key = $3
                )
            """,
            move.instance_fk,
            tier,
            key,
        )
        return referenced

    async def give_up(self, move_pk: int, error: str) -> Move | None:
        """A move that did not reach its switch → ``failed`` (None when it
        is no longer this migrator's, or already switched: a switched move
        is always finished, never given up)."""
        row = await self._pool.fetchrow(
            f"""
            UPDATE hsm_move SET state = 'failed', error = $3, lease_owner = NULL, lease_expires_at = NULL,
                                finished_at = now(), updated_at = now()
            WHERE pk = $1 AND lease_owner = $2 AND state IN ('pending', 'copied', 'verified')
            RETURNING {_COLUMNS}
            """,
            move_pk,
            self.owner,
            error[:2000],
        )
        return None if row is None else Move.from_row(row)
