"""``/studies/{uid}/key-images``: key images as DICOM Key Object Selection
documents (PS3.3 A.35.4, TID 2010).

A POST builds the document with highdicom from what the index says of the
selected instances (SOP class, series, the patient and study attributes it
inherits), and stores it through the ingest path STOW-RS and C-STORE use
(written to the hot tier, queued for indexing): once indexed it is found
over QIDO-RS and C-FIND like any other instance.  The listing reads the
study's KO instances from the index.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Final

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import CodedConcept, ObserverContext, PersonObserverIdentifyingAttributes
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, require
from pacs_common.dicom.received import InvalidDatasetError
from pacs_common.messaging.broker import PublishError
from pacs_common.messaging.models import IngestSource
from pacs_common.receiving import InstanceReceiver, ReceivedInstance
from pacs_common.storage.base import StorageError

__all__ = ["CodeItem", "KeyImageDocument", "KeyImagesCreate", "KeyImagesStored", "create_router"]

logger = logging.getLogger(__name__)

Context = Annotated[ApiContext, Depends(get_context)]
Clinician = Annotated[Principal, Depends(require(Permission.CLINICAL))]
_UID_PATTERN: Final = r"^[0-9]+(\.[0-9]+)*$"
Uid = Annotated[str, Path(pattern=_UID_PATTERN, max_length=64)]

KEY_OBJECT_SELECTION_SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.88.59"
MANUFACTURER: Final = "PACS"
# Person Name (PN) components hold at most 64 characters.
_MAX_PERSON_NAME: Final = 64


class CodeItem(BaseModel):
    """A coded concept: the document title, from CID 7010 Key Object Selection Document Title."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: str = Field(min_length=1, max_length=16)
    scheme_designator: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


OF_INTEREST: Final = CodeItem(value="113000", scheme_designator="DCM", meaning="Of Interest")


class KeyImagesCreate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # SOP Instance UIDs of the selected instances (all in the study).
    instances: list[Annotated[str, Field(pattern=_UID_PATTERN, max_length=64)]] = Field(
        min_length=1, max_length=10_000
    )
    title: CodeItem = OF_INTEREST
    description: str | None = Field(default=None, max_length=1024)


class KeyImagesStored(BaseModel):
    """The stored document (indexed once the ingest worker has taken it)."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    referenced_instances: list[str]


class KeyImageDocument(BaseModel):
    """A Key Object Selection document of the study, as indexed."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    content_date: str | None
    content_time: str | None
    # The document title (Concept Name Code Sequence), as the index keeps it.
    title: dict[str, str] | None
    referenced_instances: list[str]
    received_at: datetime


_EVIDENCE: Final = """
    SELECT i.sop_instance_uid, i.sop_class_uid, i.rows, i.columns, se.series_instance_uid,
           s.study_instance_uid, s.study_date, s.study_time, s.accession_number, s.study_id,
           s.referring_physician_name, s.specific_character_set,
           p.patient_id, p.patient_name, p.patient_birth_date, p.patient_sex
    FROM instance i
    JOIN series se ON se.pk = i.series_fk
    JOIN study s ON s.pk = se.study_fk
    JOIN patient p ON p.pk = s.patient_fk
    WHERE s.study_instance_uid = $1 AND i.sop_instance_uid = ANY($2::text[])
"""
_REFERENCED: Final = """'$."0040A375".Value[*]."00081115".Value[*]."00081199".Value[*]."00081155".Value[0]'"""


def _evidence(row: asyncpg.Record) -> Dataset:
    """What KeyObjectSelectionDocument needs to know of a selected instance."""
    ds = Dataset()
    if row["specific_character_set"]:
        ds.SpecificCharacterSet = row["specific_character_set"].split("\\")
    ds.SOPClassUID = row["sop_class_uid"]
    ds.SOPInstanceUID = row["sop_instance_uid"]
    ds.SeriesInstanceUID = row["series_instance_uid"]
    ds.StudyInstanceUID = row["study_instance_uid"]
    ds.PatientID = row["patient_id"] or ""
    ds.PatientName = row["patient_name"] or ""
    ds.PatientBirthDate = row["patient_birth_date"] or ""
    ds.PatientSex = row["patient_sex"] or ""
    ds.AccessionNumber = row["accession_number"] or ""
    ds.StudyID = row["study_id"] or ""
    ds.StudyDate = row["study_date"] or ""
    ds.StudyTime = row["study_time"] or ""
    ds.ReferringPhysicianName = row["referring_physician_name"] or ""
    if row["rows"] is not None and row["columns"] is not None:
        ds.Rows = row["rows"]
        ds.Columns = row["columns"]
    return ds


def build_document(
    evidence: list[Dataset], request: KeyImagesCreate, author: str, series_number: int
) -> KeyObjectSelectionDocument:
    """The Key Object Selection document of ``evidence``, in a series of its own."""
    # A subject is no structured name: it becomes the family name ("alice" → "alice^").
    name = author if "^" in author else f"{author[: _MAX_PERSON_NAME - 1]}^"
    observer = ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=PersonObserverIdentifyingAttributes(name=name[:_MAX_PERSON_NAME]),
    )
    content = KeyObjectSelection(
        document_title=CodedConcept(
            value=request.title.value,
            scheme_designator=request.title.scheme_designator,
            meaning=request.title.meaning,
        ),
        referenced_objects=evidence,
        observer_person_context=observer,
        description=request.description,
    )
    return KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )


