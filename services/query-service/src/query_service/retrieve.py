"""The instances a C-MOVE / C-GET / WADO-RS request asks for, and where they are.

A retrieve names entities by their unique keys only (PS3.4 C.4.2.2.1): the
unique key of the level is required (PatientID at the PATIENT level, UID
lists at the others); unique keys of the levels above, when given, must
hold too.  Instances without a storage location cannot be sent and are not
listed.  Order: study, series (by number), instance (by number).
"""

from __future__ import annotations

from typing import Final

import asyncpg

from pacs_common.messaging.models import StorageLocation
from pacs_common.query.models import (
    InformationModel,
    QueryLevel,
    RetrievableInstance,
    RetrieveRequest,
)
from query_service.attributes import UNIQUE_KEYS, Kind, levels_from_root
from query_service.engine import PLANNER_SETTINGS
from query_service.identifier import parse_identifier
from query_service.matching import InvalidKeyError, SqlParams, has_wildcard, split_uid_list, sql_in
from query_service.plan import InvalidLevelError

__all__ = ["plan_retrieve", "retrieve_instances"]

_ISSUER_OF_PATIENT_ID: Final = "00100021"

_SELECT: Final = """
SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid,
       i.transfer_syntax_uid, i.availability,
       l.tier, l.backend, l.key, l.size, l.sha256
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
JOIN patient p ON p.pk = st.patient_fk
JOIN instance_location l ON l.instance_fk = i.pk
"""
_ORDER: Final = "ORDER BY st.pk, se.series_number, se.pk, i.instance_number, i.pk"


def plan_retrieve(request: RetrieveRequest) -> tuple[str, list[object]]:
    """SQL and parameters of ``request``; InvalidKeyError / InvalidLevelError when invalid."""
    if request.information_model is InformationModel.STUDY_ROOT and request.level is QueryLevel.PATIENT:
        raise InvalidLevelError("the PATIENT level does not exist in the Study Root information model")
    keys = {key.tag: key for key in parse_identifier(request.identifier)}
    params = SqlParams()
    conditions: list[str] = []
    for level in levels_from_root(request.information_model, request.level):
        unique = UNIQUE_KEYS[level]
        key = keys.get(unique.tag)
        if key is None or not key.values:
            if level is request.level:
                raise InvalidKeyError(f"{unique.keyword} is required to retrieve at the {level} level")
            continue
        if unique.kind is Kind.UID:
            conditions.append(sql_in(unique.column, split_uid_list(key.values), params))
        else:
            if any(has_wildcard(v) for v in key.values):
                raise InvalidKeyError(f"{unique.keyword} cannot have wildcards in a retrieve")
            conditions.append(sql_in(unique.column, list(key.values), params))
            issuer = keys.get(_ISSUER_OF_PATIENT_ID)
            if issuer is not None and issuer.values:
                conditions.append(sql_in("p.issuer_of_patient_id", list(issuer.values), params))
    sql = f"{_SELECT} WHERE {' AND '.join(conditions)} {_ORDER}"
    return sql, params.values


async def retrieve_instances(pool: asyncpg.Pool, request: RetrieveRequest) -> list[RetrievableInstance]:
    sql, params = plan_retrieve(request)
    async with pool.acquire() as connection, connection.transaction(readonly=True):
        await connection.execute(PLANNER_SETTINGS)
        rows = await connection.fetch(sql, *params)
    return [
        RetrievableInstance(
            study_instance_uid=row["study_instance_uid"],
            series_instance_uid=row["series_instance_uid"],
            sop_instance_uid=row["sop_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            transfer_syntax_uid=row["transfer_syntax_uid"],
            availability=row["availability"],
            location=StorageLocation(
                tier=row["tier"],
                backend=row["backend"],
                key=row["key"],
                size=row["size"],
                sha256=row["sha256"],
            ),
        )
        for row in rows
    ]
