"""Writing the index: instances in, patient/study/series/instance rows out.

One batch is one transaction.  Its statements are set-based (arrays passed
once and ``unnest``-ed by PostgreSQL), so a batch of a hundred instances of
one series costs about ten round trips whatever its size.

Idempotency: an instance is identified by its SOP Instance UID, its content
by the sha256 of the stored object.  The same content again changes nothing
("unchanged").  Different content under a UID already indexed is a
*duplicate*, decided by :class:`DuplicatePolicy`:

* ``keep-first``: the index holds the object that *arrived* first (by the
  receiver's ``received_at``, whatever order the workers process them in);
  later arrivals are recorded in ``instance_superseded`` (they stay in
  storage for review).  Normally the newcomer is simply set aside (outcome
  "kept-first"); when an earlier arrival is processed after a later one
  (two workers, a retried message), it takes its place (outcome "replaced");
* ``replace``: the index holds the newest arrival; the one it replaces is
  recorded in ``instance_superseded``.  An arrival older than the indexed
  one (a late redelivery) is set aside instead, so redelivering old
  messages never flips the index back.

Redelivering a duplicate whose decision is already recorded changes nothing.

Concurrency: several workers index at once.  Each transaction takes its
row locks in one global order: existing instance rows (by UID), then patient
rows it must change, then study rows (by UID), then series rows (by UID);
aggregates are recomputed under those locks.  Two batches touching the same
study therefore serialize on the study row and never deadlock; a deadlock
or a lost race that PostgreSQL still reports (a replace that moves an
instance across studies, two batches inserting the same new SOP Instance
UID) rolls the transaction back and it is retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import asyncpg

from pacs_common.dicom.metadata import (
    InstanceAttributes,
    ParsedInstance,
    PatientAttributes,
    SeriesAttributes,
    StudyAttributes,
)
from pacs_common.messaging.models import IndexOutcome, StorageLocation
from pacs_common.settings import DuplicatePolicy

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "DuplicateDecision",
    "IndexItem",
    "IndexResult",
    "InstanceIndex",
    "StableStudy",
]

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS: Final = 6

if TYPE_CHECKING:
    # A connection, or the pool's proxy of one (generic in the stubs only).
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class IndexItem:
    """One stored object to index.

    Build it with :meth:`build`, off the event loop (it serializes the
    metadata, which is the CPU-heavy part of preparing a batch).
    """

    parsed: ParsedInstance
    location: StorageLocation
    received_at: datetime
    source_ae_title: str | None
    metadata_json: str
    bulk_data_json: str

    @classmethod
    def build(
        cls,
        parsed: ParsedInstance,
        location: StorageLocation,
        received_at: datetime,
        source_ae_title: str | None = None,
    ) -> IndexItem:
        if received_at.tzinfo is None:
            raise ValueError("received_at must be timezone-aware")
        for name, value in (
            ("SOP Instance UID", parsed.instance.sop_instance_uid),
            ("SOP Class UID", parsed.instance.sop_class_uid),
            ("Series Instance UID", parsed.series.series_instance_uid),
            ("Study Instance UID", parsed.study.study_instance_uid),
        ):
            if not value:
                raise ValueError(f"an instance without {name} cannot be indexed")
        return cls(
            parsed=parsed,
            location=location,
            received_at=received_at,
            source_ae_title=source_ae_title,
            metadata_json=_dumps(parsed.metadata),
            bulk_data_json=_dumps(parsed.bulk_data_json()),
        )

    @property
    def sop_instance_uid(self) -> str:
        return str(self.parsed.instance.sop_instance_uid)

    @property
    def series_instance_uid(self) -> str:
        return str(self.parsed.series.series_instance_uid)

    @property
    def study_instance_uid(self) -> str:
        return str(self.parsed.study.study_instance_uid)


@dataclass(frozen=True, slots=True)
class DuplicateDecision:
    """What happened when an object met another one under its SOP Instance
    UID: logged by the caller, recorded in ``instance_superseded``."""

    decision: str  # "kept-first" | "replaced" | "identical"
    kept: StorageLocation  # what the index points to now
    set_aside: StorageLocation  # the object not indexed (still in storage)


@dataclass(frozen=True, slots=True)
class IndexResult:
    """The outcome for one item, in the order the items were given."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    outcome: IndexOutcome
    # Where the index points for this instance after the commit.
    location: StorageLocation
    patient_id: str | None
    modality: str | None
    duplicate: DuplicateDecision | None = None


