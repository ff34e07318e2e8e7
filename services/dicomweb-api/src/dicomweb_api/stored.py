"""Finding one stored instance for the pixel and bulk data resources: where
its object is, its pixel module, and the bulk values asked for.

One statement per request, reading only the metadata elements and bulk data
entries needed (the metadata of a large instance can be big).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import asyncpg
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict

from pacs_common.storage import (
    ObjectArchivedError,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StorageRegistry,
)

__all__ = ["StoredInstance", "find_instance", "run_blocking", "storage_of"]

T = TypeVar("T")

_SQL = """
SELECT i.transfer_syntax_uid,
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


async def run_blocking(function: Callable[[], T]) -> T:
    """Run storage reads / decoding in a thread, storage failures as HTTP errors."""
    try:
        return await asyncio.to_thread(function)
    except ObjectArchivedError as exc:
        raise HTTPException(
            status_code=503, detail=f"the object is archived and must be restored first: {exc}"
        ) from exc
    except ObjectNotFoundError as exc:
        raise HTTPException(status_code=404, detail=f"the stored object is missing: {exc}") from exc
    except StorageError as exc:
        raise HTTPException(status_code=503, detail=f"storage failed: {exc}") from exc
