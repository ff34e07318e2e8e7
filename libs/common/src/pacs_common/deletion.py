"""Deleting a study, a series or an instance from the index and storage:
the core the DICOMweb DELETE, the REST API's deletion and the retention
task share.

One transaction removes the instance rows (their locations and metadata
cascade), the rows of the series, study and patient left empty, and the
records of objects set aside for the same SOP Instance UIDs (duplicates),
and recomputes the aggregates of the series and study that remain.  After
the commit the caller deletes the objects from storage
(:func:`delete_objects`), wherever the index said they were; an object that
cannot be deleted then is logged (the index no longer refers to it, the
orphan cleanup finds it).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from pacs_common import locks
from pacs_common.storage import StorageError, StorageRegistry

__all__ = [
    "DeletedObjects",
    "Level",
    "ObjectRef",
    "StudyHeldError",
    "StudyLockedError",
    "delete_from_index",
    "delete_objects",
]

logger = logging.getLogger(__name__)

_Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

_MAX_ATTEMPTS: Final = 3


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


@dataclass(frozen=True, slots=True)
class ObjectRef:
    tier: str
    key: str


@dataclass(frozen=True, slots=True)
class DeletedObjects:
    """What one DELETE removed from the index."""

    sop_instance_uids: tuple[str, ...]
    objects: tuple[ObjectRef, ...]


_HELD: Final = "SELECT EXISTS (SELECT 1 FROM retention_hold WHERE study_instance_uid = $1)"
_LOCK_STUDY: Final = "SELECT pk, patient_fk FROM study WHERE study_instance_uid = $1 FOR UPDATE"
_FIND_SERIES: Final = "SELECT pk FROM series WHERE study_fk = $1 AND series_instance_uid = $2"
_FIND_INSTANCE: Final = "SELECT pk FROM instance WHERE series_fk = $1 AND sop_instance_uid = $2"

_INSTANCES_OF_STUDY: Final = """
SELECT i.sop_instance_uid, l.tier, l.key
FROM series s JOIN instance i ON i.series_fk = s.pk
LEFT JOIN instance_location l ON l.instance_fk = i.pk
WHERE s.study_fk = $1
"""
_INSTANCES_OF_SERIES: Final = """
SELECT i.sop_instance_uid, l.tier, l.key
FROM instance i LEFT JOIN instance_location l ON l.instance_fk = i.pk
WHERE i.series_fk = $1
"""
_INSTANCE: Final = """
SELECT i.sop_instance_uid, l.tier, l.key
FROM instance i LEFT JOIN instance_location l ON l.instance_fk = i.pk
WHERE i.pk = $1
"""

_DELETE_SUPERSEDED: Final = """
DELETE FROM instance_superseded WHERE sop_instance_uid = ANY($1::text[]) RETURNING tier, key
"""

# Like the ingest worker's aggregates, but a deletion is not new data: the
# study.stable bookkeeping (last_indexed_at) is left alone.
_SERIES_AGGREGATES: Final = """
UPDATE series s SET
    number_of_series_related_instances = a.instances,
    series_size_bytes = a.size,
    sop_classes_in_series = a.sop_classes,
    updated_at = now()
FROM (
    SELECT count(i.pk)::integer AS instances,
           coalesce(sum(l.size), 0)::bigint AS size,
           coalesce(array_agg(DISTINCT i.sop_class_uid ORDER BY i.sop_class_uid)
                    FILTER (WHERE i.pk IS NOT NULL), '{}') AS sop_classes
    FROM instance i LEFT JOIN instance_location l ON l.instance_fk = i.pk
    WHERE i.series_fk = $1
) a
WHERE s.pk = $1
RETURNING s.number_of_series_related_instances
"""
_STUDY_AGGREGATES: Final = """
UPDATE study st SET
    number_of_study_related_series = a.series,
    number_of_study_related_instances = a.instances,
    study_size_bytes = a.size,
    modalities_in_study = a.modalities,
    sop_classes_in_study = a.sop_classes,
    updated_at = now()
