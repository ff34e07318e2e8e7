"""``/patients``, ``/studies``, ``/series``, ``/instances``: what the archive
holds, for administrators.

These are listings over the PostgreSQL index (asyncpg), not DICOM
matching (that is QIDO-RS and the query-service): text filters match
case-insensitively as a substring, or as a pattern when they hold ``*``
(any run) or ``?`` (one character); dates are ranges; every listing pages
(``limit``/``offset``, the total in the body and in ``X-Total-Count``) and
sorts by a whitelisted field (``sort=-study_date,patient_name``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final, TypeVar

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from pydantic import BaseModel

from dicomweb_api.api.models import (
    InstanceDetail,
    InstanceLocation,
    InstanceSummary,
    Page,
    PatientSummary,
    SeriesDetail,
    SeriesSummary,
    StudyDetail,
    StudySummary,
)
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from dicomweb_api.security.audit import archive_accessed
from pacs_common.dicom.metadata import normalize_for_matching

__all__ = ["TOTAL_COUNT_HEADER", "ArchiveFilters", "create_router"]

TOTAL_COUNT_HEADER: Final = "X-Total-Count"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
_UID_PATTERN: Final = r"^[0-9]+(\.[0-9]+)*$"

Context = Annotated[ApiContext, Depends(get_context)]
Uid = Annotated[str, Path(pattern=_UID_PATTERN, max_length=64)]
M = TypeVar("M", bound=BaseModel)


class _Level(StrEnum):
    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


# API sort field → SQL expression, per level (the only fields one may sort by).
_PATIENT_SORTS: Final = {
    "patient_id": "p.patient_id",
    "patient_name": "p.patient_name",
    "patient_birth_date": "p.patient_birth_date",
    "number_of_studies": "number_of_studies",
    "created_at": "p.created_at",
}
_STUDY_SORTS: Final = {
    "study_date": "s.study_date",
    "study_time": "s.study_time",
    "accession_number": "s.accession_number",
    "study_description": "s.study_description",
    "patient_id": "p.patient_id",
    "patient_name": "p.patient_name",
    "number_of_instances": "s.number_of_study_related_instances",
    "size_bytes": "s.study_size_bytes",
    "created_at": "s.created_at",
    "last_received_at": "s.last_received_at",
}
_SERIES_SORTS: Final = {
    "series_number": "se.series_number",
    "series_date": "se.series_date",
    "modality": "se.modality",
    "study_date": "s.study_date",
    "number_of_instances": "se.number_of_series_related_instances",
    "size_bytes": "se.series_size_bytes",
    "created_at": "se.created_at",
}
_INSTANCE_SORTS: Final = {
    "instance_number": "i.instance_number",
    "sop_instance_uid": "i.sop_instance_uid",
    "size": "l.size",
    "received_at": "i.received_at",
    "created_at": "i.created_at",
}
# A sort by date also orders by time within the day.
_TIE_BREAKERS: Final = {"s.study_date": "s.study_time", "se.series_date": "se.series_time"}


@dataclass(frozen=True)
class ArchiveFilters:
    """The filters every listing understands (each level applies what concerns it)."""

    patient_id: str | None = None
    patient_name: str | None = None
    study_date_from: str | None = None  # YYYYMMDD
    study_date_to: str | None = None  # YYYYMMDD
    modality: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None


def _dicom_date(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    match = _DATE.match(value)
    if match is None:
        raise HTTPException(status_code=400, detail=f"{name}: expected YYYY-MM-DD or YYYYMMDD")
    text = "".join(match.groups())
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise HTTPException(status_code=400, detail=f"{name}: {value!r} is not a date") from None
    return text


def archive_filters(
    *,
    patient_id: Annotated[
        str | None, Query(max_length=64, description="exact, or a pattern with * ?")
    ] = None,
    patient_name: Annotated[
        str | None, Query(max_length=324, description="case-insensitive substring, or a pattern with * ?")
    ] = None,
    study_date_from: Annotated[str | None, Query(description="YYYY-MM-DD or YYYYMMDD, inclusive")] = None,
    study_date_to: Annotated[str | None, Query(description="YYYY-MM-DD or YYYYMMDD, inclusive")] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    accession_number: Annotated[str | None, Query(max_length=64, description="exact, or * ?")] = None,
) -> ArchiveFilters:
    start = _dicom_date(study_date_from, "study_date_from")
    end = _dicom_date(study_date_to, "study_date_to")
    if start is not None and end is not None and start > end:
        raise HTTPException(status_code=400, detail="study_date_from is after study_date_to")
    return ArchiveFilters(
        patient_id=patient_id,
        patient_name=patient_name,
        study_date_from=start,
        study_date_to=end,
        modality=modality,
        accession_number=accession_number,
    )


Filters = Annotated[ArchiveFilters, Depends(archive_filters)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Offset = Annotated[int, Query(ge=0)]
Sort = Annotated[
    str | None,
    Query(max_length=200, description="comma-separated fields, '-' for descending, e.g. -study_date"),
]


class _Sql:
    """Positional parameters and WHERE conditions being built."""

    def __init__(self) -> None:
        self.params: list[Any] = []
        self.conditions: list[str] = []

    def param(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def where(self) -> str:
        return f"WHERE {' AND '.join(self.conditions)}" if self.conditions else ""


def _pattern(value: str, *, substring: bool) -> tuple[str, bool]:
    """(LIKE pattern or the value, whether it is a pattern)."""
    wildcard = "*" in value or "?" in value
    if not wildcard and not substring:
        return value, False
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if wildcard:
        return escaped.replace("*", "%").replace("?", "_"), True
    return f"%{escaped}%", True


def _text_condition(sql: _Sql, column: str, value: str, *, substring: bool = False) -> str:
    pattern, is_pattern = _pattern(value, substring=substring)
    return f"{column} LIKE {sql.param(pattern)}" if is_pattern else f"{column} = {sql.param(pattern)}"


def _study_conditions(sql: _Sql, filters: ArchiveFilters, *, study_modality: bool) -> list[str]:
    conditions: list[str] = []
    if filters.study_instance_uid is not None:
        conditions.append(f"s.study_instance_uid = {sql.param(filters.study_instance_uid)}")
    if filters.study_date_from is not None:
        conditions.append(f"s.study_date >= {sql.param(filters.study_date_from)}")
    if filters.study_date_to is not None:
        conditions.append(f"s.study_date <= {sql.param(filters.study_date_to)}")
    if filters.accession_number is not None:
        conditions.append(_text_condition(sql, "s.accession_number", filters.accession_number))
    if filters.modality is not None and study_modality:
        conditions.append(f"{sql.param(filters.modality)} = ANY(s.modalities_in_study)")
    return conditions


def _conditions(level: _Level, filters: ArchiveFilters) -> _Sql:
    sql = _Sql()
    if filters.patient_id is not None:
        sql.conditions.append(_text_condition(sql, "p.patient_id", filters.patient_id))
    if filters.patient_name is not None:
        name = normalize_for_matching(filters.patient_name) or ""
        sql.conditions.append(_text_condition(sql, "p.patient_name_norm", name, substring=True))
    if level is _Level.PATIENT:
        study = _study_conditions(sql, filters, study_modality=True)
        if study:
            sql.conditions.append(
                f"EXISTS (SELECT 1 FROM study s WHERE s.patient_fk = p.pk AND {' AND '.join(study)})"
            )
        return sql
    sql.conditions.extend(_study_conditions(sql, filters, study_modality=level is _Level.STUDY))
    if level is _Level.STUDY:
        return sql
    if filters.modality is not None:
        sql.conditions.append(f"se.modality = {sql.param(filters.modality)}")
    if filters.series_instance_uid is not None:
        sql.conditions.append(f"se.series_instance_uid = {sql.param(filters.series_instance_uid)}")
    return sql


def _order_by(sort: str | None, default: str, allowed: dict[str, str], pk: str) -> str:
    terms: list[str] = []
    for raw in (sort or default).split(","):
        field = raw.strip()
        if not field:
            continue
        descending = field.startswith("-")
        name = field.lstrip("+-")
        expression = allowed.get(name)
        if expression is None:
            raise HTTPException(
                status_code=400,
                detail=f"cannot sort by {name!r}; sortable: {', '.join(sorted(allowed))}",
            )
        direction = "DESC NULLS LAST" if descending else "ASC NULLS LAST"
        terms.append(f"{expression} {direction}")
        if expression in _TIE_BREAKERS:
            terms.append(f"{_TIE_BREAKERS[expression]} {direction}")
    if not terms:
        raise HTTPException(status_code=400, detail="sort names no field")
    terms.append(f"{pk} ASC")
    return "ORDER BY " + ", ".join(terms)


_PATIENT_FROM: Final = "FROM patient p"
_STUDY_FROM: Final = "FROM study s JOIN patient p ON p.pk = s.patient_fk"
_SERIES_FROM: Final = (
    "FROM series se JOIN study s ON s.pk = se.study_fk JOIN patient p ON p.pk = s.patient_fk"
)
_INSTANCE_FROM: Final = (
    "FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study s ON s.pk = se.study_fk "
    "JOIN patient p ON p.pk = s.patient_fk LEFT JOIN instance_location l ON l.instance_fk = i.pk"
)
_COUNT_FROM: Final = {
    # Counting does not need the location.
    _Level.INSTANCE: (
        "FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study s ON s.pk = se.study_fk "
        "JOIN patient p ON p.pk = s.patient_fk"
    ),
}

_PATIENT_COLUMNS: Final = """
    p.patient_id, p.issuer_of_patient_id, p.patient_name, p.patient_birth_date, p.patient_sex,
    (SELECT count(*) FROM study c WHERE c.patient_fk = p.pk) AS number_of_studies,
    p.created_at, p.updated_at