@dataclass(frozen=True, slots=True)
class StableStudy:
    """A study claimed for a study.stable announcement."""

    study_instance_uid: str
    patient_id: str | None
    modalities_in_study: list[str]
    number_of_series: int
    number_of_instances: int
    last_received_at: datetime


class _RaceLostError(Exception):
    """The transaction lost a race and must run again."""


# ---------------------------------------------------------------------------
# SQL, built once from the attribute dataclasses so columns cannot drift.


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    pgtype: str  # element type of the array parameter

    @property
    def param_type(self) -> str:
        return "text" if self.pgtype == "jsonb" else self.pgtype

    @property
    def value(self) -> str:
        return f"t.{self.name}::jsonb" if self.pgtype == "jsonb" else f"t.{self.name}"


def _columns(cls: type, **overrides: str) -> list[_Column]:
    out = []
    for f in fields(cls):
        kind = overrides.get(f.name)
        if kind is None:
            # Annotations are strings here ("int | None"): ints are integer, the rest text.
            kind = "integer" if str(f.type).split("|")[0].strip() == "int" else "text"
        out.append(_Column(f.name, kind))
    return out


def _unnest(columns: Sequence[_Column]) -> str:
    params = ", ".join(f"${i}::{c.param_type}[]" for i, c in enumerate(columns, start=1))
    names = ", ".join(c.name for c in columns)
    return f"unnest({params}) AS t({names})"


_PATIENT_KEY = ("patient_id", "issuer_of_patient_id")
_PATIENT_COLUMNS = _columns(PatientAttributes)
_PATIENT_VALUE_COLUMNS = [c for c in _PATIENT_COLUMNS if c.name not in _PATIENT_KEY]

_SELECT_PATIENTS = f"""
SELECT p.pk, {", ".join("p." + c.name for c in _PATIENT_COLUMNS)}
FROM patient p
JOIN unnest($1::text[], $2::text[]) AS t(patient_id, issuer_of_patient_id)
  ON p.patient_id = t.patient_id AND p.issuer_of_patient_id = t.issuer_of_patient_id
"""

_UPSERT_PATIENTS = f"""
INSERT INTO patient AS p ({", ".join(c.name for c in _PATIENT_COLUMNS)})
SELECT {", ".join(c.value for c in _PATIENT_COLUMNS)}
FROM {_unnest(_PATIENT_COLUMNS)}
ORDER BY t.patient_id, t.issuer_of_patient_id
ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET
    {", ".join(f"{c.name} = coalesce(EXCLUDED.{c.name}, p.{c.name})" for c in _PATIENT_VALUE_COLUMNS)},
    updated_at = now()
"""

# Study: the newest arrival's values win, absent values never erase present ones.
_STUDY_COLUMNS = [
    _Column("patient_id", "text"),
    _Column("issuer_of_patient_id", "text"),
    *_columns(StudyAttributes),
    _Column("last_received_at", "timestamptz"),
]
_STUDY_INSERT_COLUMNS = [c for c in _STUDY_COLUMNS if c.name not in _PATIENT_KEY]
_NEWER = "EXCLUDED.last_received_at >= coalesce(s.last_received_at, '-infinity')"


def _prefer_newer(name: str, alias: str) -> str:
    return (
        f"{name} = CASE WHEN {_NEWER} THEN coalesce(EXCLUDED.{name}, {alias}.{name}) "
        f"ELSE coalesce({alias}.{name}, EXCLUDED.{name}) END"
    )


_UPSERT_STUDIES = f"""
INSERT INTO study AS s (patient_fk, {", ".join(c.name for c in _STUDY_INSERT_COLUMNS)})
SELECT p.pk, {", ".join(c.value for c in _STUDY_INSERT_COLUMNS)}
FROM {_unnest(_STUDY_COLUMNS)}
JOIN patient p ON p.patient_id = t.patient_id AND p.issuer_of_patient_id = t.issuer_of_patient_id
ORDER BY t.study_instance_uid
ON CONFLICT (study_instance_uid) DO UPDATE SET
    patient_fk = CASE WHEN {_NEWER} THEN EXCLUDED.patient_fk ELSE s.patient_fk END,
    {
    ", ".join(
        _prefer_newer(c.name, "s")
        for c in _STUDY_INSERT_COLUMNS
        if c.name not in ("study_instance_uid", "last_received_at")
    )
},
    last_received_at = greatest(s.last_received_at, EXCLUDED.last_received_at),
    updated_at = now()
RETURNING s.pk, s.study_instance_uid
"""

