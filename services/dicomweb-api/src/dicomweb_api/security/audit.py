"""The audit trail: who accessed or changed which patient's data, when, from
where, with what outcome (IHE ATNA, DICOM PS3.15 Annex A.5).

:class:`AuditLog` records each event in PostgreSQL (``audit_event``) and, when
a syslog host is configured, sends it as an RFC 5424 message carrying the
DICOM audit message XML (UDP, or TCP with RFC 6587 octet counting).  Stored
events are also served as FHIR AuditEvent resources (:func:`fhir_bundle`).
A syslog collector that is down never fails the audited operation; a
database that refuses the event does (the caller decides what to answer).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any, Final, Literal
from xml.etree import ElementTree

import asyncpg
from fastapi import Request
from pydantic import BaseModel, Field

from dicomweb_api.security.dependencies import Principal
from dicomweb_api.security.settings import AuthSettings

__all__ = [
    "AuditAction",
    "AuditEvent",
    "AuditEventId",
    "AuditLog",
    "AuditObject",
    "AuditOutcome",
    "AuditQuery",
    "SyslogSender",
    "atna_xml",
    "fhir_audit_event",
    "fhir_bundle",
    "get_audit_log",
    "syslog_message",
]

logger = logging.getLogger(__name__)

DCM: Final = "DCM"
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
# RFC 5424: facility 10 (security/authorization), severity notice / warning.
_FACILITY_AUTHPRIV: Final = 10
_SEVERITY_NOTICE: Final = 5
_SEVERITY_WARNING: Final = 4
_SYSLOG_MSGID: Final = "IHE+RFC-3881"
_UTF8_BOM: Final = "\ufeff"
_TCP_TIMEOUT_SECONDS: Final = 2.0


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
_OBJECT_CODES: Final[Mapping[str, tuple[int, int, tuple[str, str, str]]]] = {
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
_FHIR_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_FHIR_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_FHIR_SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
_FHIR_NETWORK_TYPE: Final = "http://terminology.hl7.org/CodeSystem/network-type"


class AuditObject(BaseModel):
    """A ParticipantObjectIdentification: what the event was about."""

    type: ObjectType
    id: str
    name: str | None = None
    # For queries: the query itself (e.g. the QIDO query string).
    query: str | None = None


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
    """Filters of ``GET /audit`` (all optional; newest first)."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    study: str | None = None
    patient: str | None = None
    event_id: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)


def get_audit_log(request: Request) -> AuditLog:
    """The app's audit log (``app.state.audit``), as a dependency."""
    audit: AuditLog = request.app.state.audit
    return audit


# --- ATNA XML and syslog ------------------------------------------------------------------


def _coded(parent: ElementTree.Element, tag: str, code: str, system: str, meaning: str) -> None:
    ElementTree.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def atna_xml(event: AuditEvent, source_id: str, site_id: str | None = None) -> str:
    """The DICOM audit message (PS3.15 A.5.1) of ``event``."""
    root = ElementTree.Element("AuditMessage")
    identification = ElementTree.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action.value,
            "EventDateTime": _iso(event.time),
            "EventOutcomeIndicator": str(int(event.outcome)),
        },
    )
    _coded(identification, "EventID", event.event_id, DCM, event.event_name)
    requestor: dict[str, str] = {"UserID": event.actor, "UserIsRequestor": "true"}
    if event.source_address:
        requestor["NetworkAccessPointID"] = event.source_address
        requestor["NetworkAccessPointTypeCode"] = "2"
    participant = ElementTree.SubElement(root, "ActiveParticipant", requestor)
    for role in event.actor_roles:
        _coded(participant, "RoleIDCode", role, "PACS", role)
    ElementTree.SubElement(root, "ActiveParticipant", {"UserID": source_id, "UserIsRequestor": "false"})
    source: dict[str, str] = {"AuditSourceID": source_id}
    if site_id:
        source["AuditEnterpriseSiteID"] = site_id
    source_element = ElementTree.SubElement(root, "AuditSourceIdentification", source)
    _coded(source_element, "AuditSourceTypeCode", "4", DCM, "Application Server")
    for obj in event.objects:
        type_code, role_code, (id_code, id_system, id_meaning) = _OBJECT_CODES[obj.type]
        element = ElementTree.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": obj.id,
                "ParticipantObjectTypeCode": str(type_code),
                "ParticipantObjectTypeCodeRole": str(role_code),
            },
        )
        _coded(element, "ParticipantObjectIDTypeCode", id_code, id_system, id_meaning)
        if obj.name is not None:
            ElementTree.SubElement(element, "ParticipantObjectName").text = obj.name
        if obj.query is not None:
            ElementTree.SubElement(element, "ParticipantObjectQuery").text = obj.query
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=False)


