"""The audit event model: DICOM audit message codes (PS3.15 A.5, PS3.16 CID 400)
and the event as stored in ``audit_event``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

DCM: Final = "DCM"
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"


class AuditEventId(StrEnum):
    """EventID (DCM codes of PS3.16 CID 400 Audit Event ID)."""

    APPLICATION_ACTIVITY = "110100"
    AUDIT_LOG_USED = "110101"
    BEGIN_TRANSFERRING = "110102"
    INSTANCES_ACCESSED = "110103"
    INSTANCES_TRANSFERRED = "110104"
    STUDY_DELETED = "110105"
    EXPORT = "110106"
    IMPORT = "110107"
    NETWORK_ENTRY = "110108"
    ORDER_RECORD = "110109"
    PATIENT_RECORD = "110110"
    PROCEDURE_RECORD = "110111"
    QUERY = "110112"
    SECURITY_ALERT = "110113"
    USER_AUTHENTICATION = "110114"


EVENT_NAMES: Final[Mapping[AuditEventId, str]] = {
    AuditEventId.APPLICATION_ACTIVITY: "Application Activity",
    AuditEventId.AUDIT_LOG_USED: "Audit Log Used",
    AuditEventId.BEGIN_TRANSFERRING: "Begin Transferring DICOM Instances",
    AuditEventId.INSTANCES_ACCESSED: "DICOM Instances Accessed",
    AuditEventId.INSTANCES_TRANSFERRED: "DICOM Instances Transferred",
    AuditEventId.STUDY_DELETED: "DICOM Study Deleted",
    AuditEventId.EXPORT: "Export",
    AuditEventId.IMPORT: "Import",
    AuditEventId.NETWORK_ENTRY: "Network Entry",
    AuditEventId.ORDER_RECORD: "Order Record",
    AuditEventId.PATIENT_RECORD: "Patient Record",
    AuditEventId.PROCEDURE_RECORD: "Procedure Record",
    AuditEventId.QUERY: "Query",
    AuditEventId.SECURITY_ALERT: "Security Alert",
    AuditEventId.USER_AUTHENTICATION: "User Authentication",
}


class AuditAction(StrEnum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class AuditOutcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


ObjectType = Literal["patient", "study", "series", "instance", "query", "user", "token", "node", "other"]

# ParticipantObjectIdentification per object type: (TypeCode, TypeCodeRole,
# IDTypeCode (code, system, meaning)).  PS3.15 A.5.3 / RFC 3881.
OBJECT_CODES: Final[Mapping[str, tuple[int, int, tuple[str, str, str]]]] = {
    "patient": (1, 1, ("2", "RFC-3881", "Patient Number")),
    "study": (2, 3, ("110180", DCM, "Study Instance UID")),
    "series": (2, 3, ("112002", DCM, "Series Instance UID")),
    # No DCM code names a SOP Instance UID as an object id: a local code.
    "instance": (2, 3, ("sop-instance-uid", "PACS", "SOP Instance UID")),
    "query": (2, 3, ("110181", DCM, "SOP Class UID")),
    "user": (1, 6, ("11", "RFC-3881", "User Identifier")),
    "token": (2, 13, ("12", "RFC-3881", "URI")),
    "node": (2, 13, ("110182", DCM, "Node ID")),
    "other": (4, 13, ("12", "RFC-3881", "URI")),
}


class AuditObject(BaseModel):
    """A ParticipantObjectIdentification: what the event was about."""

    type: ObjectType
    id: str
    name: str | None = None
    # For queries: the query itself (e.g. the QIDO query string).
    query: str | None = None


class AuditActor(BaseModel):
    """Who did it (the requesting ActiveParticipant): a user (HTTP) or a
    calling AE title (DIMSE), and the network address it came from."""

    model_config = ConfigDict(frozen=True)

    name: str
    method: str
    roles: tuple[str, ...] = ()
    address: str | None = None


UNKNOWN_ACTOR: Final = AuditActor(name="unknown", method="unknown")


class AuditRecord(BaseModel):
    """An event to record (what :class:`AuditEvent` becomes once stored)."""

    event: AuditEventId
    action: AuditAction
    outcome: AuditOutcome
    actor: AuditActor
    objects: list[AuditObject] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)


class AuditEvent(BaseModel):
    """One stored audit event."""

    id: int
    time: datetime
    event_id: str
    event_name: str
    action: AuditAction
    outcome: AuditOutcome
    actor: str
    actor_method: str
    actor_roles: list[str]
    source_address: str | None
    patient_id: str | None
    study_uids: list[str]
    objects: list[AuditObject]
    details: dict[str, Any]


class AuditQuery(BaseModel):
    """Filters of an audit log query (all optional; newest first)."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    study: str | None = None
    patient: str | None = None
    event_id: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)
