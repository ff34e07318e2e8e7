"""Last access of instances and studies (``last_accessed_at``), for tier
policies: WADO-RS, C-MOVE and C-GET record what they read here.

Reads never wait on the database: :meth:`record` only updates an in-memory
map (per instance and per study, the newest time wins), and a background
flush writes it every ``flush_interval_seconds`` in two set-based
statements, however many frames or instances were read.  Rows are locked in
UID order, instances before studies (the indexer's order), and a timestamp
only ever moves forward.  A flush that fails keeps its entries for the next
one; stopping flushes what is left.

:class:`AsyncAccessRecorder` runs on an event loop (dicomweb-api);
:class:`ThreadedAccessRecorder` serves pynetdicom threads (the gateway),
flushing from a thread of its own through a
:class:`~pacs_common.db.blocking.BlockingPool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import asyncpg

from pacs_common.archive.settings import AccessSettings
from pacs_common.db.blocking import BlockingPool

__all__ = [
    "AccessBatch",
    "AsyncAccessRecorder",
    "PendingAccess",
    "ThreadedAccessRecorder",
    "write_access",
]

logger = logging.getLogger(__name__)

_INSTANCES_SQL: Final = """
WITH v AS (SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS v (uid, at)),
target AS (
    SELECT i.pk, v.at FROM instance i JOIN v ON v.uid = i.sop_instance_uid
    WHERE i.last_accessed_at IS NULL OR i.last_accessed_at < v.at
    ORDER BY i.sop_instance_uid
    FOR UPDATE OF i
)
UPDATE instance i SET last_accessed_at = target.at FROM target WHERE i.pk = target.pk
"""
_STUDIES_SQL: Final = """
WITH v AS (SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS v (uid, at)),
target AS (
    SELECT s.pk, v.at FROM study s JOIN v ON v.uid = s.study_instance_uid
    WHERE s.last_accessed_at IS NULL OR s.last_accessed_at < v.at
    ORDER BY s.study_instance_uid
    FOR UPDATE OF s
)
UPDATE study s SET last_accessed_at = target.at FROM target WHERE s.pk = target.pk
"""


@dataclass
class AccessBatch:
    """Accesses to write: UID → newest access time."""

    instances: dict[str, datetime] = field(default_factory=dict)
    studies: dict[str, datetime] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.instances or self.studies)


class PendingAccess:
    """The coalescing map (not thread-safe by itself)."""

    def __init__(self) -> None:
        self._batch = AccessBatch()

    def add(self, study_instance_uid: str, sop_instance_uids: Iterable[str], at: datetime) -> None:
        _newest(self._batch.studies, study_instance_uid, at)
        for uid in sop_instance_uids:
            _newest(self._batch.instances, uid, at)

    def take(self) -> AccessBatch:
        batch, self._batch = self._batch, AccessBatch()
        return batch

    def merge(self, batch: AccessBatch) -> None:
        """Put back what a failed flush took."""
        for uid, at in batch.instances.items():
            _newest(self._batch.instances, uid, at)
        for uid, at in batch.studies.items():
            _newest(self._batch.studies, uid, at)

    def __len__(self) -> int:
        return len(self._batch.instances)


def _newest(entries: dict[str, datetime], uid: str, at: datetime) -> None:
    current = entries.get(uid)
    if current is None or current < at:
        entries[uid] = at


async def write_access(pool: asyncpg.Pool, batch: AccessBatch) -> None:
    """Write one batch: instances, then studies (each statement commits alone)."""
    if batch.instances:
        uids = sorted(batch.instances)
        await pool.execute(_INSTANCES_SQL, uids, [batch.instances[u] for u in uids])
    if batch.studies:
        uids = sorted(batch.studies)
        await pool.execute(_STUDIES_SQL, uids, [batch.studies[u] for u in uids])


class AsyncAccessRecorder:
    """Records accesses on an event loop; flushes in a background task."""

    def __init__(self, pool: asyncpg.Pool, settings: AccessSettings | None = None) -> None:
        self._pool = pool
        self._settings = settings or AccessSettings()
        self._pending = PendingAccess()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def record(self, study_instance_uid: str, sop_instance_uids: Iterable[str]) -> None:
        """Note that these instances of the study were read now (no I/O)."""
        if not self._settings.enabled:
            return
        self._pending.add(study_instance_uid, sop_instance_uids, datetime.now(UTC))
        if len(self._pending) >= self._settings.max_pending:
            self._wake.set()

    async def flush(self) -> None:
        """Write what was recorded so far (after a flush already under way)."""
        async with self._flushing:
            batch = self._pending.take()
            if not batch:
                return
            try:
                await write_access(self._pool, batch)
            except Exception as exc:
                self._pending.merge(batch)
                logger.warning("last access not written, kept for the next flush: %s", exc)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="access-recorder")

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.flush_interval_seconds):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def aclose(self) -> None:
        """Stop the background flushes and write what is left."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()


class ThreadedAccessRecorder:
    """Records accesses from any thread; a thread of its own flushes."""

    def __init__(self, pool: BlockingPool, settings: AccessSettings | None = None) -> None:
        self._pool = pool
        self._settings = settings or AccessSettings()
        self._pending = PendingAccess()
        self._lock = threading.Lock()  # guards the pending map
        self._flushing = threading.Lock()  # one flush at a time
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def record(self, study_instance_uid: str, sop_instance_uids: Iterable[str]) -> None:
        """Note that these instances of the study were read now (no I/O)."""
        if not self._settings.enabled:
            return
        at = datetime.now(UTC)
        with self._lock:
            self._pending.add(study_instance_uid, sop_instance_uids, at)
            full = len(self._pending) >= self._settings.max_pending
        if full:
            self._wake.set()

    def flush(self) -> None:
        """Write what was recorded so far (after a flush already under way)."""
        with self._flushing:
            with self._lock:
                batch = self._pending.take()
            if not batch:
                return
            try:
                self._pool.run(lambda pool: write_access(pool, batch))
            except Exception as exc:
                with self._lock:
                    self._pending.merge(batch)
                logger.warning("last access not written, kept for the next flush: %s", exc)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-recorder", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._settings.flush_interval_seconds)
            self._wake.clear()
            if not self._stopping:
                self.flush()

    def stop(self) -> None:
        """Stop the flushing thread and write what is left (before the pool stops)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()
