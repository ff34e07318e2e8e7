"""DICOM digital signatures (PS3.15 Annex C) over REST, permission READ:

* ``POST /signatures/verify``: a DICOM file (``application/dicom``) in the
  body; its signatures are verified.  When the archive holds an instance
  with the same SOP Instance UID, that stored copy is the reference: the
  report then names the signed elements that differ from it.
* ``GET /studies/{study}/series/{series}/instances/{instance}/signatures``:
  the signatures of a stored instance, read from where the index says it is.

Trust anchors come from ``PACS_SIGNATURE_TRUST_ANCHORS`` (read per request,
like the other optional settings of the API); without them only integrity
and the certificate's validity period are checked.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Annotated, Final

import pydicom
from cryptography import x509
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ValidationError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from dicomweb_api.security.audit import archive_accessed
from pacs_common.dicom.signature_settings import SignatureSettings, SignatureSetupError
from pacs_common.dicom.signatures import SignatureReport, SignatureStatus, verify
from pacs_common.storage import ObjectArchivedError, ObjectNotFoundError, StorageError

__all__ = ["SignatureVerification", "create_router"]

logger = logging.getLogger(__name__)

Context = Annotated[ApiContext, Depends(get_context)]
Uid = Annotated[str, PathParam(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]

#: The largest upload verified (bytes).
MAX_UPLOAD: Final = 1 << 30

_LOCATION_SQL: Final = """
SELECT l.tier, l.key
  FROM instance AS i
  JOIN series AS se ON se.pk = i.series_fk
  JOIN study AS st ON st.pk = se.study_fk
  JOIN instance_location AS l ON l.instance_fk = i.pk
 WHERE i.sop_instance_uid = $1
   AND ($2::text IS NULL OR se.series_instance_uid = $2)
   AND ($3::text IS NULL OR st.study_instance_uid = $3)
 LIMIT 1
"""


class SignatureVerification(BaseModel):
    """The signatures of one object."""

    sop_instance_uid: str | None
    #: True when every signature is valid (False for an unsigned object).
    valid: bool
    #: Whether the archive's copy was used to name changed elements.
    compared_with_archive: bool
    trust_anchors_configured: bool
    signatures: list[SignatureReport]


def _anchors() -> list[x509.Certificate] | None:
    try:
        return SignatureSettings().anchors()
    except (ValidationError, SignatureSetupError) as exc:
        logger.error("signature trust anchors unusable: %s", exc)
        raise HTTPException(status_code=503, detail=f"signature trust anchors unusable: {exc}") from None


async def _stored(
    context: ApiContext, sop_instance_uid: str, series: str | None = None, study: str | None = None
) -> Dataset | None:
    row = await context.pool.fetchrow(_LOCATION_SQL, sop_instance_uid, series, study)
    if row is None:
        return None
    try:
        storage = context.storage.get(row["tier"])
    except KeyError:
        raise HTTPException(status_code=503, detail=f"storage tier {row['tier']} is not configured") from None

    def read() -> Dataset:
        with storage.open(row["key"]) as stream:
            return pydicom.dcmread(io.BytesIO(stream.read()))

    try:
        return await asyncio.to_thread(read)
    except ObjectArchivedError:
        raise HTTPException(
            status_code=409, detail="the object is archived and must be restored first"
        ) from None
    except ObjectNotFoundError:
        raise HTTPException(status_code=404, detail="the stored object is missing") from None
    except StorageError as exc:
        logger.error("signatures: storage failed: %s", exc)
        raise HTTPException(status_code=503, detail="storage unavailable") from None


def _result(
    dataset: Dataset, reports: list[SignatureReport], *, compared: bool, anchors: bool
) -> SignatureVerification:
    uid = dataset.get("SOPInstanceUID")
    return SignatureVerification(
        sop_instance_uid=str(uid) if uid else None,
        valid=bool(reports) and all(r.status is SignatureStatus.VALID for r in reports),
        compared_with_archive=compared,
        trust_anchors_configured=anchors,
        signatures=reports,
    )


def create_router() -> APIRouter:
    router = APIRouter(tags=["signatures"], dependencies=[Depends(require(Permission.READ))])

    @router.post(
        "/signatures/verify",
        response_model=SignatureVerification,
        summary="Verify the digital signatures of an uploaded DICOM file (PS3.15 Annex C)",
        openapi_extra={"requestBody": {"content": {"application/dicom": {"schema": {"type": "string"}}}}},
        responses={400: {"description": "not a DICOM file"}, 413: {"description": "too large"}},
    )
    async def verify_upload(request: Request, context: Context) -> SignatureVerification:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD:
            raise HTTPException(status_code=413, detail=f"larger than {MAX_UPLOAD} bytes")
        body = await request.body()
        try:
            dataset = await asyncio.to_thread(pydicom.dcmread, io.BytesIO(body))
        except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
            raise HTTPException(status_code=400, detail=f"not a readable DICOM file: {exc}") from None
        anchors = await asyncio.to_thread(_anchors)
        uid = dataset.get("SOPInstanceUID")
        reference = await _stored(context, str(uid)) if uid else None
        reports = await asyncio.to_thread(verify, dataset, trust_anchors=anchors, reference=reference)
        return _result(dataset, reports, compared=reference is not None, anchors=anchors is not None)

    @router.get(
        "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}/signatures",
        response_model=SignatureVerification,
        summary="Verify the digital signatures of a stored instance",
        dependencies=[Depends(archive_accessed)],
        responses={404: {"description": "not in the archive"}, 409: {"description": "archived"}},
    )
    async def stored_signatures(
        context: Context, study_instance_uid: Uid, series_instance_uid: Uid, sop_instance_uid: Uid
    ) -> SignatureVerification:
        dataset = await _stored(context, sop_instance_uid, series_instance_uid, study_instance_uid)
        if dataset is None:
            raise HTTPException(
                status_code=404, detail=f"no instance {sop_instance_uid} in that series and study"
            )
        anchors = await asyncio.to_thread(_anchors)
        reports = await asyncio.to_thread(verify, dataset, trust_anchors=anchors)
        return _result(dataset, reports, compared=False, anchors=anchors is not None)

    return router
