"""Finding one stored instance for the pixel and bulk data resources: where
its object is, its availability, its pixel module, and the bulk values
asked for; and what every retrieval answers for an archived instance.

One statement per request, reading only the metadata elements and bulk data
entries needed (the metadata of a large instance can be big).

An instance the index lists as NEARLINE / OFFLINE, or whose object turns
out archived when read, is not served: a restore is requested (one restore
job per instance, see :mod:`pacs_common.archive.requests`) and the answer is
``503 Service Unavailable`` with ``Retry-After`` and a JSON body naming the
instances and their restore jobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import asyncpg
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict

from dicomweb_api.context import ApiContext
from pacs_common.archive.requests import RESTORABLE
from pacs_common.storage import (
    ObjectArchivedError,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StorageRegistry,
)

__all__ = [
    "StoredInstance",
    "check_online",
    "find_instance",
    "restoring",
    "run_blocking",
    "storage_of",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

ONLINE: Final = "ONLINE"

_SQL = """
SELECT i.sop_instance_uid,
       st.study_instance_uid,
       i.availability,
       i.transfer_syntax_uid,
       i.content_sha256,
       l.tier,
       l.key,
       (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}'::jsonb)
          FROM jsonb_each(m.metadata) AS e WHERE e.key = ANY($4::text[])) AS metadata,
       (SELECT coalesce(jsonb_object_agg(b.key, b.value), '{}'::jsonb)
          FROM jsonb_each(m.bulk_data) AS b WHERE b.key = ANY($5::text[])) AS bulk_data
  FROM instance AS i
  JOIN series AS se ON se.pk = i.series_fk
  JOIN study AS st ON st.pk = se.study_fk
  JOIN instance_location AS l ON l.instance_fk = i.pk
  JOIN instance_metadata AS m ON m.instance_fk = i.pk
 WHERE st.study_instance_uid = $1 AND se.series_instance_uid = $2 AND i.sop_instance_uid = $3
"""


class StoredInstance(BaseModel):
    """An instance as the pixel and bulk data resources see it."""

    model_config = ConfigDict(frozen=True)

    sop_instance_uid: str
    study_instance_uid: str
    # ONLINE | NEARLINE | OFFLINE | UNAVAILABLE
    availability: str
    transfer_syntax_uid: str
    content_sha256: str
    tier: str
    key: str
    # The requested metadata elements (DICOM JSON) and bulk data entries.
    metadata: dict[str, Any]
    bulk_data: dict[str, Any]


async def find_instance(
    pool: asyncpg.Pool,
    study: str,
    series: str,
    instance: str,
    *,
    elements: Sequence[str],
    bulk_paths: Sequence[str],
) -> StoredInstance:
    """The instance at ``study/series/instance``; 404 when there is none."""
    async with pool.acquire() as connection:
        row = await connection.fetchrow(_SQL, study, series, instance, list(elements), list(bulk_paths))
    if row is None:
        raise HTTPException(
            status_code=404, detail=f"instance {instance} not found in series {series} of study {study}"
        )
    return StoredInstance.model_validate(dict(row))


def storage_of(storage: StorageRegistry, stored: StoredInstance) -> ObjectStorage:
    try:
        return storage.get(stored.tier)
    except KeyError as exc:
        raise HTTPException(status_code=503, detail=str(exc.args[0])) from exc


async def restoring(
    context: ApiContext, sop_instance_uids: Sequence[str], *, found_archived: bool = True
) -> HTTPException:
    """Request the restores of these instances; the 503 that says so.
    ``found_archived``: the storage said so (else the index did)."""
    jobs: dict[str, int | None] = dict.fromkeys(sop_instance_uids)
    try:
        requester = context.restore_requester
        for ticket in await requester.request(sop_instance_uids, found_archived=found_archived):
            jobs[ticket.sop_instance_uid] = ticket.job_id
    except Exception:
        # The answer is a 503 either way; the next request asks again.
        logger.exception("restore request failed", extra={"instances": len(sop_instance_uids)})
    retry_after = context.retry_after_seconds
    detail = {
        "message": (
            f"{len(jobs)} instance(s) are archived (NEARLINE) and not readable until restored; "
            f"retry in {retry_after} s"
        ),
        "availability": "NEARLINE",
        "retryAfterSeconds": retry_after,
        "instances": [{"SOPInstanceUID": uid, "restoreJobId": job} for uid, job in jobs.items()],
    }
    return HTTPException(status_code=503, detail=detail, headers={"Retry-After": str(retry_after)})


async def check_online(context: ApiContext, instances: Iterable[tuple[str, str]]) -> None:
    """503 (after requesting the restores) when any ``(uid, availability)``
    is not ONLINE in the index."""
    offline = [(uid, availability) for uid, availability in instances if availability != ONLINE]
    if not offline:
        return
    restorable = [uid for uid, availability in offline if availability in RESTORABLE]
    if restorable:
        raise await restoring(context, restorable, found_archived=False)
    raise HTTPException(
        status_code=503,
        detail=f"instance {offline[0][0]} is {offline[0][1].lower()}",
        headers={"Retry-After": str(context.retry_after_seconds)},
    )


async def run_blocking(
    function: Callable[[], T], archived: Callable[[], Awaitable[HTTPException]] | None = None
) -> T:
    """Run storage reads / decoding in a thread, storage failures as HTTP
    errors (an archived object: ``archived()``, which requests its restore)."""
    try:
        return await asyncio.to_thread(function)
    except ObjectArchivedError as exc:
        if archived is not None:
            raise await archived() from exc
        raise HTTPException(
            status_code=503, detail=f"the object is archived and must be restored first: {exc}"
        ) from exc
    except ObjectNotFoundError as exc:
        raise HTTPException(status_code=404, detail=f"the stored object is missing: {exc}") from exc
    except StorageError as exc:
        raise HTTPException(status_code=503, detail=f"storage failed: {exc}") from exc
