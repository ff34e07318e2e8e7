"""Stored audit events as FHIR R4 AuditEvent resources."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Final

from pacs_common.audit.messages import iso_time
from pacs_common.audit.models import DCM_SYSTEM, OBJECT_CODES, AuditEvent

_FHIR_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_FHIR_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_FHIR_SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"


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
        type_code, role_code, (id_code, id_system, id_meaning) = OBJECT_CODES[obj.type]
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
        "recorded": iso_time(event.time),
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