def _store(
    receiver: InstanceReceiver, document: KeyObjectSelectionDocument, source: IngestSource
) -> ReceivedInstance:
    """Write the document as a Part 10 file and hand it to the ingest path (blocking)."""
    with tempfile.TemporaryDirectory(prefix="pacs-ko-") as spool:
        path = FilePath(spool) / "ko.dcm"
        document.save_as(path, enforce_file_format=True)
        return receiver.receive(path, source)


def create_router() -> APIRouter:
    router = APIRouter(prefix="/studies/{study_instance_uid}/key-images", tags=["clinical"])

    @router.post(
        "",
        response_model=KeyImagesStored,
        status_code=202,
        summary="Select key images: a Key Object Selection document, stored and queued for indexing",
        responses={
            404: {"description": "no such study in the archive"},
            422: {"description": "an instance is not in the study"},
            503: {"description": "storage or the broker failed; nothing was queued"},
        },
    )
    async def create_key_images(
        context: Context,
        principal: Clinician,
        study_instance_uid: Uid,
        selection: KeyImagesCreate,
        request: Request,
    ) -> KeyImagesStored:
        wanted = list(dict.fromkeys(selection.instances))
        rows = await context.pool.fetch(_EVIDENCE, study_instance_uid, wanted)
        if not rows:
            if await context.pool.fetchval(
                "SELECT 1 FROM study WHERE study_instance_uid = $1", study_instance_uid
            ):
                raise HTTPException(status_code=422, detail="none of the instances is in the study")
            raise HTTPException(status_code=404, detail=f"no study {study_instance_uid}")
        by_uid = {row["sop_instance_uid"]: row for row in rows}
        missing = [uid for uid in wanted if uid not in by_uid]
        if missing:
            raise HTTPException(
                status_code=422, detail=f"not in study {study_instance_uid}: {', '.join(missing)}"
            )
        series_number: int = await context.pool.fetchval(
            """
            SELECT coalesce(max(se.series_number), 0) + 1
            FROM series se JOIN study s ON s.pk = se.study_fk WHERE s.study_instance_uid = $1
            """,
            study_instance_uid,
        )
        evidence = [_evidence(by_uid[uid]) for uid in wanted]
        try:
            document = await asyncio.to_thread(
                build_document, evidence, selection, principal.subject, series_number
            )
        except (ValueError, TypeError) as exc:  # e.g. a title highdicom refuses
            raise HTTPException(status_code=422, detail=f"cannot build the document: {exc}") from exc
        client = request.client
        source = IngestSource(protocol="import", peer=f"{client.host}:{client.port}" if client else None)
        try:
            received = await asyncio.to_thread(_store, context.receiver, document, source)
        except (StorageError, PublishError) as exc:
            logger.warning("key images: the document was not stored: %s", exc)
            raise HTTPException(status_code=503, detail=f"not stored: {exc}") from exc
        except InvalidDatasetError as exc:  # our own document: a bug
            logger.exception("key images: the ingest path refused the document")
            raise HTTPException(status_code=500, detail=f"the document was refused: {exc}") from exc
        identity = received.identity
        return KeyImagesStored(
            study_instance_uid=identity.study_instance_uid,
            series_instance_uid=identity.series_instance_uid,
            sop_instance_uid=identity.sop_instance_uid,
            sop_class_uid=identity.sop_class_uid,
            referenced_instances=wanted,
        )

    @router.get(
        "",
        response_model=list[KeyImageDocument],
        summary="The study's Key Object Selection documents (as indexed), oldest first",
        responses={404: {"description": "no such study in the archive"}},
    )
    async def list_key_images(
        context: Context, principal: Clinician, study_instance_uid: Uid
    ) -> list[KeyImageDocument]:
        if (
            await context.pool.fetchval(
                "SELECT 1 FROM study WHERE study_instance_uid = $1", study_instance_uid
            )
            is None
        ):
            raise HTTPException(status_code=404, detail=f"no study {study_instance_uid}")
        rows = await context.pool.fetch(
            f"""
            SELECT s.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.content_date,
                   i.content_time, i.concept_name_code AS title, i.received_at,
                   coalesce(jsonb_path_query_array(m.metadata, {_REFERENCED}), '[]'::jsonb)
                       AS referenced_instances
            FROM instance i
            JOIN series se ON se.pk = i.series_fk
            JOIN study s ON s.pk = se.study_fk
            LEFT JOIN instance_metadata m ON m.instance_fk = i.pk
            WHERE s.study_instance_uid = $1 AND i.sop_class_uid = $2
            ORDER BY i.received_at, i.sop_instance_uid
            """,
            study_instance_uid,
            KEY_OBJECT_SELECTION_SOP_CLASS,
        )
        return [KeyImageDocument.model_validate(dict(row)) for row in rows]

    return router
