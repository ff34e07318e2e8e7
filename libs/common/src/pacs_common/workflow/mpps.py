"""Modality Performed Procedure Steps (table ``mpps``) and their state machine.

PS3.4 F.7: N-CREATE makes a step IN PROGRESS; N-SET modifies it and may
finish it (COMPLETED or DISCONTINUED), after which it may no longer change.
The worklist item a step performs (Scheduled Step Attributes Sequence) has
its SPS status follow it, and the series it produced (Performed Series
Sequence) are recorded.

State and event are kept consistent this way: the change is written in a
transaction, the event is published *inside* it and the transaction commits
only after the broker confirmed.  When publishing fails the transaction
rolls back and the modality gets a failure, never a success without an
event.  The one window left is a commit failing after a confirmed publish:
the event then describes a change that did not happen, the modality got a
failure and retries, and the retry publishes the same state again — so
consumers treat ``(sop_instance_uid, status)`` as idempotent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

import asyncpg
from pydantic import BaseModel, ConfigDict

from pacs_common.messaging.models import MppsCompleted, MppsDiscontinued, MppsEvent, MppsInProgress
from pacs_common.workflow import dicom_json as dj
from pacs_common.workflow.worklist import find_scheduled_steps, set_step_status

IN_PROGRESS: Final = "IN PROGRESS"
COMPLETED: Final = "COMPLETED"
DISCONTINUED: Final = "DISCONTINUED"
STATUSES: Final = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL_STATUSES: Final = (COMPLETED, DISCONTINUED)

PublishEvent = Callable[[MppsEvent], Awaitable[None]]

_COLUMNS: Final = (
    "pk, sop_instance_uid, status, calling_ae_title, attributes, patient_id, accession_number, "
    "study_instance_uid, sps_id, worklist_item_fk, performed_series_uids, created_at, updated_at"
)


class MppsRefusal(StrEnum):
    """Why a request is refused; the gateway maps each to a DIMSE status."""

    DUPLICATE = "duplicate"  # N-CREATE of a SOP Instance UID that exists
    INVALID_STATUS = "invalid-status"  # a status the operation does not allow
    MISSING_STATUS = "missing-status"  # N-CREATE without Performed Procedure Step Status
    FINISHED = "finished"  # N-SET of a COMPLETED / DISCONTINUED step
    UNKNOWN = "unknown"  # N-SET of a step that does not exist


class MppsRefusedError(Exception):
    def __init__(self, refusal: MppsRefusal, reason: str) -> None:
        super().__init__(reason)
        self.refusal = refusal
        self.reason = reason


class MppsRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    pk: int
    sop_instance_uid: str
    status: str
    calling_ae_title: str | None
    attributes: dict[str, Any]
    patient_id: str | None
    accession_number: str | None
    study_instance_uid: str | None
    sps_id: str | None
    worklist_item_fk: int | None
    performed_series_uids: list[str]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> MppsRecord:
        return cls.model_validate(dict(record))

    def event(self) -> MppsEvent:
        """The event announcing this state."""
        fields: dict[str, Any] = {
            "sop_instance_uid": self.sop_instance_uid,
            "calling_ae_title": self.calling_ae_title,
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
            "study_instance_uid": self.study_instance_uid,
            "scheduled_procedure_step_id": self.sps_id,
            "worklist_item_pk": self.worklist_item_fk,
            "performed_series_uids": self.performed_series_uids,
            "modality": dj.text(self.attributes, dj.MODALITY),
            "attributes": self.attributes,
        }
        if self.status == COMPLETED:
            return MppsCompleted(**fields)
        if self.status == DISCONTINUED:
            return MppsDiscontinued(**fields)
        return MppsInProgress(**fields)


def _status_of(attributes: dict[str, Any]) -> str | None:
    return dj.text(attributes, dj.PPS_STATUS)


def _performed_series(attributes: dict[str, Any]) -> list[str]:
    uids: list[str] = []
    for item in dj.items(attributes, dj.PERFORMED_SERIES_SEQUENCE):
        uid = dj.text(item, dj.SERIES_INSTANCE_UID)
        if uid and uid not in uids:
            uids.append(uid)
    return uids


def _references(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dj.items(attributes, dj.SCHEDULED_STEP_ATTRIBUTES_SEQUENCE))


def _identity(attributes: dict[str, Any]) -> dict[str, str | None]:
    reference = next(iter(_references(attributes)), {})
    return {
        "patient_id": dj.text(attributes, dj.PATIENT_ID),
        "accession_number": dj.text(reference, dj.ACCESSION_NUMBER),
        "study_instance_uid": dj.text(reference, dj.STUDY_INSTANCE_UID),
        "sps_id": dj.text(reference, dj.SPS_ID),
    }


async def create(
    pool: asyncpg.Pool,
    sop_instance_uid: str,
    attributes: dict[str, Any],
    *,
    calling_ae_title: str | None,
    publish: PublishEvent,
) -> MppsRecord:
    """N-CREATE: a new IN PROGRESS step.  Raises MppsRefusedError, or whatever
    ``publish`` raises (nothing is then kept)."""
    status = _status_of(attributes)
    if status is None:
        raise MppsRefusedError(MppsRefusal.MISSING_STATUS, "Performed Procedure Step Status missing")
    if status != IN_PROGRESS:
        raise MppsRefusedError(
            MppsRefusal.INVALID_STATUS, f"status must be IN PROGRESS at create, not {status}"
        )
    identity = _identity(attributes)
    async with pool.acquire() as connection, connection.transaction():
        linked = await find_scheduled_steps(connection, _references(attributes))
        record = await connection.fetchrow(
            f"""
            INSERT INTO mpps (sop_instance_uid, status, calling_ae_title, attributes, patient_id,
                              accession_number, study_instance_uid, sps_id, worklist_item_fk,
                              performed_series_uids)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (sop_instance_uid) DO NOTHING
            RETURNING {_COLUMNS}
            """,
            sop_instance_uid,
            status,
            calling_ae_title,
            attributes,
            identity["patient_id"],
            identity["accession_number"],
            identity["study_instance_uid"],
            identity["sps_id"],
            linked[0] if linked else None,
            _performed_series(attributes),
        )
        if record is None:
            raise MppsRefusedError(MppsRefusal.DUPLICATE, f"MPPS {sop_instance_uid} exists")
        await set_step_status(connection, linked, IN_PROGRESS)
        created = MppsRecord.from_record(record)
        await publish(created.event())
    return created


async def update(
    pool: asyncpg.Pool, sop_instance_uid: str, modifications: dict[str, Any], *, publish: PublishEvent
) -> MppsRecord:
    """N-SET: apply ``modifications`` (DICOM JSON; an attribute given
    replaces the stored one, a sequence whole) to an IN PROGRESS step."""
    new_status = _status_of(modifications)
    if dj.PPS_STATUS in modifications and new_status not in STATUSES:
        raise MppsRefusedError(
            MppsRefusal.INVALID_STATUS, f"invalid Performed Procedure Step Status {new_status}"
        )
    async with pool.acquire() as connection, connection.transaction():
        current = await connection.fetchrow(
            f"SELECT {_COLUMNS} FROM mpps WHERE sop_instance_uid = $1 FOR UPDATE", sop_instance_uid
        )
        if current is None:
            raise MppsRefusedError(MppsRefusal.UNKNOWN, f"no MPPS {sop_instance_uid}")
        step = MppsRecord.from_record(current)
        if step.status in FINAL_STATUSES:
            raise MppsRefusedError(
                MppsRefusal.FINISHED,
                f"Performed Procedure Step Object may no longer be updated ({step.status})",
            )
        attributes = {**step.attributes, **modifications}
        status = new_status or step.status
        series = _performed_series(attributes)
        record = await connection.fetchrow(
            f"""
            UPDATE mpps SET status = $2, attributes = $3, performed_series_uids = $4, updated_at = now()
            WHERE pk = $1
            RETURNING {_COLUMNS}
            """,
            step.pk,
            status,
            attributes,
            series,
        )
        assert record is not None
        updated = MppsRecord.from_record(record)
        if status != step.status:
            linked = await find_scheduled_steps(connection, _references(attributes))
            await set_step_status(connection, linked, status)
        await publish(updated.event())
    return updated


async def get(pool: asyncpg.Pool, sop_instance_uid: str) -> MppsRecord | None:
    record = await pool.fetchrow(f"SELECT {_COLUMNS} FROM mpps WHERE sop_instance_uid = $1", sop_instance_uid)
    return None if record is None else MppsRecord.from_record(record)


async def list_steps(pool: asyncpg.Pool, *, status: str | None = None, limit: int = 1000) -> list[MppsRecord]:
    records = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM mpps WHERE $1::text IS NULL OR status = $1
        ORDER BY created_at DESC, pk DESC LIMIT $2
        """,
        status,
        limit,
    )
    return [MppsRecord.from_record(r) for r in records]
