"""STOW-RS (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}``.

The ``multipart/related; type="application/dicom"`` body is parsed as it
streams and every part is spooled to a file of its own (never the body or a
part in memory).  Only when the whole body arrived intact are the parts
handed, one by one, to the :class:`~pacs_common.receiving.InstanceReceiver`
that C-STORE uses too: validate, store write-once, publish the ingest
message with confirms.  So a body that is too large or malformed stores
nothing, and an instance is reported stored only when it is both stored and
queued.  The response is the Store Instances Response Module as DICOM JSON:
200 all stored, 202 some (with a Warning header), 409 none.

While the archive is overloaded (:mod:`pacs_common.backpressure`) a request
is answered 503 with ``Retry-After`` and a JSON reason before its body is
read: nothing is spooled, stored or queued.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from dicomweb_api.accept import DICOM, DICOM_JSON
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.metrics import DicomwebMetrics
from dicomweb_api.multipart_reader import (
    BodyTooLargeError,
    MalformedMultipartError,
    SpooledPart,
    UnsupportedMediaTypeError,
    boundary_of,
    spool_multipart,
)
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import AuditScope, audited
from dicomweb_api.urls import dicomweb_base, instance_url, study_url
from pacs_common.audit import AuditAction, AuditEventId, AuditOutcome
from pacs_common.backpressure import Backpressure
from pacs_common.dicom.received import DatasetIdentity, InvalidDatasetError, MissingIdentityError
from pacs_common.messaging.broker import PublishError
from pacs_common.messaging.models import IngestSource
from pacs_common.receiving import inspect_part10
from pacs_common.storage.base import StorageError

__all__ = ["FailureReason", "create_router"]

logger = logging.getLogger(__name__)

# Instances are stored (written and published) this many at a time.
_STORE_CONCURRENCY: Final = 4

# Attribute tags of the Store Instances Response Module (PS3.18 Table 10.5.3-2).
_RETRIEVE_URL: Final = "00081190"
_FAILED_SOP_SEQUENCE: Final = "00081198"
_REFERENCED_SOP_SEQUENCE: Final = "00081199"
_REFERENCED_SOP_CLASS_UID: Final = "00081150"
_REFERENCED_SOP_INSTANCE_UID: Final = "00081155"
_FAILURE_REASON: Final = "00081197"


class FailureReason(IntEnum):
    """FailureReason (0008,1197) values (PS3.18 Table 10.5.3-3, PS3.4 Annex B)."""

    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH = 0xA900  # includes "not of the study in the request's path"
    CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True, slots=True)
class _Stored:
    identity: DatasetIdentity


@dataclass(frozen=True, slots=True)
class _Failed:
    reason: FailureReason
    comment: str
    identity: DatasetIdentity | None = None


_Outcome = _Stored | _Failed


def _uid(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _url(value: str | None) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]} if value else {"vr": "UR"}


def _response_dataset(outcomes: list[_Outcome], base: str, path_study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module as DICOM JSON."""
    stored = [o.identity for o in outcomes if isinstance(o, _Stored)]
    failed = [o for o in outcomes if isinstance(o, _Failed)]
    studies = {i.study_instance_uid for i in stored}
    study = path_study or (next(iter(studies)) if len(studies) == 1 else None)
    dataset: dict[str, Any] = {_RETRIEVE_URL: _url(study_url(base, study) if study else None)}
    if failed:
        dataset[_FAILED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [
                {
                    _REFERENCED_SOP_CLASS_UID: _uid(f.identity.sop_class_uid if f.identity else None),
                    _REFERENCED_SOP_INSTANCE_UID: _uid(f.identity.sop_instance_uid if f.identity else None),
                    _FAILURE_REASON: {"vr": "US", "Value": [int(f.reason)]},
                }
                for f in failed
            ],
        }
    if stored:
        dataset[_REFERENCED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [
                {
                    _REFERENCED_SOP_CLASS_UID: _uid(i.sop_class_uid),
                    _REFERENCED_SOP_INSTANCE_UID: _uid(i.sop_instance_uid),
                    _RETRIEVE_URL: _url(
                        instance_url(base, i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid)
                    ),
                }
                for i in stored
            ],
        }
    return dataset


class _PartStorer:
    """Hands spooled parts to the receiver and sorts every failure into a reason."""

    def __init__(self, context: ApiContext, source: IngestSource, path_study: str | None) -> None:
        self._receiver = context.receiver
        self._source = source
        self._path_study = path_study

    def store(self, part: SpooledPart) -> _Outcome:
        """Blocking: run in a worker thread."""
        if part.content_type not in (None, DICOM):
            return _Failed(FailureReason.CANNOT_UNDERSTAND, f"part of type {part.content_type}, not {DICOM}")
        identity: DatasetIdentity | None = None
        try:
            identity, _ = inspect_part10(part.path)
            if self._path_study is not None and identity.study_instance_uid != self._path_study:
                return _Failed(
                    FailureReason.DATASET_DOES_NOT_MATCH,
                    f"Study Instance UID {identity.study_instance_uid} is not the request's {self._path_study}",
                    identity,
                )
            received = self._receiver.receive(part.path, self._source)
        except MissingIdentityError as exc:
            return _Failed(FailureReason.DATASET_DOES_NOT_MATCH, str(exc), identity)
        except InvalidDatasetError as exc:
            return _Failed(FailureReason.CANNOT_UNDERSTAND, str(exc), identity)
        except StorageError as exc:
            logger.error("STOW-RS: storage failed: %s", exc)
            return _Failed(FailureReason.OUT_OF_RESOURCES, "storage unavailable", identity)
        except PublishError as exc:
            logger.error("STOW-RS: publishing the ingest message failed: %s", exc)
            return _Failed(FailureReason.OUT_OF_RESOURCES, "ingest queue unavailable", identity)
        except Exception:
            logger.exception("STOW-RS: storing a part failed")
            return _Failed(FailureReason.PROCESSING_FAILURE, "internal error", identity)
        return _Stored(received.identity)


