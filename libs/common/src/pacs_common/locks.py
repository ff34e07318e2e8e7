"""Study locks: exclusive or shared, each with an expiry (``study_lock``,
migration 0005).

A holder (a user's subject, or a service such as ``hsm-migrator``) locks a
study so that nobody else deletes or migrates it meanwhile.  Shared locks
go together; an exclusive lock goes with no lock of anybody else.  Locks of
the same holder never conflict with each other.  A lock past its
``expires_at`` no longer counts: every check compares with the database
clock, so expired rows need no sweeping to stop mattering (``acquire``
removes those of the study it touches).

Safe with any number of replicas and no local state: every acquirer of a
study first takes a transaction-scoped advisory lock keyed by the study
UID, so the check for conflicting locks and the insert happen one acquirer
at a time.  :func:`is_locked_by_other` takes the same advisory lock, so a
caller that checks inside its own transaction (delete, the migrator) keeps
new locks out until it commits.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from pydantic import BaseModel, ConfigDict

__all__ = [
    "LockConflictError",
    "LockMode",
    "StudyLock",
    "acquire",
    "get",
    "is_locked_by_other",
    "list_live",
    "release",
]

Connection = asyncpg.Connection | PoolConnectionProxy

#: Namespace of the advisory locks (first key of ``pg_advisory_xact_lock(int, int)``).
_ADVISORY_NAMESPACE: Final = 0x5354_4C4B  # "STLK"
_COLUMNS: Final = "id, study_instance_uid, mode, holder, reason, acquired_at, expires_at"


class LockMode(StrEnum):
    EXCLUSIVE = "exclusive"
    SHARED = "shared"


class StudyLock(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    study_instance_uid: str
    mode: LockMode
    holder: str
    reason: str | None
    acquired_at: datetime
    expires_at: datetime


class LockConflictError(Exception):
    """A live lock of somebody else is incompatible with the one asked for."""

    def __init__(self, conflicting: list[StudyLock]) -> None:
        self.conflicting = conflicting
        holders = ", ".join(sorted({f"{lock.mode} by {lock.holder}" for lock in conflicting}))
        super().__init__(f"the study is locked ({holders})")


def _lock(row: asyncpg.Record) -> StudyLock:
    return StudyLock.model_validate(dict(row))


async def _serialize(connection: Connection, study_instance_uid: str) -> None:
    """Hold the study's advisory lock until the transaction ends."""
    await connection.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))", _ADVISORY_NAMESPACE, study_instance_uid
    )


async def acquire(
    connection: Connection,
    study_instance_uid: str,
    holder: str,
    *,
    mode: LockMode,
    ttl_seconds: float,
    reason: str | None = None,
) -> StudyLock:
    """Lock the study for ``ttl_seconds``; raises :class:`LockConflictError`
    when another holder's live lock is incompatible with ``mode``."""
    if ttl_seconds <= 0:
        raise ValueError("a lock's time to live is positive")
    async with connection.transaction():
        await _serialize(connection, study_instance_uid)
        await connection.execute(
            "DELETE FROM study_lock WHERE study_instance_uid = $1 AND expires_at <= clock_timestamp()",
            study_instance_uid,
        )
        conflicting = await connection.fetch(
            f"""
            SELECT {_COLUMNS} FROM study_lock
            WHERE study_instance_uid = $1 AND holder <> $2 AND expires_at > clock_timestamp()
              AND (mode = 'exclusive' OR $3 = 'exclusive')
            ORDER BY acquired_at
            """,
            study_instance_uid,
            holder,
            str(mode),
        )
        if conflicting:
            raise LockConflictError([_lock(row) for row in conflicting])
        row = await connection.fetchrow(
            f"""
            INSERT INTO study_lock (study_instance_uid, mode, holder, reason, expires_at)
            VALUES ($1, $2, $3, $4, clock_timestamp() + make_interval(secs => $5))
            RETURNING {_COLUMNS}
            """,
            study_instance_uid,
            str(mode),
            holder,
            reason,
            float(ttl_seconds),
        )
    assert row is not None
    return _lock(row)


async def get(connection: Connection, study_instance_uid: str, lock_id: uuid.UUID) -> StudyLock | None:
    """The live lock ``lock_id`` of the study, if any."""
    row = await connection.fetchrow(
        f"""
        SELECT {_COLUMNS} FROM study_lock
        WHERE id = $1 AND study_instance_uid = $2 AND expires_at > clock_timestamp()
        """,
        lock_id,
        study_instance_uid,
    )
    return None if row is None else _lock(row)


async def release(
    connection: Connection, study_instance_uid: str, lock_id: uuid.UUID, holder: str | None = None
) -> bool:
    """Remove the lock (only when ``holder`` holds it, unless None); False when there was none."""
    result = await connection.execute(
        """
        DELETE FROM study_lock
        WHERE id = $1 AND study_instance_uid = $2 AND ($3::text IS NULL OR holder = $3)
        """,
        lock_id,
        study_instance_uid,
        holder,
    )
    return result != "DELETE 0"


async def list_live(connection: Connection, study_instance_uid: str) -> list[StudyLock]:
    """The study's locks that have not expired, oldest first."""
    rows = await connection.fetch(
        f"""
        SELECT {_COLUMNS} FROM study_lock
        WHERE study_instance_uid = $1 AND expires_at > clock_timestamp()
        ORDER BY acquired_at, id
        """,
        study_instance_uid,
    )
    return [_lock(row) for row in rows]


async def is_locked_by_other(connection: Connection, study_instance_uid: str, holder: str) -> bool:
    """Whether a live lock of anybody but ``holder`` is on the study.

    Called inside a transaction, it keeps anybody from acquiring a lock on
    the study until that transaction ends (check, then delete or migrate,
    then commit).
    """
    await _serialize(connection, study_instance_uid)
    locked: bool = await connection.fetchval(
        """
        SELECT EXISTS (
            SELECT 1 FROM study_lock
            WHERE study_instance_uid = $1 AND holder <> $2 AND expires_at > clock_timestamp()
        )
        """,
        study_instance_uid,
        holder,
    )
    return locked
