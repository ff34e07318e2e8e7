"""Pydantic models of the query-service API (``/v1/...``).

Identifiers travel as the DICOM JSON model (PS3.18 F.2), already decoded to
Unicode by whoever received them (pydicom decodes every Specific Character
Set, ISO 2022 included), so the query-service matches text, not bytes.  An
element with a ``Value`` is a matching key; one without (or with an empty
``Value``) is a universal match that asks for the attribute to be returned.

Streams of matches are NDJSON, one :class:`QueryLine` per line: ``match``
lines, then exactly one ``done`` line (or an ``error`` line when the query
failed after streaming began).  A client closing the connection cancels the
query (C-CANCEL).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pacs_common.messaging.models import StorageLocation

#: Media type of the match streams.
NDJSON = "application/x-ndjson"


class QueryLevel(StrEnum):
    """Query/Retrieve Level (0008,0052)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class InformationModel(StrEnum):
    """Which Q/R information model the query is made in (PS3.4 C.6)."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QueryRequest(_Request):
    """``POST /v1/query``: a C-FIND or QIDO-RS query."""

    level: QueryLevel
    information_model: InformationModel = InformationModel.STUDY_ROOT
    # DICOM JSON of the identifier (without Query/Retrieve Level).
    identifier: dict[str, Any] = Field(default_factory=dict)
    # At most this many matches (QIDO limit); the server's max_matches caps it.
    limit: int | None = Field(default=None, ge=1)
    offset: int = Field(default=0, ge=0)
    # None: the server's default (PACS_QUERY_PN_CASE_INSENSITIVE).
    case_insensitive_pn: bool | None = None
    # QIDO fuzzymatching=true: PN components match by prefix, case-insensitively.
    fuzzy_matching: bool = False
    # Return every attribute of the level held in the stored metadata (QIDO includefield=all).
    include_all: bool = False
    # Extended negotiation "relational queries": no unique keys required above the level.
    relational: bool = False


class WorklistQueryRequest(_Request):
    """``POST /v1/worklist/query``: a Modality Worklist C-FIND (PS3.4 K)."""

    identifier: dict[str, Any] = Field(default_factory=dict)
    limit: int | None = Field(default=None, ge=1)
    offset: int = Field(default=0, ge=0)
    case_insensitive_pn: bool | None = None


class QueryCompletion(BaseModel):
    """How a query ended: the ``done`` line of a stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int = Field(ge=0)
    # True when more entities matched than were returned (limit/max_matches).
    truncated: bool = False
    # The cap that cut the result, when truncated.
    max_matches: int | None = None


class QueryFailure(BaseModel):
    """Why a query was refused or failed (HTTP error body ``detail``, or an ``error`` line)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # invalid-identifier | invalid-level | unsupported | internal
    code: str
    reason: str


class QueryLine(BaseModel):
    """One NDJSON line of a match stream: exactly one field is set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: dict[str, Any] | None = None
    done: QueryCompletion | None = None
    error: QueryFailure | None = None


class RetrieveRequest(_Request):
    """``POST /v1/retrieve``: the instances a C-MOVE / C-GET / WADO-RS asks for.

    ``identifier`` holds the unique keys of the level and the levels above
    (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID; UID list
    matching allowed), as DICOM JSON.
    """

    level: QueryLevel
    information_model: InformationModel = InformationModel.STUDY_ROOT
    identifier: dict[str, Any]


class RetrievableInstance(BaseModel):
    """One instance to send, and where its object is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    # ONLINE | NEARLINE | OFFLINE | UNAVAILABLE
    availability: str = "ONLINE"
    location: StorageLocation


class RetrieveResponse(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    instances: list[RetrievableInstance]