"""
_STUDY_COLUMNS: Final = """
    s.study_instance_uid, s.study_date, s.study_time, s.accession_number, s.study_id,
    s.study_description, s.referring_physician_name, s.modalities_in_study,
    s.number_of_study_related_series AS number_of_series,
    s.number_of_study_related_instances AS number_of_instances, s.study_size_bytes AS size_bytes,
    s.availability, p.patient_id, p.issuer_of_patient_id, p.patient_name, p.patient_birth_date,
    p.patient_sex, s.created_at, s.updated_at, s.last_received_at
"""
_SERIES_COLUMNS: Final = """
    se.series_instance_uid, s.study_instance_uid, se.modality, se.series_number,
    se.series_description, se.series_date, se.series_time, se.body_part_examined,
    se.number_of_series_related_instances AS number_of_instances, se.series_size_bytes AS size_bytes,
    se.availability, se.source_ae_title, se.created_at, se.last_received_at
"""
_INSTANCE_COLUMNS: Final = """
    i.sop_instance_uid, i.sop_class_uid, se.series_instance_uid, s.study_instance_uid,
    i.instance_number, i.transfer_syntax_uid, i.number_of_frames, i.rows, i.columns,
    i.availability, l.tier, l.size, i.received_at, i.created_at
"""


async def _page(
    pool: asyncpg.Pool,
    response: Response,
    *,
    level: _Level,
    model: type[M],
    columns: str,
    source: str,
    sql: _Sql,
    order_by: str,
    limit: int,
    offset: int,
) -> tuple[int, list[M]]:
    """(how many match, this page of them); sets ``X-Total-Count``."""
    where = sql.where()
    count_source = _COUNT_FROM.get(level, source)
    async with pool.acquire() as connection:
        total = await connection.fetchval(f"SELECT count(*) {count_source} {where}", *sql.params)
        paging = f"LIMIT {sql.param(limit)} OFFSET {sql.param(offset)}"
        records = await connection.fetch(
            f"SELECT {columns} {source} {where} {order_by} {paging}", *sql.params
        )
    response.headers[TOTAL_COUNT_HEADER] = str(total)
    return int(total), [model.model_validate(dict(r)) for r in records]


def create_router() -> APIRouter:
    router = APIRouter(
        tags=["archive"], dependencies=[Depends(require(Permission.READ)), Depends(archive_accessed)]
    )

    @router.get("/patients", response_model=Page[PatientSummary], summary="List patients")
    async def list_patients(
        *,
        context: Context,
        response: Response,
        filters: Filters,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
        sort: Sort = None,
    ) -> Page[PatientSummary]:
        total, items = await _page(
            context.pool,
            response,
            level=_Level.PATIENT,
            model=PatientSummary,
            columns=_PATIENT_COLUMNS,
            source=_PATIENT_FROM,
            sql=_conditions(_Level.PATIENT, filters),
            order_by=_order_by(sort, "patient_name", _PATIENT_SORTS, "p.pk"),
            limit=limit,
            offset=offset,
        )
        return Page[PatientSummary](total=total, limit=limit, offset=offset, items=items)

    @router.get("/studies", response_model=Page[StudySummary], summary="List studies")
    async def list_studies(
        *,
        context: Context,
        response: Response,
        filters: Filters,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
        sort: Sort = None,
    ) -> Page[StudySummary]:
        total, items = await _page(
            context.pool,
            response,
            level=_Level.STUDY,
            model=StudySummary,
            columns=_STUDY_COLUMNS,
            source=_STUDY_FROM,
            sql=_conditions(_Level.STUDY, filters),
            order_by=_order_by(sort, "-study_date", _STUDY_SORTS, "s.pk"),
            limit=limit,
            offset=offset,
        )
        return Page[StudySummary](total=total, limit=limit, offset=offset, items=items)

    @router.get("/series", response_model=Page[SeriesSummary], summary="List series")
    async def list_series(
        *,
        context: Context,
        response: Response,
        filters: Filters,
        study_instance_uid: Annotated[str | None, Query(pattern=_UID_PATTERN, max_length=64)] = None,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
        sort: Sort = None,
    ) -> Page[SeriesSummary]:
        filters = replace(filters, study_instance_uid=study_instance_uid)
        total, items = await _page(
            context.pool,
            response,
            level=_Level.SERIES,
            model=SeriesSummary,
            columns=_SERIES_COLUMNS,
            source=_SERIES_FROM,
            sql=_conditions(_Level.SERIES, filters),
            order_by=_order_by(sort, "-study_date,series_number", _SERIES_SORTS, "se.pk"),
            limit=limit,
            offset=offset,
        )
        return Page[SeriesSummary](total=total, limit=limit, offset=offset, items=items)

    @router.get("/instances", response_model=Page[InstanceSummary], summary="List instances")
    async def list_instances(
        *,
        context: Context,
        response: Response,
        filters: Filters,
        study_instance_uid: Annotated[str | None, Query(pattern=_UID_PATTERN, max_length=64)] = None,
        series_instance_uid: Annotated[str | None, Query(pattern=_UID_PATTERN, max_length=64)] = None,
        limit: Limit = DEFAULT_LIMIT,
        offset: Offset = 0,
        sort: Sort = None,
    ) -> Page[InstanceSummary]:
        filters = replace(
            filters, study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid
        )
        total, items = await _page(
            context.pool,
            response,
            level=_Level.INSTANCE,
            model=InstanceSummary,
            columns=_INSTANCE_COLUMNS,
            source=_INSTANCE_FROM,
            sql=_conditions(_Level.INSTANCE, filters),
            order_by=_order_by(sort, "instance_number", _INSTANCE_SORTS, "i.pk"),
            limit=limit,
            offset=offset,
        )
        return Page[InstanceSummary](total=total, limit=limit, offset=offset, items=items)

    @router.get(
        "/studies/{study_instance_uid}",
        response_model=StudyDetail,
        summary="A study with its series",
        responses={404: {"description": "no such study"}},
    )
    async def get_study(context: Context, study_instance_uid: Uid) -> StudyDetail:
        async with context.pool.acquire() as connection:
            study = await connection.fetchrow(
                f"""
                SELECT {_STUDY_COLUMNS}, s.pk, s.institution_name, s.patient_age,
                       s.sop_classes_in_study, s.last_accessed_at
                {_STUDY_FROM} WHERE s.study_instance_uid = $1
                """,
                study_instance_uid,
            )
            if study is None:
                raise HTTPException(status_code=404, detail=f"no study {study_instance_uid}")
            series = await connection.fetch(
                f"""
                SELECT {_SERIES_COLUMNS} {_SERIES_FROM} WHERE se.study_fk = $1
                ORDER BY se.series_number ASC NULLS LAST, se.pk
                """,
                study["pk"],
            )
        return StudyDetail.model_validate(
            {**dict(study), "series": [SeriesSummary.model_validate(dict(r)) for r in series]}
        )

    @router.get(
        "/series/{series_instance_uid}",
        response_model=SeriesDetail,
        summary="A series",
        responses={404: {"description": "no such series"}},
    )
    async def get_series(context: Context, series_instance_uid: Uid) -> SeriesDetail:
        async with context.pool.acquire() as connection:
            series = await connection.fetchrow(
                f"""
                SELECT {_SERIES_COLUMNS}, se.pk, p.patient_id, p.patient_name, s.accession_number,
                       s.study_date, se.manufacturer, se.manufacturer_model_name, se.station_name,
                       se.protocol_name, se.sop_classes_in_series
                {_SERIES_FROM} WHERE se.series_instance_uid = $1
                """,
                series_instance_uid,
            )
            if series is None:
                raise HTTPException(status_code=404, detail=f"no series {series_instance_uid}")
            tiers = await connection.fetch(
                """
                SELECT coalesce(l.tier, 'none') AS tier, count(*) AS n
                FROM instance i LEFT JOIN instance_location l ON l.instance_fk = i.pk
                WHERE i.series_fk = $1 GROUP BY 1 ORDER BY 1
                """,
                series["pk"],
            )
        return SeriesDetail.model_validate(
            {**dict(series), "instances_by_tier": {r["tier"]: r["n"] for r in tiers}}
        )

    @router.get(
        "/instances/{sop_instance_uid}",
        response_model=InstanceDetail,
        summary="An instance and where it is stored",
        responses={404: {"description": "no such instance"}},
    )
    async def get_instance(context: Context, sop_instance_uid: Uid) -> InstanceDetail:
        record = await context.pool.fetchrow(
            f"""
            SELECT {_INSTANCE_COLUMNS}, p.patient_id, p.patient_name, se.modality, i.content_date,
                   i.content_time, i.photometric_interpretation, i.bits_allocated, i.source_ae_title,
                   i.content_sha256, i.last_accessed_at, l.backend, l.key, l.sha256, l.stored_at
            {_INSTANCE_FROM} WHERE i.sop_instance_uid = $1
            """,
            sop_instance_uid,
        )
        if record is None:
            raise HTTPException(status_code=404, detail=f"no instance {sop_instance_uid}")
        row = dict(record)
        location = (
            None
            if row["tier"] is None
            else InstanceLocation(
                tier=row["tier"],
                backend=row["backend"],
                key=row["key"],
                size=row["size"],
                sha256=row["sha256"],
                stored_at=row["stored_at"],
            )
        )
        return InstanceDetail.model_validate({**row, "location": location})

    return router
