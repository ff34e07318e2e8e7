"""The DICOM audit message XML (PS3.15 A.5.1) and its RFC 5424 syslog envelope."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Final
from xml.etree import ElementTree

from pacs_common.audit.models import DCM, OBJECT_CODES, AuditEvent, AuditOutcome

# RFC 5424: facility 10 (security/authorization), severity notice / warning.
_FACILITY_AUTHPRIV: Final = 10
_SEVERITY_NOTICE: Final = 5
_SEVERITY_WARNING: Final = 4
_SYSLOG_MSGID: Final = "IHE+RFC-3881"
_UTF8_BOM: Final = "\ufeff"


def iso_time(moment: datetime) -> str:
    """UTC, milliseconds, ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _coded(parent: ElementTree.Element, tag: str, code: str, system: str, meaning: str) -> None:
    ElementTree.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def atna_xml(event: AuditEvent, source_id: str, site_id: str | None = None) -> str:
    """The DICOM audit message (PS3.15 A.5.1) of ``event``."""
    root = ElementTree.Element("AuditMessage")
    identification = ElementTree.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action.value,
            "EventDateTime": iso_time(event.time),
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
        type_code, role_code, (id_code, id_system, id_meaning) = OBJECT_CODES[obj.type]
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
    header = f"<{priority}>1 {iso_time(event.time)} {host} {_header_field(app_name, 48)} {os.getpid()} {_SYSLOG_MSGID} -"
    return f"{header} {_UTF8_BOM}{xml}".encode()


def _header_field(value: str, limit: int) -> str:
    """PRINTUSASCII without spaces, at most ``limit`` characters ('-' when empty)."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"
