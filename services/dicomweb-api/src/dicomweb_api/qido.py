"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

The query parameters become a :class:`QueryRequest` for the query-service,
which owns DICOM matching (single value, wildcard, range, UID list,
universal, sequence matching):

* ``{attribute}={value}``: a matching key; the attribute is a keyword
  (``PatientName``), a tag (``00100010``) or a sequence path
  (``RequestAttributesSequence.RequestedProcedureID``).  UID values may list
  several UIDs separated by commas or backslashes.  A parameter repeated
  gives several values (matched as alternatives).
* ``includefield``: attributes to return besides the defaults (PS3.18
  tables 10.6.3-3/4/5), repeated or comma-separated; ``all`` returns every
  attribute of the level the index holds.
* ``limit`` / ``offset``: paging; ``fuzzymatching=true``: person names match
  by component prefix, case-insensitively.

The response is ``application/dicom+json``: a JSON array with one object per
match, each with the RetrieveURL (0008,1190) of its level.  **No match is
200 with ``[]``** (PS3.18 allows 204; an empty array is what viewers and
dicomweb-client handle most simply, and keeps one code path for clients).
When more matched than returned (``limit``, or the server's maximum), the
response carries ``Warning: 299 dicomweb-api: "The number of results
exceeded..."``.  Invalid parameters are answered 400 with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomweb_api.accept import DICOM_JSON, accepts
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import audited, query_objects
from dicomweb_api.urls import CORP_HEADERS, dicomweb_base, instance_url, series_url, study_url
from pacs_common.audit import AuditAction, AuditEventId
from pacs_common.query import (
    InvalidQueryError,
    QueryLevel,
    QueryRequest,
    QueryUnavailableError,
)

__all__ = ["DEFAULT_RETURN_KEYS", "QidoQuery", "create_router", "parse_qido_query"]

SERVICE: Final = "dicomweb-api"
TRUNCATED_WARNING: Final = (
    f'299 {SERVICE}: "The number of results exceeded the maximum supported by the server. '
    'Additional results can be requested."'
)

STUDY_INSTANCE_UID: Final = "0020000D"
SERIES_INSTANCE_UID: Final = "0020000E"
SOP_INSTANCE_UID: Final = "00080018"
RETRIEVE_URL: Final = "00081190"
SPECIFIC_CHARACTER_SET: Final = "00080005"
REQUEST_ATTRIBUTES_SEQUENCE: Final = "00400275"

#: Default return attributes of each level (PS3.18 tables 10.6.3-3, -4, -5),
#: plus Study Description (every study browser shows it).  RetrieveURL is
#: added by this service.
DEFAULT_RETURN_KEYS: Final[dict[QueryLevel, tuple[str, ...]]] = {
    QueryLevel.STUDY: (
        "00080020",  # StudyDate
        "00080030",  # StudyTime
        "00080050",  # AccessionNumber
        "00080056",  # InstanceAvailability
        "00080061",  # ModalitiesInStudy
        "00080090",  # ReferringPhysicianName
        "00080201",  # TimezoneOffsetFromUTC
        "00081030",  # StudyDescription
        "00100010",  # PatientName
        "00100020",  # PatientID
        "00100030",  # PatientBirthDate
        "00100040",  # PatientSex
        "0020000D",  # StudyInstanceUID
        "00200010",  # StudyID
        "00201206",  # NumberOfStudyRelatedSeries
        "00201208",  # NumberOfStudyRelatedInstances
    ),
    QueryLevel.SERIES: (
        "00080060",  # Modality
        "00080201",  # TimezoneOffsetFromUTC
        "0008103E",  # SeriesDescription
        "0020000E",  # SeriesInstanceUID
        "00200011",  # SeriesNumber
        "00201209",  # NumberOfSeriesRelatedInstances
        "00400244",  # PerformedProcedureStepStartDate
        "00400245",  # PerformedProcedureStepStartTime
        "00400275",  # RequestAttributesSequence
    ),
    QueryLevel.IMAGE: (
        "00080016",  # SOPClassUID
        "00080018",  # SOPInstanceUID
        "00080056",  # InstanceAvailability
        "00080201",  # TimezoneOffsetFromUTC
        "00200013",  # InstanceNumber
        "00280008",  # NumberOfFrames
        "00280010",  # Rows
        "00280011",  # Columns
        "00280100",  # BitsAllocated
    ),
}
# Request Attributes Sequence item keys returned by default (table 10.6.3-4).
_REQUEST_ATTRIBUTE_ITEM_KEYS: Final = (
    "00401001",
    "00400009",
)  # RequestedProcedureID, ScheduledProcedureStepID

_RESERVED: Final = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
_TAG: Final = re.compile(r"^[0-9A-Fa-f]{8}$")
_UID_SEPARATORS: Final = re.compile(r"[,\\]")


class InvalidParameterError(ValueError):
    """A query parameter QIDO-RS cannot take (answered 400 with the message)."""


@dataclass(frozen=True, slots=True)
class QidoQuery:
    """What a QIDO-RS request asks for, before it becomes a QueryRequest."""

    identifier: dict[str, Any]
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False


def _tag_of(attribute: str) -> str:
    """The 8-hex-digit tag of a keyword or tag; InvalidParameterError when unknown."""
    if _TAG.match(attribute):
        return attribute.upper()
    tag = tag_for_keyword(attribute)
    if tag is None:
        raise InvalidParameterError(f"unknown attribute: {attribute!r} (not a DICOM keyword or tag)")
    return f"{tag:08X}"


def _vr_of(tag: str) -> str:
    try:
        vr = dictionary_VR(int(tag, 16))
    except KeyError:
        return "UN"
    return vr.split(" or ")[0] if vr else "UN"


def _values(vr: str, raw: list[str]) -> list[Any]:
    if vr == "UI":
        return [uid.strip() for text in raw for uid in _UID_SEPARATORS.split(text) if uid.strip()]
    if vr == "PN":
        return [{"Alphabetic": text} for text in raw]
    return list(raw)


def _add_key(identifier: dict[str, Any], path: str, raw: list[str]) -> None:
    """Add a matching key (``raw`` values) or a return key (no values) at ``path``."""
    names = path.split(".")
    tags = [_tag_of(name) for name in names]
    target = identifier
    for tag in tags[:-1]:
        if _vr_of(tag) != "SQ":
            raise InvalidParameterError(f"{keyword_for_tag(int(tag, 16)) or tag} is not a sequence")
        element = target.setdefault(tag, {"vr": "SQ", "Value": [{}]})
        if not element.get("Value"):
            element["Value"] = [{}]
        target = element["Value"][0]
    tag = tags[-1]
    vr = _vr_of(tag)
    if vr == "SQ":
        target.setdefault(tag, {"vr": "SQ"})
        return
    existing = target.get(tag)
    if raw:
        values = _values(vr, raw)
        if existing is not None and existing.get("Value"):
            values = existing["Value"] + values
        target[tag] = {"vr": vr, "Value": values} if values else {"vr": vr}
    elif existing is None:
        target[tag] = {"vr": vr}


def _integer(name: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidParameterError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise InvalidParameterError(f"{name} must be at least {minimum}, got {value}")
    return value


def _boolean(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise InvalidParameterError(f"{name} must be true or false, got {text!r}")
    return lowered == "true"


def parse_qido_query(params: Iterable[tuple[str, str]], levels: Iterable[QueryLevel]) -> QidoQuery:
    """The identifier and options of QIDO-RS query parameters, with the
    default return keys of ``levels``; raises InvalidParameterError."""
    identifier: dict[str, Any] = {SPECIFIC_CHARACTER_SET: {"vr": "CS"}}
    matching: dict[str, list[str]] = {}
    include: list[str] = []
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    for name, value in params:
        lowered = name.lower()
        if lowered == "includefield":
            for raw_item in value.split(","):
                item = raw_item.strip()
                if item.lower() == "all":
                    include_all = True
                elif item:
                    include.append(item)
        elif lowered == "limit":
            limit = _integer("limit", value, 1)
        elif lowered == "offset":
            offset = _integer("offset", value, 0)
        elif lowered == "fuzzymatching":
            fuzzy = _boolean("fuzzymatching", value)
        elif name.strip():
            matching.setdefault(name.strip(), []).append(value)
    for level in levels:
        for tag in DEFAULT_RETURN_KEYS[level]:
            _add_key(identifier, tag, [])
        if level is QueryLevel.SERIES:
            sequence = identifier[REQUEST_ATTRIBUTES_SEQUENCE]
            sequence["Value"] = [{tag: {"vr": _vr_of(tag)} for tag in _REQUEST_ATTRIBUTE_ITEM_KEYS}]
    for path in include:
        _add_key(identifier, path, [])
    for path, values in matching.items():
        _add_key(identifier, path, values)
    return QidoQuery(
        identifier=identifier,
        include_all=include_all,
        limit=limit,
        offset=offset,
        fuzzy=fuzzy,
    )


def _uid(match: dict[str, Any], tag: str) -> str | None:
    values = (match.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _with_retrieve_url(match: dict[str, Any], level: QueryLevel, base: str) -> dict[str, Any]:
    study, series, sop = (_uid(match, t) for t in (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID))
    url: str | None = None
    if level is QueryLevel.STUDY and study:
        url = study_url(base, study)
    elif level is QueryLevel.SERIES and study and series:
        url = series_url(base, study, series)
    elif level is QueryLevel.IMAGE and study and series and sop:
        url = instance_url(base, study, series, sop)
    match[RETRIEVE_URL] = {"vr": "UR", "Value": [url]} if url else {"vr": "UR"}
    return dict(sorted(match.items()))


async def _search(
    request: Request,
    context: ApiContext,
    level: QueryLevel,
    levels: tuple[QueryLevel, ...],
    path_keys: dict[str, str],
) -> Response:
    objects = query_objects(request, path_keys.get(STUDY_INSTANCE_UID))
    async with audited(request, AuditEventId.QUERY, AuditAction.EXECUTE, objects=objects):
        return await _find(request, context, level, levels, path_keys)


async def _find(
    request: Request,
    context: ApiContext,
    level: QueryLevel,
    levels: tuple[QueryLevel, ...],
    path_keys: dict[str, str],
) -> Response:
    if not accepts(request.headers.get("accept"), (DICOM_JSON, "application/json")):
        raise HTTPException(status_code=406, detail="QIDO-RS answers application/dicom+json only")
    try:
        query = parse_qido_query(request.query_params.multi_items(), levels)
    except InvalidParameterError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    identifier = dict(query.identifier)
    for tag, uid in path_keys.items():
        identifier[tag] = {"vr": "UI", "Value": [uid]}
    # Hierarchical when every unique key above the level is in the path;
    # otherwise (/series, /instances, /studies/{study}/instances) relational.
    depth = {QueryLevel.STUDY: 0, QueryLevel.SERIES: 1, QueryLevel.IMAGE: 2}[level]
    query_request = QueryRequest(
        level=level,
        identifier=identifier,
        limit=query.limit,
        offset=query.offset,
        fuzzy_matching=query.fuzzy,
        include_all=query.include_all,
        relational=len(path_keys) < depth,
    )
    try:
        stream = await context.query.find(query_request)
        matches = [match async for match in stream]
    except InvalidQueryError as exc:
        raise HTTPException(status_code=400, detail=exc.reason) from exc
    except QueryUnavailableError as exc:
        raise HTTPException(status_code=503, detail=f"query-service unavailable: {exc.reason}") from exc
    base = dicomweb_base(request, context.settings)
    body = [_with_retrieve_url(match, level, base) for match in matches]
    headers = dict(CORP_HEADERS)
    if stream.completion is not None and stream.completion.truncated:
        headers["Warning"] = TRUNCATED_WARNING
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


ReadPrincipal = Annotated[Principal, Depends(require(Permission.READ))]
Context = Annotated[ApiContext, Depends(get_context)]

_SEARCH_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"description": "The matches (an empty array when none)", "content": {DICOM_JSON: {}}},
    400: {"description": "Invalid query parameter (reason in detail)"},
    406: {"description": "The Accept header excludes application/dicom+json"},
    503: {"description": "The query-service is unavailable"},
}


def create_router() -> APIRouter:
    router = APIRouter(tags=["QIDO-RS"], responses=_SEARCH_RESPONSES)
    study_levels = (QueryLevel.STUDY,)
    series_levels = (QueryLevel.SERIES,)
    all_series_levels = (QueryLevel.STUDY, QueryLevel.SERIES)
    instance_levels = (QueryLevel.IMAGE,)

    @router.get("/studies", response_class=Response)
    async def search_studies(request: Request, context: Context, principal: ReadPrincipal) -> Response:
        """Search for studies."""
        return await _search(request, context, QueryLevel.STUDY, study_levels, {})

    @router.get("/series", response_class=Response)
    async def search_all_series(request: Request, context: Context, principal: ReadPrincipal) -> Response:
        """Search for series of any study (study attributes returned too)."""
        return await _search(request, context, QueryLevel.SERIES, all_series_levels, {})

    @router.get("/studies/{study}/series", response_class=Response)
    async def search_study_series(
        study: str, request: Request, context: Context, principal: ReadPrincipal
    ) -> Response:
        """Search for the series of a study."""
        return await _search(request, context, QueryLevel.SERIES, series_levels, {STUDY_INSTANCE_UID: study})

    @router.get("/instances", response_class=Response)
    async def search_all_instances(request: Request, context: Context, principal: ReadPrincipal) -> Response:
        """Search for instances of any study (study and series attributes returned too)."""
        levels = (QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE)
        return await _search(request, context, QueryLevel.IMAGE, levels, {})

    @router.get("/studies/{study}/instances", response_class=Response)
    async def search_study_instances(
        study: str, request: Request, context: Context, principal: ReadPrincipal
    ) -> Response:
        """Search for the instances of a study (series attributes returned too)."""
        levels = (QueryLevel.SERIES, QueryLevel.IMAGE)
        return await _search(request, context, QueryLevel.IMAGE, levels, {STUDY_INSTANCE_UID: study})

    @router.get("/studies/{study}/series/{series}/instances", response_class=Response)
    async def search_series_instances(
        study: str, series: str, request: Request, context: Context, principal: ReadPrincipal
    ) -> Response:
        """Search for the instances of a series."""
        path_keys = {STUDY_INSTANCE_UID: study, SERIES_INSTANCE_UID: series}
        return await _search(request, context, QueryLevel.IMAGE, instance_levels, path_keys)

    return router
