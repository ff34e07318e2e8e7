"""Which AI rules a stable study meets, judged per series from the index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from pacs_common.ai import AiRule, SeriesFacts

__all__ = ["Match", "StudySeries", "load_series", "match_rules"]


@dataclass(frozen=True)
class Match:
    rule: AiRule
    series_instance_uids: list[str]


@dataclass(frozen=True)
class StudySeries:
    """A study's series as the index has them."""

    study_instance_uid: str
    patient_id: str | None
    series: list[SeriesFacts]


async def load_series(db: asyncpg.Pool | asyncpg.Connection, study_instance_uid: str) -> StudySeries:
    rows = await db.fetch(
        """
        SELECT se.series_instance_uid, se.modality, se.body_part_examined, se.sop_classes_in_series,
               p.patient_id
        FROM study st
        JOIN patient p ON p.pk = st.patient_fk
        JOIN series se ON se.study_fk = st.pk
        WHERE st.study_instance_uid = $1
        ORDER BY se.series_number NULLS LAST, se.pk
        """,
        study_instance_uid,
    )
    return StudySeries(
        study_instance_uid=study_instance_uid,
        patient_id=rows[0]["patient_id"] if rows else None,
        series=[
            SeriesFacts(
                series_instance_uid=row["series_instance_uid"],
                modality=row["modality"],
                body_part_examined=row["body_part_examined"],
                sop_class_uids=frozenset(row["sop_classes_in_series"] or ()),
            )
            for row in rows
        ],
    )


def match_rules(rules: Sequence[AiRule], study: StudySeries) -> list[Match]:
    """The enabled rules some series of ``study`` meets, with those series."""
    matches: list[Match] = []
    for rule in rules:
        if not rule.enabled:
            continue
        series = [s.series_instance_uid for s in study.series if rule.matches(s)]
        if series:
            matches.append(Match(rule, series))
    return matches