FROM (
    SELECT count(se.pk) FILTER (WHERE se.number_of_series_related_instances > 0)::integer AS series,
           coalesce(sum(se.number_of_series_related_instances), 0)::integer AS instances,
           coalesce(sum(se.series_size_bytes), 0)::bigint AS size,
           coalesce(array_agg(DISTINCT se.modality ORDER BY se.modality)
                    FILTER (WHERE se.modality IS NOT NULL
                            AND se.number_of_series_related_instances > 0), '{}') AS modalities,
           coalesce((SELECT array_agg(DISTINCT c ORDER BY c)
                     FROM series s2, unnest(s2.sop_classes_in_series) AS c
                     WHERE s2.study_fk = $1), '{}') AS sop_classes
    FROM series se WHERE se.study_fk = $1
) a
WHERE st.pk = $1
"""
_DELETE_EMPTY_SERIES: Final = """
DELETE FROM series s WHERE s.pk = $1 AND NOT EXISTS (SELECT 1 FROM instance i WHERE i.series_fk = s.pk)
"""
_DELETE_EMPTY_STUDY: Final = """
DELETE FROM study st WHERE st.pk = $1 AND NOT EXISTS (SELECT 1 FROM series s WHERE s.study_fk = st.pk)
RETURNING st.pk
"""
_DELETE_EMPTY_PATIENT: Final = """
DELETE FROM patient p WHERE p.pk = $1 AND NOT EXISTS (SELECT 1 FROM study s WHERE s.patient_fk = p.pk)
"""


class _NotFoundError(LookupError):
    pass


async def _pk(connection: _Connection, query: str, *args: object, what: str) -> int:
    pk = await connection.fetchval(query, *args)
    if pk is None:
        raise _NotFoundError(f"{what} not found")
    return int(pk)


async def _delete(
    connection: _Connection, level: Level, study: str, series: str | None, sop: str | None
) -> DeletedObjects:
    # The study row lock serialises with the ingest worker (which upserts
    # the study row first) and with another DELETE of the same study.
    row = await connection.fetchrow(_LOCK_STUDY, study)
    if row is None:
        raise _NotFoundError("study not found")
    study_pk, patient_pk = int(row["pk"]), int(row["patient_fk"])
    series_pk = instance_pk = None
    if series is not None:
        series_pk = await _pk(connection, _FIND_SERIES, study_pk, series, what="series")
    if sop is not None:
        instance_pk = await _pk(connection, _FIND_INSTANCE, series_pk, sop, what="instance")

    if level is Level.STUDY:
        rows = await connection.fetch(_INSTANCES_OF_STUDY, study_pk)
        await connection.execute("DELETE FROM study WHERE pk = $1", study_pk)
    elif level is Level.SERIES:
        rows = await connection.fetch(_INSTANCES_OF_SERIES, series_pk)
        await connection.execute("DELETE FROM series WHERE pk = $1", series_pk)
    else:
        rows = await connection.fetch(_INSTANCE, instance_pk)
        await connection.execute("DELETE FROM instance WHERE pk = $1", instance_pk)
        remaining = await connection.fetchval(_SERIES_AGGREGATES, series_pk)
        if remaining == 0:
            await connection.execute(_DELETE_EMPTY_SERIES, series_pk)

    study_deleted = level is Level.STUDY
    if not study_deleted:
        await connection.execute(_STUDY_AGGREGATES, study_pk)
        study_deleted = await connection.fetchval(_DELETE_EMPTY_STUDY, study_pk) is not None
    if study_deleted:
        await connection.execute(_DELETE_EMPTY_PATIENT, patient_pk)

    uids = tuple(sorted({r["sop_instance_uid"] for r in rows}))
    objects = [ObjectRef(r["tier"], r["key"]) for r in rows if r["tier"] is not None]
    objects += [
        ObjectRef(r["tier"], r["key"]) for r in await connection.fetch(_DELETE_SUPERSEDED, list(uids))
    ]
    return DeletedObjects(uids, tuple(dict.fromkeys(objects)))


class StudyLockedError(Exception):
    """A live lock of somebody else is on the study (study locks of the REST API)."""


class StudyHeldError(Exception):
    """The study is on retention hold (``retention_hold``)."""


async def delete_from_index(
    pool: asyncpg.Pool,
    level: Level,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    *,
    holder: str | None = None,
    unless_held: bool = False,
) -> DeletedObjects | None:
    """Remove the rows of a study, series or instance in one transaction;
    None when there is no such entity.  With ``holder``, refuse
    (:class:`StudyLockedError`) while anybody else holds a live lock on the
    study; checked inside the transaction, so no lock can be taken until
    the delete commits.  With ``unless_held``, refuse
    (:class:`StudyHeldError`) a study on retention hold.

    A deadlock with the ingest worker (it locks the patient row before the
    study row, this the study before the patient) rolls back one of the two;
    here the transaction is then run again.
    """
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            async with pool.acquire() as connection, connection.transaction():
                if holder is not None and await locks.is_locked_by_other(connection, study, holder):
                    raise StudyLockedError(f"study {study} is locked by another holder")
                if unless_held and await connection.fetchval(_HELD, study):
                    raise StudyHeldError(f"study {study} is on retention hold")
                return await _delete(connection, level, study, series, sop)
        except _NotFoundError:
            return None
        except (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError):
            if attempt == _MAX_ATTEMPTS:
                raise
            logger.info("delete lost a race with another transaction, retrying", extra={"attempt": attempt})
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def delete_objects(storage: StorageRegistry, objects: tuple[ObjectRef, ...]) -> int:
    """Delete the objects (blocking); returns how many could not be deleted."""
    failures = 0
    for ref in objects:
        try:
            storage.get(ref.tier).delete(ref.key)
        except (KeyError, StorageError, OSError) as exc:
            failures += 1
            logger.error(
                "deleted from the index but not from storage: %s",
                exc,
                extra={"tier": ref.tier, "key": ref.key},
            )
    return failures
