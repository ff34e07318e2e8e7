"""Which of a patient's studies at the remote PACS are worth fetching.

Pure rules, no I/O: the studies within the lookback period, except the
scheduled study itself, those of the scheduled modality and body part
first, newest first, at most ``max_studies``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

from prefetch_scheduler.prefetch.models import RemoteStudy

__all__ = ["PriorCriteria", "body_part_of_item", "choose_priors", "parse_dicom_date"]

S = TypeVar("S", bound=RemoteStudy)

_BODY_PART_EXAMINED = "00180015"
_SCHEDULED_PROCEDURE_STEP_SEQUENCE = "00400100"


@dataclass(frozen=True)
class PriorCriteria:
    modality: str | None = None
    body_part: str | None = None
    exclude_study_uid: str | None = None
    # Studies before this date are out of the lookback period (None: no limit).
    earliest: date | None = None
    max_studies: int = 3
    prefer_same_modality: bool = True
    prefer_same_body_part: bool = True


def parse_dicom_date(value: str | None) -> date | None:
    """A DA value (``YYYYMMDD``, or the old ``YYYY.MM.DD``); None when absent or invalid."""
    if not value:
        return None
    digits = value.strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", digits):
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def _same_modality(study: RemoteStudy, modality: str) -> bool:
    return modality.upper() in {m.upper() for m in study.modalities}


def _same_body_part(study: RemoteStudy, body_part: str) -> bool:
    wanted = body_part.strip().upper()
    if study.body_part and study.body_part.strip().upper() == wanted:
        return True
    # Remote PACS rarely answer Body Part Examined at study level; the
    # description usually names it ("CT CHEST W/O").
    description = (study.description or "").upper().replace("_", " ")
    return bool(wanted) and re.search(rf"\b{re.escape(wanted.replace('_', ' '))}\b", description) is not None


def choose_priors(candidates: Iterable[S], criteria: PriorCriteria) -> list[S]:
    """The priors to fetch, in the order to fetch them.  A study found at
    several sources counts once (the first candidate wins); a study without a
    valid date is left out when there is a lookback period (it cannot be
    shown to fall within it)."""
    unique: dict[str, S] = {}
    for study in candidates:
        unique.setdefault(study.study_instance_uid, study)
    eligible: list[S] = []
    for study in unique.values():
        if study.study_instance_uid == criteria.exclude_study_uid:
            continue
        day = parse_dicom_date(study.study_date)
        if criteria.earliest is not None and (day is None or day < criteria.earliest):
            continue
        eligible.append(study)

    def newest(study: S) -> tuple[date, str]:
        return parse_dicom_date(study.study_date) or date.min, (study.study_time or "")

    def relevance(study: S) -> tuple[bool, bool]:
        modality_miss = bool(
            criteria.prefer_same_modality
            and criteria.modality
            and not _same_modality(study, criteria.modality)
        )
        body_miss = bool(
            criteria.prefer_same_body_part
            and criteria.body_part
            and not _same_body_part(study, criteria.body_part)
        )
        return modality_miss, body_miss

    eligible.sort(key=newest, reverse=True)
    eligible.sort(key=relevance)  # stable: newest first within each relevance class
    return eligible[: criteria.max_studies]


def body_part_of_item(attributes: Mapping[str, Any]) -> str | None:
    """Body Part Examined of a worklist item (DICOM JSON), top level or in its
    Scheduled Procedure Step; None when it does not say."""
    places: list[Mapping[str, Any]] = [attributes]
    sequence = attributes.get(_SCHEDULED_PROCEDURE_STEP_SEQUENCE) or {}
    places.extend(item for item in sequence.get("Value") or [] if isinstance(item, Mapping))
    for place in places:
        element = place.get(_BODY_PART_EXAMINED) or {}
        values = element.get("Value") or []
        if values and isinstance(values[0], str) and values[0].strip():
            return values[0].strip()
    return None