_SERIES_COLUMNS = [
    _Column("study_instance_uid", "text"),
    *_columns(SeriesAttributes, request_attributes="jsonb"),
    _Column("source_ae_title", "text"),
    _Column("last_received_at", "timestamptz"),
]
_SERIES_INSERT_COLUMNS = [c for c in _SERIES_COLUMNS if c.name != "study_instance_uid"]
# A series stays in the study it was first indexed in (study_fk is not updated).
_UPSERT_SERIES = f"""
INSERT INTO series AS s (study_fk, {", ".join(c.name for c in _SERIES_INSERT_COLUMNS)})
SELECT st.pk, {", ".join(c.value for c in _SERIES_INSERT_COLUMNS)}
FROM {_unnest(_SERIES_COLUMNS)}
JOIN study st ON st.study_instance_uid = t.study_instance_uid
ORDER BY t.series_instance_uid
ON CONFLICT (series_instance_uid) DO UPDATE SET
    {
    ", ".join(
        _prefer_newer(c.name, "s")
        for c in _SERIES_INSERT_COLUMNS
        if c.name not in ("series_instance_uid", "last_received_at")
    )
},
    last_received_at = greatest(s.last_received_at, EXCLUDED.last_received_at),
    updated_at = now()
RETURNING s.pk, s.series_instance_uid
"""

_INSTANCE_COLUMNS = [
    _Column("series_instance_uid", "text"),
    *_columns(InstanceAttributes, concept_name_code="jsonb"),
    _Column("transfer_syntax_uid", "text"),
    _Column("content_sha256", "text"),
    _Column("source_ae_title", "text"),
    _Column("received_at", "timestamptz"),
]
_INSTANCE_ROW_COLUMNS = [c for c in _INSTANCE_COLUMNS if c.name != "series_instance_uid"]
_OBJECT_COLUMNS = [
    _Column("tier", "text"),
    _Column("backend", "text"),
    _Column("key", "text"),
    _Column("size", "bigint"),
    _Column("sha256", "text"),
    _Column("metadata", "jsonb"),
    _Column("bulk_data", "jsonb"),
]
_INSTANCE_ALL = [*_INSTANCE_COLUMNS, *_OBJECT_COLUMNS]

# New instances, their location and metadata: one statement.
_INSERT_INSTANCES = f"""
WITH t AS (SELECT * FROM {_unnest(_INSTANCE_ALL)}),
ins AS (
    INSERT INTO instance (series_fk, {", ".join(c.name for c in _INSTANCE_ROW_COLUMNS)})
    SELECT se.pk, {", ".join(c.value for c in _INSTANCE_ROW_COLUMNS)}
    FROM t JOIN series se ON se.series_instance_uid = t.series_instance_uid
    ORDER BY t.sop_instance_uid
    ON CONFLICT (sop_instance_uid) DO NOTHING
    RETURNING pk, sop_instance_uid
),
loc AS (
    INSERT INTO instance_location (instance_fk, tier, backend, key, size, sha256)
    SELECT ins.pk, t.tier, t.backend, t.key, t.size, t.sha256
    FROM ins JOIN t ON t.sop_instance_uid = ins.sop_instance_uid
),
meta AS (
    INSERT INTO instance_metadata (instance_fk, metadata, bulk_data)
    SELECT ins.pk, t.metadata::jsonb, t.bulk_data::jsonb
    FROM ins JOIN t ON t.sop_instance_uid = ins.sop_instance_uid
)
SELECT count(*) FROM ins
"""