def syslog_message(event: AuditEvent, xml: str, app_name: str, hostname: str | None = None) -> bytes:
    """An RFC 5424 message carrying ``xml`` (facility authpriv, MSGID IHE+RFC-3881)."""
    severity = _SEVERITY_NOTICE if event.outcome == AuditOutcome.SUCCESS else _SEVERITY_WARNING
    priority = _FACILITY_AUTHPRIV * 8 + severity
    host = _header_field(hostname or socket.gethostname(), 255)
    header = f"<{priority}>1 {_iso(event.time)} {host} {_header_field(app_name, 48)} {os.getpid()} {_SYSLOG_MSGID} -"
    return f"{header} {_UTF8_BOM}{xml}".encode()


def _header_field(value: str, limit: int) -> str:
    """PRINTUSASCII without spaces, at most ``limit`` characters ('-' when empty)."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


class _Datagrams(asyncio.DatagramProtocol):
    def error_received(self, exc: Exception) -> None:
        logger.warning("audit syslog send failed", extra={"error": str(exc)})


class SyslogSender:
    """Sends syslog messages without blocking the event loop.

    UDP: one datagram per message.  TCP: RFC 6587 octet counting, one
    connection kept open and reopened after a failure.
    """

    def __init__(self, host: str, port: int, protocol: Literal["udp", "tcp"]) -> None:
        self._host = host
        self._port = port
        self._protocol = protocol
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def send(self, message: bytes) -> bool:
        """True when handed to the network; failures are logged, never raised."""
        try:
            async with self._lock:
                if self._protocol == "udp":
                    await self._send_udp(message)
                else:
                    await asyncio.wait_for(self._send_tcp(message), _TCP_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as exc:
            logger.warning(
                "audit syslog send failed",
                extra={"host": self._host, "port": self._port, "error": str(exc)},
            )
            await self._close_tcp()
            return False
        return True

    async def _send_udp(self, message: bytes) -> None:
        if self._udp is None or self._udp.is_closing():
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(
                _Datagrams, remote_addr=(self._host, self._port)
            )
        self._udp.sendto(message)

    async def _send_tcp(self, message: bytes) -> None:
        if self._tcp is None or self._tcp.is_closing():
            _, self._tcp = await asyncio.open_connection(self._host, self._port)
        self._tcp.write(b"%d " % len(message) + message)
        await self._tcp.drain()

    async def _close_tcp(self) -> None:
        writer, self._tcp = self._tcp, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await self._close_tcp()


# --- the log -----------------------------------------------------------------------------

_COLUMNS: Final = """
    pk, event_time, event_id, event_name, action, outcome, actor, actor_method, actor_roles,
    source_address, patient_id, study_uids, objects, details
