"""Per-remote rate limits held in PostgreSQL, so they bind every replica:
at most N associations open per remote, and C-MOVEs to one remote spaced
by at least the configured interval.  Each "replica" here has a pool of its
own, as separate processes would."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from pacs_common.db.pool import create_pool
from pacs_common.settings import DatabaseSettings
from prefetch_scheduler.prefetch.throttle import RemoteThrottle


@pytest_asyncio.fixture(loop_scope="session")
async def pools(
    db_pool: asyncpg.Pool, database_settings: DatabaseSettings
) -> AsyncIterator[list[asyncpg.Pool]]:
    other = await create_pool(database_settings, application_name="throttle-replica-2")
    try:
        yield [db_pool, other]
    finally:
        await other.close()


async def test_association_slots_are_shared_by_replicas(pools: list[asyncpg.Pool]) -> None:
    throttles = [RemoteThrottle(pool, max_associations=2, min_move_interval=0) for pool in pools]
    open_now = 0
    most = 0
    slots: set[int] = set()

    async def associate(throttle: RemoteThrottle) -> None:
        nonlocal open_now, most
        async with throttle.association("ORTHANC") as slot:
            slots.add(slot)
            open_now += 1
            most = max(most, open_now)
            await asyncio.sleep(0.05)
            open_now -= 1

    await asyncio.gather(*(associate(throttles[n % 2]) for n in range(8)))
    assert most == 2
    assert slots == {0, 1}
    # Another remote has slots of its own.
    async with (
        throttles[0].association("ORTHANC"),
        throttles[1].association("ORTHANC"),
        asyncio.timeout(5),
        throttles[0].association("OTHER") as slot,
    ):
        assert slot == 0


async def test_moves_to_one_remote_are_spaced_across_replicas(pools: list[asyncpg.Pool]) -> None:
    interval = 0.3
    throttles = [RemoteThrottle(pool, max_associations=4, min_move_interval=interval) for pool in pools]
    starts: list[float] = []

    async def move(throttle: RemoteThrottle) -> None:
        await throttle.pace_move("ORTHANC")
        starts.append(time.monotonic())

    await asyncio.gather(*(move(throttles[n % 2]) for n in range(4)))
    starts.sort()
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    # Never closer than the interval (less a little for the two clocks).
    assert all(gap >= interval * 0.8 for gap in gaps), gaps