# Replacements: the instance row, location and metadata switch together.
_REPLACE_INSTANCES = f"""
WITH t AS (SELECT * FROM {_unnest(_INSTANCE_ALL)}),
upd AS (
    UPDATE instance i SET
        series_fk = se.pk,
        {", ".join(f"{c.name} = {c.value}" for c in _INSTANCE_ROW_COLUMNS if c.name != "sop_instance_uid")},
        availability = 'ONLINE',
        updated_at = now()
    FROM t JOIN series se ON se.series_instance_uid = t.series_instance_uid
    WHERE i.sop_instance_uid = t.sop_instance_uid
    RETURNING i.pk, i.sop_instance_uid
),
loc AS (
    INSERT INTO instance_location AS l (instance_fk, tier, backend, key, size, sha256)
    SELECT upd.pk, t.tier, t.backend, t.key, t.size, t.sha256
    FROM upd JOIN t ON t.sop_instance_uid = upd.sop_instance_uid
    ON CONFLICT (instance_fk) DO UPDATE SET
        tier = EXCLUDED.tier, backend = EXCLUDED.backend, key = EXCLUDED.key,
        size = EXCLUDED.size, sha256 = EXCLUDED.sha256, stored_at = now()
),
meta AS (
    INSERT INTO instance_metadata AS m (instance_fk, metadata, bulk_data)
    SELECT upd.pk, t.metadata::jsonb, t.bulk_data::jsonb
    FROM upd JOIN t ON t.sop_instance_uid = upd.sop_instance_uid
    ON CONFLICT (instance_fk) DO UPDATE SET
        metadata = EXCLUDED.metadata, bulk_data = EXCLUDED.bulk_data
)
SELECT count(*) FROM upd
"""

_LOCK_EXISTING = """
SELECT i.pk, i.sop_instance_uid, i.series_fk, i.content_sha256, i.received_at,
       l.tier, l.backend, l.key, l.size, l.sha256
FROM instance i
LEFT JOIN instance_location l ON l.instance_fk = i.pk
WHERE i.sop_instance_uid = ANY($1::text[])
ORDER BY i.sop_instance_uid
FOR UPDATE OF i
"""

_SELECT_SUPERSEDED = """
SELECT s.sop_instance_uid, s.tier, s.key, s.received_at
FROM instance_superseded s
JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(sop_instance_uid, tier, key)
  ON s.sop_instance_uid = t.sop_instance_uid AND s.tier = t.tier AND s.key = t.key
"""

_SUPERSEDED_COLUMNS = [
    _Column("sop_instance_uid", "text"),
    _Column("study_instance_uid", "text"),
    _Column("series_instance_uid", "text"),
    _Column("decision", "text"),
    _Column("kept_tier", "text"),
    _Column("kept_key", "text"),
    _Column("kept_sha256", "text"),
    _Column("tier", "text"),
    _Column("backend", "text"),
    _Column("key", "text"),
    _Column("size", "bigint"),
    _Column("sha256", "text"),
    _Column("received_at", "timestamptz"),
    _Column("source_ae_title", "text"),
]
_UPSERT_SUPERSEDED = f"""
INSERT INTO instance_superseded AS s ({", ".join(c.name for c in _SUPERSEDED_COLUMNS)})
SELECT {", ".join(c.value for c in _SUPERSEDED_COLUMNS)}
FROM {_unnest(_SUPERSEDED_COLUMNS)}
ORDER BY t.sop_instance_uid, t.tier, t.key
ON CONFLICT (sop_instance_uid, tier, key) DO UPDATE SET
    decision = EXCLUDED.decision,
    kept_tier = EXCLUDED.kept_tier,
    kept_key = EXCLUDED.kept_key,
    kept_sha256 = EXCLUDED.kept_sha256,
    received_at = greatest(s.received_at, EXCLUDED.received_at),
    decided_at = now()
"""

# An object indexed again (replace policy, re-sent after being replaced) is no
# longer set aside.
_DELETE_SUPERSEDED = """
DELETE FROM instance_superseded s
USING unnest($1::text[], $2::text[], $3::text[]) AS t(sop_instance_uid, tier, key)
WHERE s.sop_instance_uid = t.sop_instance_uid AND s.tier = t.tier AND s.key = t.key
"""

_SERIES_AGGREGATES = """
UPDATE series s SET
    number_of_series_related_instances = a.instances,
    series_size_bytes = a.size,
    sop_classes_in_series = a.sop_classes,
    updated_at = now()
FROM (
    SELECT t.pk,
           count(i.pk)::integer AS instances,
           coalesce(sum(l.size), 0)::bigint AS size,
           coalesce(array_agg(DISTINCT i.sop_class_uid ORDER BY i.sop_class_uid)
                    FILTER (WHERE i.pk IS NOT NULL), '{}') AS sop_classes
    FROM unnest($1::bigint[]) AS t(pk)
    LEFT JOIN instance i ON i.series_fk = t.pk
    LEFT JOIN instance_location l ON l.instance_fk = i.pk
    GROUP BY t.pk
) a
WHERE s.pk = a.pk
RETURNING s.study_fk
"""

