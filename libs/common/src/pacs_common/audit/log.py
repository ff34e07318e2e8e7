"""The audit log: each event stored in PostgreSQL (``audit_event``) and, when a
syslog host is configured, sent as an RFC 5424 message carrying the DICOM
audit message XML.  A syslog collector that is down never fails the audited
operation; a database that refuses the event raises (the caller decides)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from pacs_common.audit.messages import atna_xml, syslog_message
from pacs_common.audit.models import (
    EVENT_NAMES,
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

_Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

_COLUMNS: Final = """
    pk, event_time, event_id, event_name, action, outcome, actor, actor_method, actor_roles,
    source_address, patient_id, study_uids, objects, details
"""

_INSERT: Final = f"""
    INSERT INTO audit_event (event_id, event_name, action, outcome, actor, actor_method, actor_roles,
                             source_address, patient_id, study_uids, objects, details)
    -- JSON text, parsed by the server (::text::jsonb): with a bare ::jsonb the
    -- pool's jsonb codec would encode the text again into a JSON string.
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::text::jsonb, $12::text::jsonb)
    RETURNING {_COLUMNS}
"""

_PATIENTS_OF_STUDIES: Final = """
    SELECT DISTINCT p.patient_id, p.patient_name
    FROM study s JOIN patient p ON p.pk = s.patient_fk
    WHERE s.study_instance_uid = ANY($1::text[]) AND p.patient_id <> ''
    ORDER BY p.patient_id
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
        objects=[AuditObject.model_validate(o) for o in _json_value(row["objects"])],
        details=_json_value(row["details"]),
    )


def _json_value(value: Any) -> Any:
    """A jsonb value as the pool's codec decoded it; rows written before
    migration 0014 may still hold the JSON text as a string."""
    return json.loads(value) if isinstance(value, str) else value


async def _patients_of(connection: _Connection, study_uids: Sequence[str]) -> list[AuditObject]:
    if not study_uids:
        return []
    rows = await connection.fetch(_PATIENTS_OF_STUDIES, list(study_uids))
    return [AuditObject(type="patient", id=r["patient_id"], name=r["patient_name"]) for r in rows]


def study_uids_of(objects: Sequence[AuditObject]) -> list[str]:
    return list(dict.fromkeys(o.id for o in objects if o.type == "study"))


class AuditLog:
    """Records audit events (PostgreSQL + syslog) and answers queries.

    Use it from one event loop (the syslog sender's transports belong to it).
    """

    def __init__(self, pool: asyncpg.Pool, settings: AuditSettings) -> None:
        self._pool = pool
        self._source_id = settings.source_id
        self._site_id = settings.enterprise_site_id
        self._syslog: SyslogSender | None = None
        if settings.syslog_host:
            self._syslog = SyslogSender(settings.syslog_host, settings.syslog_port, settings.syslog_protocol)

    @property
    def source_id(self) -> str:
        return self._source_id

    @property
    def site_id(self) -> str | None:
        return self._site_id

    async def patients_of(self, study_uids: Sequence[str]) -> list[AuditObject]:
        """The patients of these studies in the index (as patient objects)."""
        async with self._pool.acquire() as connection:
            return await _patients_of(connection, study_uids)

    async def record(
        self,
        event: AuditEventId,
        action: AuditAction,
        outcome: AuditOutcome,
        *,
        actor: AuditActor,
        objects: Sequence[AuditObject] = (),
        details: Mapping[str, Any] | None = None,
        resolve_patients: bool = False,
    ) -> AuditEvent:
        """Store and send one event.

        With ``resolve_patients``, the patients of the studies named in
        ``objects`` are looked up in the index and added as patient objects
        when ``objects`` names none (a WADO URL names only the study).
        """
        async with self._pool.acquire() as connection:
            found = list(objects)
            if resolve_patients and not any(o.type == "patient" for o in found):
                studies = study_uids_of(found)
                if studies:
                    rows = await connection.fetch(_PATIENTS_OF_STUDIES, studies)
                    found = [
                        *(
                            AuditObject(type="patient", id=r["patient_id"], name=r["patient_name"])
                            for r in rows
                        ),
                        *found,
                    ]
            row = await connection.fetchrow(
                _INSERT,
                event.value,
                EVENT_NAMES[event],
                action.value,
                int(outcome),
                actor.name,
                actor.method,
                sorted(actor.roles),
                actor.address,
                next((o.id for o in found if o.type == "patient"), None),
                study_uids_of(found),
                json.dumps([o.model_dump(exclude_none=True) for o in found]),
                json.dumps(dict(details or {}), default=str),
            )
        assert row is not None
        stored = _event(row)
        if self._syslog is not None:
            xml = atna_xml(stored, self._source_id, self._site_id)
            await self._syslog.send(syslog_message(stored, xml, self._source_id))
        return stored

    async def write(self, record: AuditRecord, *, resolve_patients: bool = False) -> AuditEvent:
        """:meth:`record` of a prepared :class:`AuditRecord`."""
        return await self.record(
            record.event,
            record.action,
            record.outcome,
            actor=record.actor,
            objects=record.objects,
            details=record.details,
            resolve_patients=resolve_patients,
        )

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