"""


def _event(row: asyncpg.Record) -> AuditEvent:
    return AuditEvent(
        id=row["pk"],
        time=row["event_time"],
        event_id=row["event_id"],
        event_name=row["event_name"],
        action=AuditAction(row["action"]),
        outcome=AuditOutcome(row["outcome"]),
        actor=row["actor"],
        actor_method=row["actor_method"],
        actor_roles=list(row["actor_roles"]),
        source_address=row["source_address"],
        patient_id=row["patient_id"],
        study_uids=list(row["study_uids"]),
        objects=[AuditObject.model_validate(o) for o in json.loads(row["objects"])],
        details=json.loads(row["details"]),
    )


class AuditLog:
    """Records audit events (PostgreSQL + syslog) and answers queries."""

    def __init__(self, pool: asyncpg.Pool, settings: AuthSettings) -> None:
        self._pool = pool
        self._source_id = settings.audit_source_id
        self._site_id = settings.audit_enterprise_site_id
        self._syslog: SyslogSender | None = None
        if settings.audit_syslog_host:
            self._syslog = SyslogSender(
                settings.audit_syslog_host, settings.audit_syslog_port, settings.audit_syslog_protocol
            )

    @property
    def source_id(self) -> str:
        return self._source_id

    @property
    def site_id(self) -> str | None:
        return self._site_id

    async def record(
        self,
        principal: Principal | None,
        event: AuditEventId,
        action: AuditAction,
        outcome: AuditOutcome,
        *,
        objects: Sequence[AuditObject] = (),
        details: Mapping[str, Any] | None = None,
        request: Request | None = None,
        actor: str | None = None,
        actor_method: str | None = None,
        source_address: str | None = None,
    ) -> AuditEvent:
        """Store and send one event.

        The actor is ``principal`` (HTTP), or ``actor`` / ``actor_method``
        (e.g. a calling AE title over DIMSE); the source address is the
        request's client unless given.
        """
        if principal is None and request is not None:
            principal = getattr(request.state, "principal", None)
        if source_address is None and request is not None and request.client is not None:
            source_address = request.client.host
        name = actor or (principal.subject if principal else "unknown")
        method = actor_method or (principal.method if principal else "unknown")
        roles = sorted(r.value for r in principal.roles) if principal else []
        patient_id = next((o.id for o in objects if o.type == "patient"), None)
        study_uids = list(dict.fromkeys(o.id for o in objects if o.type == "study"))
        row = await self._pool.fetchrow(
            f"""
            INSERT INTO audit_event (event_id, event_name, action, outcome, actor, actor_method, actor_roles,
                                     source_address, patient_id, study_uids, objects, details)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12::jsonb)
            RETURNING {_COLUMNS}
            """,
            event.value,
            EVENT_NAMES[event],
            action.value,
            int(outcome),
            name,
            method,
            roles,
            source_address,
            patient_id,
            study_uids,
            json.dumps([o.model_dump(exclude_none=True) for o in objects]),
            json.dumps(dict(details or {}), default=str),
        )
        assert row is not None
        stored = _event(row)
        if self._syslog is not None:
            xml = atna_xml(stored, self._source_id, self._site_id)
            await self._syslog.send(syslog_message(stored, xml, self._source_id))
        return stored

    async def query(self, query: AuditQuery) -> list[AuditEvent]:
        rows = await self._pool.fetch(
            f"""
            SELECT {_COLUMNS} FROM audit_event
            WHERE ($1::timestamptz IS NULL OR event_time >= $1)
              AND ($2::timestamptz IS NULL OR event_time < $2)
              AND ($3::text IS NULL OR actor = $3)
              AND ($4::text IS NULL OR study_uids @> ARRAY[$4::text])
              AND ($5::text IS NULL OR patient_id = $5)
              AND ($6::text IS NULL OR event_id = $6)
            ORDER BY event_time DESC, pk DESC
            LIMIT $7 OFFSET $8
            """,
            query.since,
            query.until,
            query.actor,
            query.study,
            query.patient,
            query.event_id,
            query.limit,
            query.offset,
        )
        return [_event(r) for r in rows]

    async def aclose(self) -> None:
        if self._syslog is not None:
            await self._syslog.aclose()


# --- FHIR --------------------------------------------------------------------------------


def fhir_audit_event(event: AuditEvent, source_id: str, site_id: str | None = None) -> dict[str, Any]:
    """``event`` as a FHIR R4 AuditEvent resource."""
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM_SYSTEM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"value": event.actor}, "display": event.actor},
        "requestor": True,
        "role": [{"coding": [{"code": r, "display": r}]} for r in event.actor_roles],
        "extension": [
            {"url": "urn:pacs:audit:actor-method", "valueString": event.actor_method},
        ],
    }
    if event.source_address:
        agent["network"] = {"address": event.source_address, "type": "2"}
    source: dict[str, Any] = {
        "observer": {"display": source_id},
        "type": [{"system": _FHIR_SOURCE_TYPE, "code": "4", "display": "Application Server"}],
    }
    if site_id:
        source["site"] = site_id
    entities: list[dict[str, Any]] = []
    for obj in event.objects:
        type_code, role_code, (id_code, id_system, id_meaning) = _OBJECT_CODES[obj.type]
        entity: dict[str, Any] = {
            "what": {
                "identifier": {
                    "type": {"coding": [{"system": id_system, "code": id_code, "display": id_meaning}]},
                    "value": obj.id,
                }
            },
            "type": {"system": _FHIR_ENTITY_TYPE, "code": str(type_code)},
            "role": {"system": _FHIR_OBJECT_ROLE, "code": str(role_code)},
        }
        if obj.name is not None:
            entity["name"] = obj.name
        if obj.query is not None:
            entity["query"] = base64.b64encode(obj.query.encode()).decode()
        entities.append(entity)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(event.id),
        "type": {"system": DCM_SYSTEM, "code": event.event_id, "display": event.event_name},
        "action": event.action.value,
        "recorded": _iso(event.time),
        "outcome": str(int(event.outcome)),
        "agent": [agent],
        "source": source,
    }
    if entities:
        resource["entity"] = entities
    if event.details:
        resource["outcomeDesc"] = json.dumps(event.details, sort_keys=True)
    return resource


def fhir_bundle(events: Sequence[AuditEvent], source_id: str, site_id: str | None = None) -> dict[str, Any]:
    """A FHIR ``searchset`` Bundle of AuditEvent resources."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(events),
        "entry": [
            {"fullUrl": f"AuditEvent/{e.id}", "resource": fhir_audit_event(e, source_id, site_id)}
            for e in events
        ],
    }
