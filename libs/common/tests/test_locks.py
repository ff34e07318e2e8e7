"""``pacs_common.locks`` against the real PostgreSQL: conflicts, expiry,
and what delete and the migrator rely on (several replicas = several
connections)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pacs_common import locks
from pacs_common.locks import LockConflictError, LockMode

STUDY = "1.2.3"


async def test_acquire_conflicts_and_release(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as connection:
        lock = await locks.acquire(
            connection, STUDY, "hsm-migrator", mode=LockMode.EXCLUSIVE, ttl_seconds=30, reason="migrating"
        )
        assert await locks.is_locked_by_other(connection, STUDY, "alice")
        assert not await locks.is_locked_by_other(connection, STUDY, "hsm-migrator")
        assert not await locks.is_locked_by_other(connection, "9.9", "alice")
        with pytest.raises(LockConflictError) as refused:
            await locks.acquire(connection, STUDY, "alice", mode=LockMode.SHARED, ttl_seconds=30)
        assert [c.id for c in refused.value.conflicting] == [lock.id]
        assert not await locks.release(connection, STUDY, lock.id, holder="alice")
        assert await locks.release(connection, STUDY, lock.id, holder="hsm-migrator")
        assert not await locks.is_locked_by_other(connection, STUDY, "alice")
        with pytest.raises(ValueError):
            await locks.acquire(connection, STUDY, "alice", mode=LockMode.SHARED, ttl_seconds=0)


async def test_expiry_is_enforced_by_the_database_clock(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as connection:
        await locks.acquire(connection, STUDY, "alice", mode=LockMode.EXCLUSIVE, ttl_seconds=1.0)
        assert await locks.is_locked_by_other(connection, STUDY, "bob")
        await asyncio.sleep(1.2)
        assert not await locks.is_locked_by_other(connection, STUDY, "bob")
        assert await locks.list_live(connection, STUDY) == []
        await locks.acquire(connection, STUDY, "bob", mode=LockMode.EXCLUSIVE, ttl_seconds=30)
        # The expired row went when bob acquired.
        assert await connection.fetchval("SELECT count(*) FROM study_lock") == 1


async def test_a_check_inside_a_transaction_keeps_new_locks_out(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as deleter, db_pool.acquire() as locker:
        async with deleter.transaction():
            assert not await locks.is_locked_by_other(deleter, STUDY, "admin")
            attempt = asyncio.create_task(
                locks.acquire(locker, STUDY, "alice", mode=LockMode.SHARED, ttl_seconds=30)
            )
            await asyncio.sleep(0.2)
            assert not attempt.done()  # waits for the deleter's commit
        lock = await attempt
        assert lock.holder == "alice"


async def test_replicas_racing_for_an_exclusive_lock(db_pool: asyncpg.Pool) -> None:
    async def one(n: int) -> bool:
        async with db_pool.acquire() as connection:
            try:
                await locks.acquire(
                    connection, STUDY, f"replica-{n}", mode=LockMode.EXCLUSIVE, ttl_seconds=30
                )
            except LockConflictError:
                return False
            return True

    granted = await asyncio.gather(*(one(n) for n in range(6)))
    assert sorted(granted) == [False] * 5 + [True]