_STUDY_AGGREGATES = """
UPDATE study st SET
    number_of_study_related_series = a.series,
    number_of_study_related_instances = a.instances,
    study_size_bytes = a.size,
    modalities_in_study = a.modalities,
    sop_classes_in_study = a.sop_classes,
    -- clock_timestamp(): after this transaction took the row lock, so later
    -- than any study.stable claim committed before it (see studies_to_announce)
    last_indexed_at = clock_timestamp(),
    updated_at = now()
FROM (
    SELECT t.pk,
           count(se.pk) FILTER (WHERE se.number_of_series_related_instances > 0)::integer AS series,
           coalesce(sum(se.number_of_series_related_instances), 0)::integer AS instances,
           coalesce(sum(se.series_size_bytes), 0)::bigint AS size,
           coalesce(array_agg(DISTINCT se.modality ORDER BY se.modality)
                    FILTER (WHERE se.modality IS NOT NULL
                            AND se.number_of_series_related_instances > 0), '{}') AS modalities,
           coalesce((SELECT array_agg(DISTINCT c ORDER BY c)
                     FROM series s2, unnest(s2.sop_classes_in_series) AS c
                     WHERE s2.study_fk = t.pk), '{}') AS sop_classes
    FROM unnest($1::bigint[]) AS t(pk)
    LEFT JOIN series se ON se.study_fk = t.pk
    GROUP BY t.pk
) a
WHERE st.pk = a.pk
"""

# Only after a replace moved an instance out of its series.
_DELETE_EMPTY_SERIES = """
DELETE FROM series s WHERE s.pk = ANY($1::bigint[])
  AND NOT EXISTS (SELECT 1 FROM instance i WHERE i.series_fk = s.pk)
RETURNING s.study_fk
"""
_DELETE_EMPTY_STUDIES = """
DELETE FROM study st WHERE st.pk = ANY($1::bigint[])
  AND NOT EXISTS (SELECT 1 FROM series s WHERE s.study_fk = st.pk)
"""

_CLAIM_STABLE = """
WITH due AS (
    SELECT pk FROM study
    WHERE (stable_announced_at IS NULL OR stable_announced_at < last_indexed_at)
      AND last_indexed_at < clock_timestamp() - make_interval(secs => $1)
    ORDER BY last_indexed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE study s SET stable_announced_at = clock_timestamp()
FROM due
WHERE s.pk = due.pk
RETURNING s.study_instance_uid,
          (SELECT p.patient_id FROM patient p WHERE p.pk = s.patient_fk) AS patient_id,
          s.modalities_in_study,
          s.number_of_study_related_series,
          s.number_of_study_related_instances,
          s.last_received_at,
          s.last_indexed_at
"""


# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Existing:
    pk: int
    series_fk: int
    sha256: str
    received_at: datetime
    location: StorageLocation | None


def _location(row: asyncpg.Record) -> StorageLocation | None:
    if row["tier"] is None:
        return None
    return StorageLocation(
        tier=row["tier"], backend=row["backend"], key=row["key"], size=row["size"], sha256=row["sha256"]
    )


def _rounds(items: Sequence[IndexItem]) -> list[list[int]]:
    """Split a batch so that each round holds a SOP Instance UID once; the
    arrivals of one UID are taken oldest first, as if they came one by one."""
    by_uid: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_uid.setdefault(item.sop_instance_uid, []).append(index)
    rounds: list[list[int]] = []
    for indexes in by_uid.values():
        indexes.sort(key=lambda i: items[i].received_at)
        for depth, index in enumerate(indexes):
            if depth == len(rounds):
                rounds.append([])
            rounds[depth].append(index)
    return rounds


def _newest_per_key(items: Sequence[IndexItem], key: Callable[[IndexItem], Any]) -> list[IndexItem]:
    """One item per key, the newest arrival (its values win)."""
    chosen: dict[Any, IndexItem] = {}
    for item in items:
        k = key(item)
        current = chosen.get(k)
        if current is None or item.received_at >= current.received_at:
            chosen[k] = item
    return [chosen[k] for k in sorted(chosen, key=str)]


def _arrays(columns: Sequence[_Column], rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[row.get(c.name) for row in rows] for c in columns]