async def _store_all(storer: _PartStorer, parts: list[SpooledPart]) -> list[_Outcome]:
    limit = asyncio.Semaphore(_STORE_CONCURRENCY)

    async def one(part: SpooledPart) -> _Outcome:
        async with limit:
            return await asyncio.to_thread(storer.store, part)

    return list(await asyncio.gather(*(one(p) for p in parts)))


def _header_text(text: str, limit: int = 200) -> str:
    """``text`` made safe inside a quoted header value."""
    printable = "".join(c if " " <= c <= "~" and c not in '"\\' else " " for c in text)
    return printable[:limit]


def _check_declared_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise HTTPException(status_code=400, detail="invalid Content-Length") from None
    if length > max_bytes:
        raise HTTPException(
            status_code=413, detail=f"the request body ({length} bytes) is larger than {max_bytes} bytes"
        )


def _make_spool_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="stow-", dir=parent))


def _overloaded(request: Request) -> Response | None:
    """A 503 while backpressure refuses new work, else None."""
    backpressure: Backpressure | None = getattr(request.app.state, "backpressure", None)
    refusal = backpressure.refusal() if backpressure is not None else None
    if refusal is None:
        return None
    metrics: DicomwebMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.backpressure_refusals.labels(refusal.reason.value).inc()
    logger.warning("STOW-RS refused: %s", refusal.message, extra={"reason": refusal.reason.value})
    body = {
        "detail": refusal.message,
        "reason": refusal.reason.value,
        "retry_after_seconds": refusal.retry_after_seconds,
    }
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(refusal.retry_after_seconds)})


async def _stow(
    request: Request, context: ApiContext, principal: Principal, path_study: str | None
) -> Response:
    """Stores the request's instances; one audit event (DICOM Instances
    Transferred, Create) lists the studies stored.  Refusals for
    backpressure are not audited (nothing was transferred; under overload
    they would flood the audit log)."""
    refused = _overloaded(request)
    if refused is not None:
        return refused
    async with audited(
        request, AuditEventId.INSTANCES_TRANSFERRED, AuditAction.CREATE, details={"study": path_study}
    ) as scope:
        return await _store_request(request, context, principal, path_study, scope)


async def _store_request(
    request: Request, context: ApiContext, principal: Principal, path_study: str | None, scope: AuditScope
) -> Response:
    settings = context.settings
    try:
        boundary = boundary_of(request.headers.get("content-type"), frozenset({DICOM}))
    except UnsupportedMediaTypeError as exc:
        raise HTTPException(status_code=415, detail=str(exc)) from exc
    except MalformedMultipartError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    _check_declared_length(request, settings.max_stow_request_bytes)

    spool = await asyncio.to_thread(_make_spool_dir, settings.spool_dir)
    try:
        try:
            parts = await spool_multipart(request.stream(), boundary, spool, settings.max_stow_request_bytes)
        except BodyTooLargeError as exc:
            raise HTTPException(status_code=413, detail=str(exc)) from exc
        except MalformedMultipartError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        if not parts:
            raise HTTPException(status_code=400, detail="the multipart body has no parts")
        client = request.client
        source = IngestSource(protocol="stow", peer=f"{client.host}:{client.port}" if client else None)
        outcomes = await _store_all(_PartStorer(context, source, path_study), parts)
    finally:
        await asyncio.to_thread(shutil.rmtree, spool, True)

    failed = [o for o in outcomes if isinstance(o, _Failed)]
    for f in failed:
        logger.warning(
            "STOW-RS: instance not stored: %s",
            f.comment,
            extra={
                "failure_reason": f"0x{int(f.reason):04X}",
                "sop_instance_uid": f.identity.sop_instance_uid if f.identity else None,
                "subject": principal.subject,
            },
        )
    stored_count = len(outcomes) - len(failed)
    for outcome in outcomes:
        if isinstance(outcome, _Stored):
            scope.add("study", outcome.identity.study_instance_uid)
    scope.details.update(stored=stored_count, failed=len(failed))
    if failed:
        scope.outcome = AuditOutcome.MINOR_FAILURE if stored_count else AuditOutcome.SERIOUS_FAILURE
    body = _response_dataset(outcomes, dicomweb_base(request, settings), path_study)
    headers: dict[str, str] = {}
    if not failed:
        status = 200
    else:
        status = 202 if stored_count else 409
        summary = f"{len(failed)} of {len(outcomes)} instances were not stored"
        headers["Warning"] = f'299 pacs "{summary}; first: {_header_text(failed[0].comment)}"'
    return JSONResponse(body, status_code=status, headers=headers, media_type=DICOM_JSON)


def create_router() -> APIRouter:
    router = APIRouter(tags=["STOW-RS"])

    @router.post("/studies", summary="Store instances (STOW-RS)")
    async def store_instances(
        request: Request,
        context: Annotated[ApiContext, Depends(get_context)],
        principal: Annotated[Principal, Depends(require(Permission.STORE))],
    ) -> Response:
        return await _stow(request, context, principal, None)

    @router.post("/studies/{study}", summary="Store instances of one study (STOW-RS)")
    async def store_study_instances(
        study: str,
        request: Request,
        context: Annotated[ApiContext, Depends(get_context)],
        principal: Annotated[Principal, Depends(require(Permission.STORE))],
    ) -> Response:
        return await _stow(request, context, principal, study)

    return router
