"""Modality Worklist items (table ``worklist_item``).

An item is kept whole as DICOM JSON (what a worklist C-FIND returns) plus the
columns its matching keys need (PS3.4 K.6.1.2.2), one Scheduled Procedure
Step per row: an item given with several steps becomes several rows.  Items
come from ``pacs worklist add`` (options, a DICOM JSON file or a DICOM file)
today, from an HL7/FHIR order feed later; MPPS moves their step status.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict
from pydicom.uid import generate_uid

from pacs_common.dicom.metadata import normalize_for_matching
from pacs_common.workflow import dicom_json as dj

SpsStatus = Literal["SCHEDULED", "ARRIVED", "READY", "STARTED", "IN PROGRESS", "COMPLETED", "DISCONTINUED"]
SCHEDULED: Final = "SCHEDULED"

_COLUMNS: Final = (
    "pk, patient_id, issuer_of_patient_id, patient_name, patient_birth_date, patient_sex, "
    "accession_number, requested_procedure_id, requested_procedure_description, study_instance_uid, "
    "referring_physician_name, sps_id, modality, scheduled_station_ae_title, scheduled_station_name, "
    "sps_start_date, sps_start_time, scheduled_performing_physician_name, sps_description, sps_status, "
    "specific_character_set, attributes, created_at, updated_at"
)


class WorklistItemError(ValueError):
    """An item that cannot be scheduled as given."""


class WorklistItem(BaseModel):
    """One row: one Scheduled Procedure Step of a requested procedure."""

    model_config = ConfigDict(frozen=True)

    pk: int
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    requested_procedure_id: str | None
    requested_procedure_description: str | None
    study_instance_uid: str | None
    referring_physician_name: str | None
    sps_id: str | None
    modality: str | None
    scheduled_station_ae_title: str | None
    scheduled_station_name: str | None
    sps_start_date: str | None
    sps_start_time: str | None
    scheduled_performing_physician_name: str | None
    sps_description: str | None
    sps_status: str
    specific_character_set: str | None
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> WorklistItem:
        return cls.model_validate(dict(record))


def split_steps(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows an item becomes: one per Scheduled Procedure Step, with what
    a modality needs filled in when absent (Study Instance UID, Requested
    Procedure ID, SPS ID, SPS Status SCHEDULED).  Raises WorklistItemError
    for an item without a step or without a patient."""
    steps = list(dj.items(attributes, dj.SCHEDULED_PROCEDURE_STEP_SEQUENCE))
    if not steps:
        raise WorklistItemError("the item has no Scheduled Procedure Step Sequence item")
    if dj.text(attributes, dj.PATIENT_ID) is None and dj.text(attributes, dj.PATIENT_NAME) is None:
        raise WorklistItemError("the item has neither Patient ID nor Patient's Name")
    base = copy.deepcopy(attributes)
    if dj.text(base, dj.STUDY_INSTANCE_UID) is None:
        base[dj.STUDY_INSTANCE_UID] = {"vr": "UI", "Value": [str(generate_uid())]}
    if dj.text(base, dj.REQUESTED_PROCEDURE_ID) is None:
        fallback = dj.text(base, dj.ACCESSION_NUMBER) or _short_id()
        base[dj.REQUESTED_PROCEDURE_ID] = {"vr": "SH", "Value": [fallback[:16]]}
    rows: list[dict[str, Any]] = []
    for index, given in enumerate(steps, start=1):
        step = copy.deepcopy(given)
        if dj.text(step, dj.SPS_ID) is None:
            requested = dj.text(base, dj.REQUESTED_PROCEDURE_ID) or _short_id()
            step[dj.SPS_ID] = {"vr": "SH", "Value": [f"{requested[:12]}.{index}"[:16]]}
        if dj.text(step, dj.SPS_STATUS) is None:
            step[dj.SPS_STATUS] = {"vr": "CS", "Value": [SCHEDULED]}
        row = copy.deepcopy(base)
        row[dj.SCHEDULED_PROCEDURE_STEP_SEQUENCE] = {"vr": "SQ", "Value": [step]}
        rows.append(row)
    return rows


def _short_id() -> str:
    return str(generate_uid()).rsplit(".", 1)[-1][-16:]


