"""What our own index holds, queried directly (the same answers a C-FIND at
our gateway would give, without the round trip)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from pacs_common.sync.models import SyncFilter
from prefetch_scheduler.forwarding.sender import OutgoingInstance

__all__ = ["LocalIndex", "LocalSeries", "LocalStudy", "Superseded"]


@dataclass(frozen=True)
class LocalStudy:
    study_instance_uid: str
    patient_id: str | None
    study_date: str | None
    modalities: tuple[str, ...]
    instances: int


@dataclass(frozen=True)
class LocalSeries:
    series_instance_uid: str
    modality: str | None
    instances: int


@dataclass(frozen=True)
class Superseded:
    pk: int
    sop_instance_uid: str
    study_instance_uid: str | None
    decision: str
    kept_sha256: str | None
    sha256: str
    current_sha256: str | None


class LocalIndex:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def studies(self, where: SyncFilter) -> list[LocalStudy]:
        rows = await self._pool.fetch(
            """
            SELECT s.study_instance_uid, p.patient_id, s.study_date, s.modalities_in_study,
                   s.number_of_study_related_instances
            FROM study s JOIN patient p ON p.pk = s.patient_fk
            WHERE ($1::text[] IS NULL OR s.modalities_in_study && $1)
              AND ($2::text IS NULL OR s.study_date >= $2)
              AND ($3::text IS NULL OR s.study_date <= $3)
              AND ($4::text[] IS NULL OR p.patient_id = ANY($4))
              AND s.number_of_study_related_instances > 0
            """,
            list(where.modalities) or None,
            where.study_date_from,
            where.study_date_to,
            list(where.patient_ids) or None,
        )
        return [
            LocalStudy(
                r["study_instance_uid"],
                r["patient_id"] or None,
                r["study_date"],
                tuple(r["modalities_in_study"] or ()),
                r["number_of_study_related_instances"],
            )
            for r in rows
        ]

    async def series(self, study_instance_uid: str) -> list[LocalSeries]:
        rows = await self._pool.fetch(
            """
            SELECT se.series_instance_uid, se.modality, se.number_of_series_related_instances
            FROM series se JOIN study s ON s.pk = se.study_fk
            WHERE s.study_instance_uid = $1
            """,
            study_instance_uid,
        )
        return [LocalSeries(r[0], r[1], r[2]) for r in rows]

    async def instances(self, series_instance_uid: str) -> set[str]:
        rows = await self._pool.fetch(
            """
            SELECT i.sop_instance_uid FROM instance i JOIN series se ON se.pk = i.series_fk
            WHERE se.series_instance_uid = $1
            """,
            series_instance_uid,
        )
        return {r[0] for r in rows}

    async def outgoing(self, sop_instance_uids: Sequence[str]) -> list[OutgoingInstance]:
        """Where the index says each instance's object is (for C-STORE)."""
        rows = await self._pool.fetch(
            """
            SELECT i.pk, i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.availability,
                   l.tier, l.key
            FROM instance i LEFT JOIN instance_location l ON l.instance_fk = i.pk
            WHERE i.sop_instance_uid = ANY($1)
            ORDER BY i.pk
            """,
            list(sop_instance_uids),
        )
        return [
            OutgoingInstance(
                item_id=r["pk"],
                sop_instance_uid=r["sop_instance_uid"],
                sop_class_uid=r["sop_class_uid"],
                transfer_syntax_uid=r["transfer_syntax_uid"],
                availability=r["availability"],
                tier=r["tier"],
                key=r["key"],
            )
            for r in rows
        ]

    async def superseded_from(self, source_ae_title: str, relation_id: int) -> list[Superseded]:
        """Objects with a UID we hold and different content that ``source_ae_title``
        sent us, not yet recorded as conflicts of the relation."""
        rows = await self._pool.fetch(
            """
            SELECT x.pk, x.sop_instance_uid, x.study_instance_uid, x.decision, x.kept_sha256, x.sha256,
                   i.content_sha256 AS current_sha256
            FROM instance_superseded x
            LEFT JOIN instance i ON i.sop_instance_uid = x.sop_instance_uid
            WHERE x.source_ae_title = $1 AND x.decision IN ('kept-first', 'replaced')
              AND NOT EXISTS (SELECT 1 FROM sync_conflict c WHERE c.relation_id = $2 AND c.superseded_pk = x.pk)
              -- a conflict found by digest and acted on is not reported again when the copy arrives
              AND NOT EXISTS (
                  SELECT 1 FROM sync_conflict d
                  WHERE d.relation_id = $2 AND d.superseded_pk IS NULL AND d.sop_instance_uid = x.sop_instance_uid
              )
              AND x.decided_at >= (SELECT created_at FROM sync_relation WHERE id = $2)
            ORDER BY x.pk
            """,
            source_ae_title,
            relation_id,
        )
        return [
            Superseded(
                r["pk"],
                r["sop_instance_uid"],
                r["study_instance_uid"],
                r["decision"],
                r["kept_sha256"],
                r["sha256"],
                r["current_sha256"],
            )
            for r in rows
        ]
