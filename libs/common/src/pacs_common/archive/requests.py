"""Asking for restores of archived instances.

A reader that finds an instance's object archived (the storage raised
:class:`~pacs_common.storage.ObjectArchivedError`) or that the index lists
as NEARLINE / OFFLINE calls :func:`request_restores`: for each instance it
makes sure one live ``restore`` job exists (``INSERT ... ON CONFLICT DO
NOTHING`` on the partial unique index of migration 0008, so concurrent
readers never queue it twice) and marks the instance NEARLINE (its series
and study follow), in one transaction.  The
:class:`~pacs_common.archive.restore.RestoreProcessor` then does the work.

:class:`RestoreRequester` is the async front (dicomweb-api);
:class:`BlockingRestoreRequester` the one for pynetdicom's association
threads, through :class:`~pacs_common.db.blocking.BlockingPool` (the thread
waits; no event loop is blocked).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import asyncpg
from pydantic import BaseModel, ConfigDict

from pacs_common.archive.metrics import RestoreMetrics
from pacs_common.db.blocking import BlockingPool
from pacs_common.hsm.availability import Availability, set_availability
from pacs_common.jobs import JobKind

__all__ = [
    "RESTORABLE",
    "BlockingRestoreRequester",
    "RestoreRequester",
    "RestoreTicket",
    "request_restores",
]

#: Index availabilities a restore can change (UNAVAILABLE cannot be restored).
RESTORABLE: Final = frozenset({Availability.NEARLINE.value, Availability.OFFLINE.value})

# Waits for a restore processor that is working on one of these jobs, so
# that what is read next sees its outcome (job and instance lock order as
# the processor's: no deadlock).
_LOCK_LIVE_SQL: Final = """
SELECT id FROM job
WHERE kind = 'restore' AND state IN ('queued', 'running')
  AND params->>'sop_instance_uid' = ANY($1::text[])
ORDER BY id
FOR UPDATE
"""
_INSTANCES_SQL: Final = """
SELECT i.pk, i.sop_instance_uid, i.availability,
       st.study_instance_uid, se.series_instance_uid, l.tier, l.key
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
JOIN instance_location l ON l.instance_fk = i.pk
WHERE i.sop_instance_uid = ANY($1::text[])
ORDER BY i.sop_instance_uid
"""
_INSERT_SQL: Final = f"""
INSERT INTO job (kind, params, created_by)
SELECT '{JobKind.RESTORE}', p, $2 FROM jsonb_array_elements($1::jsonb) AS p
ON CONFLICT ((params->>'sop_instance_uid'))
    WHERE kind = 'restore' AND state IN ('queued', 'running')
DO NOTHING
RETURNING id, params->>'sop_instance_uid' AS sop_instance_uid
"""
_LIVE_SQL: Final = """
SELECT id, params->>'sop_instance_uid' AS sop_instance_uid
FROM job
WHERE kind = 'restore' AND state IN ('queued', 'running')
  AND params->>'sop_instance_uid' = ANY($1::text[])
"""


class RestoreTicket(BaseModel):
    """An instance whose restore is under way."""

    model_config = ConfigDict(frozen=True)

    sop_instance_uid: str
    study_instance_uid: str
    tier: str
    # The live restore job (None only when it finished while being looked up).
    job_id: int | None
    # True when this request created the job.
    created: bool


async def request_restores(
    pool: asyncpg.Pool,
    sop_instance_uids: Iterable[str],
    *,
    requested_by: str | None = None,
    metrics: RestoreMetrics | None = None,
    found_archived: bool = True,
) -> list[RestoreTicket]:
    """One live restore job per instance named (the ones not in the index
    are skipped), instances that were ONLINE marked NEARLINE.

    ``found_archived``: the caller read the objects and the storage said
    archived.  False: the caller only saw NEARLINE / OFFLINE in the index
    (a query answered a moment ago); instances the index now lists ONLINE
    were restored meanwhile and are skipped, so a finished restore is not
    asked for again."""
    uids = sorted(set(sop_instance_uids))
    if not uids:
        return []
    async with pool.acquire() as connection, connection.transaction():
        await connection.fetch(_LOCK_LIVE_SQL, uids)
        rows = await connection.fetch(_INSTANCES_SQL, uids)
        if not found_archived:
            rows = [row for row in rows if row["availability"] != Availability.ONLINE]
        if not rows:
            return []
        params = [
            {
                "sop_instance_uid": row["sop_instance_uid"],
                "study_instance_uid": row["study_instance_uid"],
                "series_instance_uid": row["series_instance_uid"],
                "tier": row["tier"],
                "key": row["key"],
            }
            for row in rows
        ]
        created = {
            r["sop_instance_uid"]: r["id"] for r in await connection.fetch(_INSERT_SQL, params, requested_by)
        }
        found = [row["sop_instance_uid"] for row in rows]
        live = {r["sop_instance_uid"]: r["id"] for r in await connection.fetch(_LIVE_SQL, found)}
        online = [row["pk"] for row in rows if row["availability"] == Availability.ONLINE]
        if online:
            await set_availability(connection, online, Availability.NEARLINE)
    if metrics is not None:
        for row in rows:
            if row["sop_instance_uid"] in created:
                metrics.requested.labels(row["tier"]).inc()
    return [
        RestoreTicket(
            sop_instance_uid=row["sop_instance_uid"],
            study_instance_uid=row["study_instance_uid"],
            tier=row["tier"],
            job_id=created.get(row["sop_instance_uid"], live.get(row["sop_instance_uid"])),
            created=row["sop_instance_uid"] in created,
        )
        for row in rows
    ]


class RestoreRequester:
    """:func:`request_restores` on a pool, for async services."""

    def __init__(
        self, pool: asyncpg.Pool, *, requested_by: str | None = None, metrics: RestoreMetrics | None = None
    ) -> None:
        self._pool = pool
        self._requested_by = requested_by
        self._metrics = metrics

    async def request(
        self, sop_instance_uids: Iterable[str], *, found_archived: bool = True
    ) -> list[RestoreTicket]:
        return await request_restores(
            self._pool,
            sop_instance_uids,
            requested_by=self._requested_by,
            metrics=self._metrics,
            found_archived=found_archived,
        )


class BlockingRestoreRequester:
    """:func:`request_restores` from plain threads (pynetdicom handlers)."""

    def __init__(
        self,
        pool: BlockingPool,
        *,
        requested_by: str | None = None,
        metrics: RestoreMetrics | None = None,
        timeout_seconds: float = 10.0,
    ) -> None:
        self._pool = pool
        self._requested_by = requested_by
        self._metrics = metrics
        self._timeout = timeout_seconds

    def request(
        self, sop_instance_uids: Sequence[str], *, found_archived: bool = True
    ) -> list[RestoreTicket]:
        uids = list(sop_instance_uids)
        return self._pool.run(
            lambda pool: request_restores(
                pool,
                uids,
                requested_by=self._requested_by,
                metrics=self._metrics,
                found_archived=found_archived,
            ),
            timeout=self._timeout,
        )
