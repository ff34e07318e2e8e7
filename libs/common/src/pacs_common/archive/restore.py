"""Working off restore jobs: archived objects back online.

:meth:`RestoreProcessor.run_once` takes the restore jobs that are due, one
at a time in a transaction of its own with ``FOR UPDATE SKIP LOCKED`` (so
several hsm-migrator replicas share the work and never touch the same job),
and for each:

1. looks the instance's *current* location up (it may have moved since the
   request);
2. probes the object with a one-byte read; archived → asks the tier once
   per location to restore it (S3 ``RestoreObject`` for ``days`` at
   ``s3_tier``, Azure ``Set Blob Tier`` rehydration) and probes again;
3. readable → the instance is ONLINE again (series and study recomputed)
   and the job done; still archived → checked again after
   ``check_interval_seconds``; older than ``timeout_seconds``, or the
   object / tier / instance is gone → the job fails.

All storage calls run in threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import CollectorRegistry

from pacs_common.archive.metrics import RestoreMetrics
from pacs_common.archive.settings import RestoreSettings
from pacs_common.hsm.availability import Availability, set_availability
from pacs_common.jobs import JobKind, JobRepository
from pacs_common.storage import (
    ObjectArchivedError,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StorageRegistry,
)

__all__ = ["RestoreProcessor", "RestoreSettings", "start_restore"]

logger = logging.getLogger(__name__)

Connection = asyncpg.Connection | PoolConnectionProxy

_CLAIM_SQL: Final = f"""
SELECT id, state, params, now() - created_at > make_interval(secs => $3) AS timed_out
FROM job
WHERE kind = '{JobKind.RESTORE}' AND state IN ('queued', 'running')
  AND NOT (id = ANY($1::bigint[]))
  AND (state = 'queued' OR updated_at <= now() - make_interval(secs => $2))
ORDER BY updated_at, id
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
_START_SQL: Final = """
UPDATE job SET state = 'running', attempts = attempts + 1, started_at = now(), updated_at = now(),
               progress_total = 1
WHERE id = $1
"""
_LOCATION_SQL: Final = """
SELECT i.pk, l.tier, l.key
FROM instance i JOIN instance_location l ON l.instance_fk = i.pk
WHERE i.sop_instance_uid = $1
"""
_PENDING_SQL: Final = "UPDATE job SET params = $2, updated_at = now() WHERE id = $1"
_DONE_SQL: Final = "UPDATE job SET params = $2, progress_done = 1, progress_total = 1 WHERE id = $1"


class Probe(StrEnum):
    READABLE = "readable"
    ARCHIVED = "archived"
    MISSING = "missing"


def _probe(storage: ObjectStorage, key: str) -> Probe:
    try:
        storage.read_range(key, 0, 1)
    except ObjectArchivedError:
        return Probe.ARCHIVED
    except ObjectNotFoundError:
        return Probe.MISSING
    return Probe.READABLE


def start_restore(storage: ObjectStorage, key: str, settings: RestoreSettings) -> None:
    """Ask the backend to make an archived object readable (blocking; the
    backend completes it asynchronously).  StorageError when the backend has
    no archive tier."""
    if storage.kind == "s3":
        from pacs_common.storage.s3 import S3Storage

        if isinstance(storage, S3Storage):
            storage.restore(key, settings.days, tier=settings.s3_tier)
            return
    if storage.kind == "azure":
        from pacs_common.storage.azure import AzureBlobStorage

        if isinstance(storage, AzureBlobStorage):
            storage.rehydrate(key, settings.azure_tier, priority=settings.azure_priority)
            return
    raise StorageError(f"{storage!r} has no archive tier to restore from")


class RestoreProcessor:
    """Progresses restore jobs; the hsm-migrator calls :meth:`run_once` in its loop."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        storage: StorageRegistry,
        settings: RestoreSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._pool = pool
        self._storage = storage
        self._settings = settings or RestoreSettings()
        self._metrics = RestoreMetrics(registry or CollectorRegistry())

    async def run_once(self) -> int:
        """Progress the restore jobs that are due; how many were progressed."""
        seen: list[int] = []
        while len(seen) < self._settings.batch_size:
            async with self._pool.acquire() as connection, connection.transaction():
                job = await connection.fetchrow(
                    _CLAIM_SQL,
                    seen,
                    self._settings.check_interval_seconds,
                    self._settings.timeout_seconds,
                )
                if job is None:
                    break
                seen.append(int(job["id"]))
                await self._progress(connection, job)
        return len(seen)

    async def _progress(self, connection: Connection, job: asyncpg.Record) -> None:
        job_id = int(job["id"])
        params: dict[str, Any] = dict(job["params"] or {})
        tier = str(params.get("tier", "unknown"))
        jobs = JobRepository(connection)  # type: ignore[arg-type]
        if job["state"] == "queued":
            await connection.execute(_START_SQL, job_id)

        async def fail(reason: str) -> None:
            await jobs.fail(job_id, reason)
            self._metrics.failed.labels(tier).inc()
            logger.warning("restore failed: %s", reason, extra={"job_id": job_id, **params})

        sop_instance_uid = params.get("sop_instance_uid")
        location = await connection.fetchrow(_LOCATION_SQL, sop_instance_uid)
        if location is None:
            await fail(f"instance {sop_instance_uid} is no longer in the index")
            return
        tier, key = str(location["tier"]), str(location["key"])
        try:
            storage = self._storage.get(tier)
        except KeyError as exc:
            await fail(str(exc.args[0]))
            return
        try:
            state = await asyncio.to_thread(_probe, storage, key)
            if state is Probe.ARCHIVED and params.get("restore_requested_key") != f"{tier}/{key}":
                await asyncio.to_thread(start_restore, storage, key, self._settings)
                params["restore_requested_key"] = f"{tier}/{key}"
                params["restore_requested_at"] = datetime.now(UTC).isoformat()
                state = await asyncio.to_thread(_probe, storage, key)
        except StorageError as exc:
            # Transient (network, throttling): try again at the next check.
            params["last_error"] = str(exc)
            state = Probe.ARCHIVED
        if state is Probe.READABLE:
            params.pop("last_error", None)
            await set_availability(connection, [int(location["pk"])], Availability.ONLINE)
            await connection.execute(_DONE_SQL, job_id, params)
            await jobs.complete(job_id)
            self._metrics.completed.labels(tier).inc()
            logger.info("restore completed", extra={"job_id": job_id, "sop_instance_uid": sop_instance_uid})
        elif state is Probe.MISSING:
            await fail(f"object {key} of instance {sop_instance_uid} is missing from tier {tier}")
        elif job["timed_out"]:
            await fail(
                f"object {key} not readable {self._settings.timeout_seconds:.0f} s after the restore was asked for"
                + (f" ({params['last_error']})" if "last_error" in params else "")
            )
        else:
            await connection.execute(_PENDING_SQL, job_id, params)