def _columns(attributes: dict[str, Any]) -> dict[str, Any]:
    step = dj.first_item(attributes, dj.SCHEDULED_PROCEDURE_STEP_SEQUENCE)
    patient_name = dj.text(attributes, dj.PATIENT_NAME)
    performer = dj.text(step, dj.SCHEDULED_PERFORMING_PHYSICIAN_NAME)
    return {
        "patient_id": dj.text(attributes, dj.PATIENT_ID) or "",
        "issuer_of_patient_id": dj.text(attributes, dj.ISSUER_OF_PATIENT_ID) or "",
        "patient_name": patient_name,
        "patient_name_norm": normalize_for_matching(patient_name),
        "patient_birth_date": dj.text(attributes, dj.PATIENT_BIRTH_DATE),
        "patient_sex": dj.text(attributes, dj.PATIENT_SEX),
        "accession_number": dj.text(attributes, dj.ACCESSION_NUMBER),
        "requested_procedure_id": dj.text(attributes, dj.REQUESTED_PROCEDURE_ID),
        "requested_procedure_description": dj.text(attributes, dj.REQUESTED_PROCEDURE_DESCRIPTION),
        "study_instance_uid": dj.text(attributes, dj.STUDY_INSTANCE_UID),
        "referring_physician_name": dj.text(attributes, dj.REFERRING_PHYSICIAN_NAME),
        "sps_id": dj.text(step, dj.SPS_ID),
        "modality": dj.text(step, dj.MODALITY),
        "scheduled_station_ae_title": dj.text(step, dj.SCHEDULED_STATION_AE_TITLE),
        "scheduled_station_name": dj.text(step, dj.SCHEDULED_STATION_NAME),
        "sps_start_date": dj.text(step, dj.SPS_START_DATE),
        "sps_start_time": dj.text(step, dj.SPS_START_TIME),
        "scheduled_performing_physician_name": performer,
        "scheduled_performing_physician_name_norm": normalize_for_matching(performer),
        "sps_description": dj.text(step, dj.SPS_DESCRIPTION),
        "sps_status": dj.text(step, dj.SPS_STATUS) or SCHEDULED,
        "specific_character_set": dj.text(attributes, dj.SPECIFIC_CHARACTER_SET),
        "attributes": attributes,
    }


async def add_item(pool: asyncpg.Pool, attributes: dict[str, Any]) -> list[WorklistItem]:
    """Schedule an item (DICOM JSON, Unicode); one row per step, in one transaction."""
    rows = [_columns(row) for row in split_steps(attributes)]
    names = list(rows[0])
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    statement = f"INSERT INTO worklist_item ({', '.join(names)}) VALUES ({placeholders}) RETURNING {_COLUMNS}"
    added: list[WorklistItem] = []
    async with pool.acquire() as connection, connection.transaction():
        for row in rows:
            record = await connection.fetchrow(statement, *(row[name] for name in names))
            assert record is not None
            added.append(WorklistItem.from_record(record))
    return added


async def list_items(
    pool: asyncpg.Pool, *, status: str | None = None, limit: int = 1000
) -> list[WorklistItem]:
    """Items by scheduled start (earliest first), optionally of one SPS status."""
    records = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM worklist_item
        WHERE $1::text IS NULL OR sps_status = $1
        ORDER BY sps_start_date NULLS LAST, sps_start_time NULLS LAST, pk
        LIMIT $2
        """,
        status,
        limit,
    )
    return [WorklistItem.from_record(r) for r in records]


async def get_item(pool: asyncpg.Pool, pk: int) -> WorklistItem | None:
    record = await pool.fetchrow(f"SELECT {_COLUMNS} FROM worklist_item WHERE pk = $1", pk)
    return None if record is None else WorklistItem.from_record(record)


async def remove_items(
    pool: asyncpg.Pool, *, pks: list[int] | None = None, accession_number: str | None = None
) -> int:
    """Delete items by pk and/or accession number; returns how many went."""
    if not pks and accession_number is None:
        return 0
    result = await pool.execute(
        """
        DELETE FROM worklist_item
        WHERE pk = ANY($1::bigint[]) OR ($2::text IS NOT NULL AND accession_number = $2)
        """,
        pks or [],
        accession_number,
    )
    return int(result.split()[-1])


async def find_scheduled_steps(
    connection: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, references: list[dict[str, Any]]
) -> list[int]:
    """The worklist rows the Scheduled Step Attributes Sequence items of an
    MPPS name, most specific reference first: SPS ID with the Study Instance
    UID or the Accession Number, else the Accession Number, else the Study
    Instance UID.  Empty for an unscheduled step."""
    found: list[int] = []
    for reference in references:
        sps_id = dj.text(reference, dj.SPS_ID)
        accession = dj.text(reference, dj.ACCESSION_NUMBER)
        study = dj.text(reference, dj.STUDY_INSTANCE_UID)
        if sps_id is None and accession is None and study is None:
            continue
        record = await connection.fetch(
            """
            SELECT pk FROM worklist_item
            WHERE ($1::text IS NULL OR sps_id = $1)
              AND ($2::text IS NOT NULL OR $3::text IS NOT NULL)
              AND ($2::text IS NULL OR accession_number = $2)
              AND ($3::text IS NULL OR study_instance_uid = $3)
            ORDER BY pk
            """,
            sps_id,
            accession,
            study,
        )
        if not record and sps_id is not None:
            # The modality may echo an SPS ID the worklist did not give it.
            record = await connection.fetch(
                """
                SELECT pk FROM worklist_item
                WHERE ($1::text IS NOT NULL OR $2::text IS NOT NULL)
                  AND ($1::text IS NULL OR accession_number = $1)
                  AND ($2::text IS NULL OR study_instance_uid = $2)
                ORDER BY pk
                """,
                accession,
                study,
            )
        found.extend(r["pk"] for r in record if r["pk"] not in found)
    return found


async def set_step_status(
    connection: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, pks: list[int], status: str
) -> None:
    """Move the steps to ``status``, in the column and in the returned item."""
    if not pks:
        return
    await connection.execute(
        """
        UPDATE worklist_item
        SET sps_status = $2,
            attributes = jsonb_set(
                attributes, '{00400100,Value,0,00400020}', jsonb_build_object('vr', 'CS', 'Value',
                jsonb_build_array($2::text)), true),
            updated_at = now()
        WHERE pk = ANY($1::bigint[])
        """,
        pks,
        status,
    )
