"""``POST /v1/worklist/query``: Modality Worklist matching (PS3.4 K.6.1.2).

Matching keys with a column of ``worklist_item`` become SQL conditions built
with the primitives of :mod:`query_service.matching` (wildcards, date/time
ranges, PN component groups, UID lists); any other matching key, in the
Scheduled Procedure Step Sequence item or at the top level, is applied in
Python to the stored item (:mod:`query_service.metadata_match`).  An empty
key matches universally and asks for the attribute to be returned.

Return keys come from the stored item: every key asked for is present
(without ``Value`` when the item has none); a sequence returns its stored
items reduced to the item keys the query listed (all of them when it listed
none).  Values are Unicode; the gateway picks the response character set.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from pacs_common.query.client import WORKLIST_PATH
from pacs_common.query.models import QueryCompletion, QueryFailure, WorklistQueryRequest
from pacs_common.settings import QuerySettings
from query_service.attributes import vr_of
from query_service.engine import fetch_rows
from query_service.identifier import SPECIFIC_CHARACTER_SET, Key, parse_identifier
from query_service.matching import (
    InvalidKeyError,
    SqlParams,
    parse_range,
    split_uid_list,
    sql_in,
    sql_pn,
    sql_range,
    sql_text,
)
from query_service.metadata_match import metadata_matches
from query_service.streaming import ndjson_stream

__all__ = ["WorklistPlan", "create_worklist_router", "plan_worklist_query"]

logger = logging.getLogger(__name__)

SCHEDULED_PROCEDURE_STEP_SEQUENCE: Final = "00400100"


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    # "text" (single value / wildcard), "uid" (UID list), "range" (DA/TM), "pn" (component groups)
    kind: str
    norm: str | None = None


# Top-level matching keys with a column.
_TOP_COLUMNS: Final[dict[str, _Column]] = {
    "00100020": _Column("patient_id", "text"),
    "00100021": _Column("issuer_of_patient_id", "text"),
    "00100010": _Column("patient_name", "pn", "patient_name_norm"),
    "00100030": _Column("patient_birth_date", "range"),
    "00100040": _Column("patient_sex", "text"),
    "00080050": _Column("accession_number", "text"),
    "00401001": _Column("requested_procedure_id", "text"),
    "0020000D": _Column("study_instance_uid", "uid"),
    "00080090": _Column("referring_physician_name", "pn", "upper(referring_physician_name)"),
}
# Scheduled Procedure Step Sequence item keys with a column.
_STEP_COLUMNS: Final[dict[str, _Column]] = {
    "00080060": _Column("modality", "text"),
    "00400001": _Column("scheduled_station_ae_title", "text"),
    "00400010": _Column("scheduled_station_name", "text"),
    "00400002": _Column("sps_start_date", "range"),
    "00400003": _Column("sps_start_time", "range"),
    "00400006": _Column(
        "scheduled_performing_physician_name", "pn", "scheduled_performing_physician_name_norm"
    ),
    "00400009": _Column("sps_id", "text"),
    "00400020": _Column("sps_status", "text"),
}


@dataclass(slots=True)
class WorklistPlan:
    sql: str
    params: list[Any]
    # Matching keys without a column, checked against the stored item.
    python_keys: list[Key]
    return_keys: dict[str, dict[str, Any]]
    case_insensitive_pn: bool
    offset: int
    cap: int
    count: int = 0
    truncated: bool = False

    def completion(self) -> QueryCompletion:
        return QueryCompletion(
            count=self.count, truncated=self.truncated, max_matches=self.cap if self.truncated else None
        )


def _condition(column: _Column, key: Key, params: SqlParams, *, case_insensitive_pn: bool) -> str:
    if column.kind == "uid":
        return sql_in(column.name, split_uid_list(list(key.values)), params)
    if column.kind == "range":
        ranges = [
            sql_range(column.name, parse_range(key.vr if key.vr in {"DA", "TM"} else "DA", value), params)
            for value in key.values
        ]
        return ranges[0] if len(ranges) == 1 else "(" + " OR ".join(ranges) + ")"
    if column.kind == "pn":
        assert column.norm is not None
        groups = [
            sql_pn(column.norm, column.name, value, params, case_insensitive=case_insensitive_pn)
            for value in key.values
        ]
        return groups[0] if len(groups) == 1 else "(" + " OR ".join(groups) + ")"
    texts = [sql_text(column.name, value, params) for value in key.values]
    return texts[0] if len(texts) == 1 else "(" + " OR ".join(texts) + ")"


def plan_worklist_query(request: WorklistQueryRequest, settings: QuerySettings) -> WorklistPlan:
    """Conditions, parameters and return keys; raises InvalidKeyError."""
    keys = parse_identifier(request.identifier)
    case_insensitive_pn = (
        settings.pn_case_insensitive if request.case_insensitive_pn is None else request.case_insensitive_pn
    )
    params = SqlParams()
    conditions: list[str] = []
    python_keys: list[Key] = []
    for key in keys:
        if not key.is_matching:
            continue
        if key.tag == SCHEDULED_PROCEDURE_STEP_SEQUENCE:
            step_python: list[Key] = []
            for item_key in key.items:
                if not item_key.is_matching:
                    continue
                column = _STEP_COLUMNS.get(item_key.tag)
                if column is None or item_key.vr == "SQ":
                    step_python.append(item_key)
                else:
                    time_vr = item_key.tag == "00400003"
                    keyed = item_key if not time_vr else Key(item_key.tag, "TM", item_key.values)
                    conditions.append(
                        _condition(column, keyed, params, case_insensitive_pn=case_insensitive_pn)
                    )
            if step_python:
                python_keys.append(Key(key.tag, "SQ", (), tuple(step_python)))
            continue
        column = _TOP_COLUMNS.get(key.tag)
        if column is None or key.vr == "SQ":
            python_keys.append(key)
        else:
            conditions.append(_condition(column, key, params, case_insensitive_pn=case_insensitive_pn))
    where = " AND ".join(conditions) if conditions else "true"
    sql = (
        "SELECT pk, attributes FROM worklist_item WHERE "
        + where
        + " ORDER BY sps_start_date NULLS LAST, sps_start_time NULLS LAST, pk"
    )
    cap = min(request.limit, settings.max_matches) if request.limit else settings.max_matches
    return WorklistPlan(
        sql=sql,
        params=params.values,
        python_keys=python_keys,
        return_keys=_return_keys(request.identifier),
        case_insensitive_pn=case_insensitive_pn,
        offset=request.offset,
        cap=cap,
    )


def _return_keys(identifier: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        tag.upper(): element
        for tag, element in identifier.items()
        if tag.upper() != SPECIFIC_CHARACTER_SET and not tag.endswith("0000") and isinstance(element, dict)
    }


def _requested_item_tags(element: dict[str, Any]) -> list[str] | None:
    """The item keys of a sequence return key; None: return whole items."""
    values = element.get("Value") or []
    first = values[0] if values and isinstance(values[0], dict) else None
    if not first:
        return None
    return [tag.upper() for tag in first if isinstance(first[tag], dict)]


def build_worklist_match(return_keys: dict[str, dict[str, Any]], stored: dict[str, Any]) -> dict[str, Any]:
    match: dict[str, Any] = {}
    for tag, requested in return_keys.items():
        vr = str(requested.get("vr") or vr_of(tag))
        element = stored.get(tag)
        if not isinstance(element, dict) or not element.get("Value"):
            match[tag] = {"vr": str(element.get("vr")) if isinstance(element, dict) else vr}
            continue
        if vr == "SQ" or element.get("vr") == "SQ":
            item_tags = _requested_item_tags(requested)
            if item_tags is None:
                match[tag] = element
                continue
            nested = {t.upper(): e for t, e in _first_item(requested).items() if isinstance(e, dict)}
            items = [
                build_worklist_match(nested, item) for item in element["Value"] if isinstance(item, dict)
            ]
            match[tag] = {"vr": "SQ", "Value": items}
            continue
        match[tag] = element
    return dict(sorted(match.items()))


def _first_item(element: dict[str, Any]) -> dict[str, Any]:
    values = element.get("Value") or []
    return values[0] if values and isinstance(values[0], dict) else {}


async def stream_worklist(
    pool: asyncpg.Pool, plan: WorklistPlan, fetch_size: int
) -> AsyncIterator[dict[str, Any]]:
    skip = plan.offset
    rows = fetch_rows(pool, plan.sql, plan.params, fetch_size)
    try:
        async for row in rows:
            attributes: dict[str, Any] = row["attributes"] or {}
            if plan.python_keys and not metadata_matches(
                plan.python_keys, attributes, case_insensitive_pn=plan.case_insensitive_pn
            ):
                continue
            if skip:
                skip -= 1
                continue
            if plan.count >= plan.cap:
                plan.truncated = True
                return
            plan.count += 1
            yield build_worklist_match(plan.return_keys, attributes)
    finally:
        await rows.aclose()


def _refusal(reason: str) -> HTTPException:
    return HTTPException(
        status_code=400, detail=QueryFailure(code="invalid-identifier", reason=reason).model_dump()
    )


def create_worklist_router() -> APIRouter:
    router = APIRouter()

    @router.post(WORKLIST_PATH)
    async def worklist_query(body: WorklistQueryRequest, request: Request) -> StreamingResponse:
        pool: asyncpg.Pool = request.app.state.pool
        settings: QuerySettings = request.app.state.settings
        try:
            plan = plan_worklist_query(body, settings)
        except InvalidKeyError as exc:
            raise _refusal(str(exc)) from exc

        def on_close(completed: bool) -> None:
            logger.info(
                "worklist query answered" if completed else "worklist query ended early",
                extra={"matches": plan.count, "truncated": plan.truncated},
            )

        return ndjson_stream(stream_worklist(pool, plan, settings.fetch_size), plan.completion, on_close)

    return router