def _jsonb(value: Any) -> str | None:
    return None if value is None else _dumps(value)


def _patient_row(item: IndexItem) -> dict[str, Any]:
    p = item.parsed.patient
    return {c.name: getattr(p, c.name) for c in _PATIENT_COLUMNS}


def _study_row(item: IndexItem) -> dict[str, Any]:
    row = {c.name: getattr(item.parsed.study, c.name) for c in _columns(StudyAttributes)}
    row["patient_id"] = item.parsed.patient.patient_id
    row["issuer_of_patient_id"] = item.parsed.patient.issuer_of_patient_id
    row["last_received_at"] = item.received_at
    return row


_SERIES_ATTRIBUTE_NAMES = [f.name for f in fields(SeriesAttributes)]
_INSTANCE_ATTRIBUTE_NAMES = [f.name for f in fields(InstanceAttributes)]


def _series_row(item: IndexItem) -> dict[str, Any]:
    s = item.parsed.series
    row = {name: getattr(s, name) for name in _SERIES_ATTRIBUTE_NAMES}
    row["request_attributes"] = _jsonb(s.request_attributes)
    row["study_instance_uid"] = item.study_instance_uid
    row["source_ae_title"] = item.source_ae_title
    row["last_received_at"] = item.received_at
    return row


def _instance_row(item: IndexItem) -> dict[str, Any]:
    i = item.parsed.instance
    row = {name: getattr(i, name) for name in _INSTANCE_ATTRIBUTE_NAMES}
    location = item.location
    row.update(
        concept_name_code=_jsonb(i.concept_name_code),
        series_instance_uid=item.series_instance_uid,
        transfer_syntax_uid=item.parsed.transfer_syntax_uid,
        content_sha256=location.sha256,
        source_ae_title=item.source_ae_title,
        received_at=item.received_at,
        tier=location.tier,
        backend=location.backend,
        key=location.key,
        size=location.size,
        sha256=location.sha256,
        metadata=item.metadata_json,
        bulk_data=item.bulk_data_json,
    )
    return row


def _superseded_row(
    item: IndexItem, decision: DuplicateDecision, received_at: datetime | None
) -> dict[str, Any]:
    aside, kept = decision.set_aside, decision.kept
    return {
        "sop_instance_uid": item.sop_instance_uid,
        "study_instance_uid": item.study_instance_uid,
        "series_instance_uid": item.series_instance_uid,
        "decision": decision.decision,
        "kept_tier": kept.tier,
        "kept_key": kept.key,
        "kept_sha256": kept.sha256,
        "tier": aside.tier,
        "backend": aside.backend,
        "key": aside.key,
        "size": aside.size,
        "sha256": aside.sha256,
        "received_at": received_at,
        "source_ae_title": item.source_ae_title,
    }


def _patient_changed(existing: asyncpg.Record, row: dict[str, Any]) -> bool:
    return any(row[c.name] is not None and row[c.name] != existing[c.name] for c in _PATIENT_VALUE_COLUMNS)


