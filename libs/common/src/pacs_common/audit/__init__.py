"""The audit trail shared by every service (IHE ATNA, DICOM PS3.15 A.5): who
accessed or changed which patient's data, when, from where, with what
outcome — stored in PostgreSQL, sent over RFC 5424 syslog as DICOM audit
XML, served as FHIR AuditEvent resources."""

from pacs_common.audit.background import BackgroundAuditWriter
from pacs_common.audit.fhir import fhir_audit_event, fhir_bundle
from pacs_common.audit.log import AuditLog
from pacs_common.audit.messages import atna_xml, syslog_message
from pacs_common.audit.models import (
    EVENT_NAMES,
    UNKNOWN_ACTOR,
    AuditAction,
    AuditActor,
    AuditEvent,
    AuditEventId,
    AuditObject,
    AuditOutcome,
    AuditQuery,
    AuditRecord,
)
from pacs_common.audit.settings import AuditSettings
from pacs_common.audit.syslog import SyslogSender

__all__ = [
    "EVENT_NAMES",
    "UNKNOWN_ACTOR",
    "AuditAction",
    "AuditActor",
    "AuditEvent",
    "AuditEventId",
    "AuditLog",
    "AuditObject",
    "AuditOutcome",
    "AuditQuery",
    "AuditRecord",
    "AuditSettings",
    "BackgroundAuditWriter",
    "SyslogSender",
    "atna_xml",
    "fhir_audit_event",
    "fhir_bundle",
    "syslog_message",
]
