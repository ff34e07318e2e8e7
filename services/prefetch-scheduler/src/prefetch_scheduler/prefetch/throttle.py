"""Per-remote rate limits that hold across every scheduler replica.

* At most ``max_associations`` open associations per remote PACS: each is a
  slot, a session advisory lock ``(remote key, slot)`` held on a pooled
  connection while the association is open (a crashed replica's
  connection closes and its slots free themselves).
* At least ``min_move_interval`` between two C-MOVEs to one remote: a
  replica reserves the next start time in ``prefetch_remote_pace`` (one
  UPDATE, so two replicas never get the same time) and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator
from typing import Final

import asyncpg

__all__ = ["RemoteThrottle"]

_SLOT_POLL_SECONDS: Final = 0.2
# The first key of the two-key advisory locks: "prefetch remote" (int4).
_INT4_MASK: Final = 0xFFFFFFFF
_INT4_SIGN: Final = 0x80000000


def _int4(value: int) -> int:
    value &= _INT4_MASK
    return value - (1 << 32) if value & _INT4_SIGN else value


def remote_key(ae_title: str) -> int:
    """A stable int4 for an AE title (the advisory lock's first key)."""
    return _int4(zlib.crc32(f"pacs-prefetch-remote:{ae_title}".encode()))


class RemoteThrottle:
    def __init__(self, pool: asyncpg.Pool, *, max_associations: int, min_move_interval: float) -> None:
        self._pool = pool
        self._max = max_associations
        self._interval = min_move_interval

    @contextlib.asynccontextmanager
    async def association(self, ae_title: str) -> AsyncIterator[int]:
        """Hold one of the remote's association slots (waiting for one); yields its number."""
        key = remote_key(ae_title)
        async with self._pool.acquire() as connection:
            slot = await self._take_slot(connection, key)
            try:
                yield slot
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1::int4, $2::int4)", key, slot)

    async def _take_slot(self, connection: asyncpg.pool.PoolConnectionProxy, key: int) -> int:
        while True:
            for slot in range(self._max):
                if await connection.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", key, slot):
                    return slot
            await asyncio.sleep(_SLOT_POLL_SECONDS)

    async def pace_move(self, ae_title: str) -> None:
        """Wait for this replica's turn to start a C-MOVE at ``ae_title``."""
        if self._interval <= 0:
            return
        wait: float = await self._pool.fetchval(
            """
            INSERT INTO prefetch_remote_pace AS p (ae_title, next_move_at)
            VALUES ($1, now() + make_interval(secs => $2))
            ON CONFLICT (ae_title) DO UPDATE
                SET next_move_at = greatest(p.next_move_at, now()) + make_interval(secs => $2)
            RETURNING greatest(0, extract(epoch FROM next_move_at - now()) - $2)::float8
            """,
            ae_title,
            self._interval,
        )
        if wait > 0:
            await asyncio.sleep(wait)