class InstanceIndex:
    """The write side of the index (one per process, shares the pool)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def index_batch(
        self, items: Sequence[IndexItem], *, duplicate_policy: DuplicatePolicy
    ) -> list[IndexResult]:
        """Index ``items`` in one transaction; results in the items' order.

        Raises asyncpg errors when the database fails (connection lost: the
        caller retries the whole batch later, nothing was committed).
        """
        if not items:
            return []
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                async with self._pool.acquire() as connection, connection.transaction():
                    return await self._index(connection, items, duplicate_policy)
            except (
                asyncpg.exceptions.DeadlockDetectedError,
                asyncpg.exceptions.SerializationError,
                asyncpg.exceptions.UniqueViolationError,
                _RaceLostError,
            ) as exc:
                if attempt == _MAX_ATTEMPTS:
                    raise
                delay = random.uniform(0.005, 0.05) * attempt
                logger.info(
                    "index batch lost a race, retrying",
                    extra={"attempt": attempt, "error": type(exc).__name__, "delay_seconds": delay},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _index(
        self, connection: Connection, items: Sequence[IndexItem], policy: DuplicatePolicy
    ) -> list[IndexResult]:
        results: list[IndexResult | None] = [None] * len(items)
        for round_indexes in _rounds(items):
            await self._index_round(connection, [(i, items[i]) for i in round_indexes], policy, results)
        return [r for r in results if r is not None]

    async def _index_round(
        self,
        connection: Connection,
        batch: list[tuple[int, IndexItem]],
        policy: DuplicatePolicy,
        results: list[IndexResult | None],
    ) -> None:
        uids = sorted(item.sop_instance_uid for _, item in batch)
        existing: dict[str, _Existing] = {
            row["sop_instance_uid"]: _Existing(
                pk=row["pk"],
                series_fk=row["series_fk"],
                sha256=row["content_sha256"],
                received_at=row["received_at"],
                location=_location(row),
            )
            for row in await connection.fetch(_LOCK_EXISTING, uids)
        }

        # Earlier decisions about the differing newcomers: a redelivery of an
        # arrival already decided changes nothing.
        differing = [
            item
            for _, item in batch
            if (e := existing.get(item.sop_instance_uid)) is not None and e.sha256 != item.location.sha256
        ]
        decided: dict[tuple[str, str, str], datetime | None] = {}
        if differing:
            rows = await connection.fetch(
                _SELECT_SUPERSEDED,
                [i.sop_instance_uid for i in differing],
                [i.location.tier for i in differing],
                [i.location.key for i in differing],
            )
            decided = {(r["sop_instance_uid"], r["tier"], r["key"]): r["received_at"] for r in rows}

        creates: list[IndexItem] = []
        replaces: list[IndexItem] = []
        superseded: list[dict[str, Any]] = []
        undecided: list[IndexItem] = []  # replaced objects indexed again
        moved_from_series: set[int] = set()

        for index, item in batch:
            current = existing.get(item.sop_instance_uid)
            outcome: IndexOutcome
            duplicate: DuplicateDecision | None = None
            location = item.location
            if current is None:
                outcome = "created"
                creates.append(item)
            else:
                kept = current.location or item.location
                location = kept
                if current.sha256 == item.location.sha256:
                    outcome = "unchanged"
                    if (kept.tier, kept.key) != (item.location.tier, item.location.key):
                        duplicate = DuplicateDecision("identical", kept=kept, set_aside=item.location)
                        superseded.append(_superseded_row(item, duplicate, item.received_at))
                else:
                    previous = decided.get((item.sop_instance_uid, item.location.tier, item.location.key))
                    already = (item.sop_instance_uid, item.location.tier, item.location.key) in decided and (
                        previous is None or previous >= item.received_at
                    )
                    # Arrival order, not processing order, decides: with
                    # several workers (or a retried message) the later
                    # arrival may be processed first.
                    keep_first = policy is DuplicatePolicy.KEEP_FIRST
                    decision = "kept-first" if keep_first else "replaced"
                    newcomer_wins = (
                        item.received_at < current.received_at
                        if keep_first
                        else item.received_at >= current.received_at
                    )
                    if already:
                        outcome = "unchanged"
                    elif newcomer_wins:
                        outcome = "replaced"  # the index now points to the newcomer
                        location = item.location
                        replaces.append(item)
                        duplicate = DuplicateDecision(decision, kept=item.location, set_aside=kept)
                        superseded.append(_superseded_row(item, duplicate, current.received_at))
                        undecided.append(item)
                        moved_from_series.add(current.series_fk)
                    else:
                        # keep-first: a later arrival; replace: an older one (a late redelivery)
                        outcome = "kept-first" if keep_first else "unchanged"
                        duplicate = DuplicateDecision(decision, kept=kept, set_aside=item.location)
                        superseded.append(_superseded_row(item, duplicate, item.received_at))
            results[index] = IndexResult(
                sop_instance_uid=item.sop_instance_uid,
                sop_class_uid=str(item.parsed.instance.sop_class_uid),
                study_instance_uid=item.study_instance_uid,
                series_instance_uid=item.series_instance_uid,
                outcome=outcome,
                location=location,
                patient_id=item.parsed.patient.patient_id or None,
                modality=item.parsed.series.modality,
                duplicate=duplicate,
            )

        writes = creates + replaces
        series_pks: list[int] = []
        if writes:
            series_pks = await self._write_hierarchy(connection, writes)
        if creates:
            new_rows = [_instance_row(i) for i in sorted(creates, key=lambda i: i.sop_instance_uid)]
            inserted = await connection.fetchval(_INSERT_INSTANCES, *_arrays(_INSTANCE_ALL, new_rows))
            if inserted != len(new_rows):
                # Another transaction inserted one of these UIDs after our lookup.
                raise _RaceLostError(f"{len(new_rows) - int(inserted)} instance(s) inserted concurrently")
        if replaces:
            changed_rows = [_instance_row(i) for i in sorted(replaces, key=lambda i: i.sop_instance_uid)]
            await connection.fetchval(_REPLACE_INSTANCES, *_arrays(_INSTANCE_ALL, changed_rows))
        if undecided:
            await connection.execute(
                _DELETE_SUPERSEDED,
                [i.sop_instance_uid for i in undecided],
                [i.location.tier for i in undecided],
                [i.location.key for i in undecided],
            )
        if superseded:
            await connection.execute(_UPSERT_SUPERSEDED, *_arrays(_SUPERSEDED_COLUMNS, superseded))
        if writes:
            await self._aggregate(connection, series_pks, moved_from_series)

    async def _write_hierarchy(self, connection: Connection, items: list[IndexItem]) -> list[int]:
        """Patients (only those new or changed), then studies, then series;
        returns the series' primary keys."""
        patients = [
            _patient_row(i)
            for i in _newest_per_key(
                items, lambda i: (i.parsed.patient.patient_id, i.parsed.patient.issuer_of_patient_id)
            )
        ]
        found = {
            (r["patient_id"], r["issuer_of_patient_id"]): r
            for r in await connection.fetch(
                _SELECT_PATIENTS,
                [p["patient_id"] for p in patients],
                [p["issuer_of_patient_id"] for p in patients],
            )
        }
        to_write = [
            p
            for p in patients
            if (existing := found.get((p["patient_id"], p["issuer_of_patient_id"]))) is None
            or _patient_changed(existing, p)
        ]
        if to_write:
            await connection.execute(_UPSERT_PATIENTS, *_arrays(_PATIENT_COLUMNS, to_write))

        studies = [_study_row(i) for i in _newest_per_key(items, lambda i: i.study_instance_uid)]
        await connection.execute(_UPSERT_STUDIES, *_arrays(_STUDY_COLUMNS, studies))
        series = [_series_row(i) for i in _newest_per_key(items, lambda i: i.series_instance_uid)]
        rows = await connection.fetch(_UPSERT_SERIES, *_arrays(_SERIES_COLUMNS, series))
        return [r["pk"] for r in rows]

    async def _aggregate(
        self, connection: Connection, series_pks: list[int], moved_from_series: set[int]
    ) -> None:
        """Recompute the counts of every touched series, then study."""
        touched = sorted(set(series_pks) | moved_from_series)
        study_rows = await connection.fetch(_SERIES_AGGREGATES, touched)
        studies = {r["study_fk"] for r in study_rows}
        emptied: set[int] = set()
        if moved_from_series:
            emptied = {
                r["study_fk"] for r in await connection.fetch(_DELETE_EMPTY_SERIES, sorted(moved_from_series))
            }
        await connection.execute(_STUDY_AGGREGATES, sorted(studies))
        if emptied:
            await connection.execute(_DELETE_EMPTY_STUDIES, sorted(emptied))

    async def studies_to_announce(
        self,
        quiet_seconds: float,
        *,
        limit: int = 100,
        on_claimed: Callable[[list[StableStudy]], Awaitable[None]] | None = None,
    ) -> list[StableStudy]:
        """Claim studies that received nothing for ``quiet_seconds`` and were
        not announced since they last changed.

        Claiming marks them announced; ``SKIP LOCKED`` lets several workers
        run this at once without claiming the same study (or waiting on a
        study being indexed).  With ``on_claimed`` (e.g. publish the events)
        the claim commits only if it returns: a crash or a failed publish
        leaves the studies to be claimed again (at-least-once).
        """
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(_CLAIM_STABLE, float(quiet_seconds), limit)
            studies = [
                StableStudy(
                    study_instance_uid=r["study_instance_uid"],
                    patient_id=r["patient_id"] or None,
                    modalities_in_study=list(r["modalities_in_study"]),
                    number_of_series=r["number_of_study_related_series"],
                    number_of_instances=r["number_of_study_related_instances"],
                    last_received_at=r["last_received_at"] or r["last_indexed_at"],
                )
                for r in rows
            ]
            if studies and on_claimed is not None:
                await on_claimed(studies)
        return studies
