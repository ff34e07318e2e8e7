"""DICOM media over the REST API: File-set exports (as zips) and zip imports.

``POST /exports`` checks the request, records an EXPORT job (running, its
total = the instances of the studies) and answers 202 at once; the job
builds the File-set (:class:`~pacs_common.media.export.FileSetExporter`) in
a spool folder of this API replica, reporting progress per instance and
stopping when the job is cancelled.  ``GET /exports/{id}/download`` then
streams that folder as a zip (:func:`~pacs_common.media.zipstream.iter_zip`:
chunks, never a file or the archive in memory).

Why a finished spool rather than building while streaming: the DICOMDIR can
only be written once every instance is known and has its File ID, the job's
progress and failures are known before the first byte is sent (no half zip
for a failure in the middle), and the download can be repeated.  The price
is disk space in the spool for the retention time (``PACS_MEDIA_*``), and
the download must reach the replica that built the export (with several
replicas: session affinity on ``/api/v1/exports``).

``POST /imports`` takes an ``application/zip`` body, spooled to a file as
it streams, and imports it with :class:`~pacs_common.media.importing.MediaImporter`
through the same receiver as STOW-RS; the answer is the per-file report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import audited
from pacs_common.audit import AuditAction, AuditEventId, AuditObject, AuditOutcome
from pacs_common.dicom.deidentify import MIN_SALT_BYTES, Deidentifier, DeidentifyOptions, DeidentifySettings
from pacs_common.dicom.signature_settings import SignatureSettings, SignatureSetupError, Signer
from pacs_common.jobs import Job, JobKind, JobRepository, JobState
from pacs_common.media.export import (
    ExportCancelledError,
    ExportOptions,
    ExportResult,
    ExportSource,
    FileSetExporter,
    MissingStudiesError,
    find_export_sources,
)
from pacs_common.media.importing import ImportReport, MediaImporter
from pacs_common.media.settings import MediaSettings
from pacs_common.media.zipstream import iter_zip
from pacs_common.messaging.models import IngestSource

__all__ = ["ExportAccepted", "ExportRequest", "ExportStatus", "create_router"]

logger = logging.getLogger(__name__)

Context = Annotated[ApiContext, Depends(get_context)]
Exporter = Annotated[Principal, Depends(require(Permission.EXPORT))]
Storer = Annotated[Principal, Depends(require(Permission.STORE))]
JobId = Annotated[int, PathParam(ge=1)]
Uid = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]

ZIP: Final = "application/zip"
_FILE_SET: Final = "fileset"
_RESULT: Final = "result.json"
_UPLOAD_CHUNK: Final = 1024 * 1024
_PROGRESS_TIMEOUT_SECONDS: Final = 30.0
_PROGRESS_INTERVAL_SECONDS: Final = 0.25


class ExportRequest(BaseModel):
    study_uids: list[Uid] = Field(min_length=1, max_length=1000)
    deidentify: bool = False
    explicit_vr_little_endian: bool = False
    # Sign every instance with the deployment's key (PACS_SIGNATURE_*).
    sign: bool = False
    deidentify_options: DeidentifyOptions | None = None


class ExportAccepted(BaseModel):
    job: Job
    status_url: str
    download_url: str


class ExportStatus(BaseModel):
    job: Job
    instances_written: int | None = None
    failures: list[dict[str, str]] = Field(default_factory=list)
    download_url: str | None = None


def _exports_dir(context: ApiContext) -> Path:
    return context.settings.spool_dir / "exports"


def _deidentifier(request: ExportRequest) -> Deidentifier | None:
    if not request.deidentify:
        return None
    try:
        salt = DeidentifySettings().salt_bytes()
    except ValidationError:
        raise HTTPException(
            status_code=503,
            detail="de-identification is not configured: PACS_DEIDENTIFY_SALT must be set "
            f"(at least {MIN_SALT_BYTES} bytes)",
        ) from None
    return Deidentifier(salt, request.deidentify_options or DeidentifyOptions())


def _signer(request: ExportRequest) -> Signer | None:
    if not request.sign:
        return None
    try:
        return SignatureSettings().signer()
    except (SignatureSetupError, ValidationError) as exc:
        raise HTTPException(status_code=503, detail=f"signing is not configured: {exc}") from None


def _sweep(exports: Path, retention_seconds: float) -> None:
    """Remove exports older than the retention time (blocking)."""
    if not exports.is_dir():
        return
    cutoff = time.time() - retention_seconds
    for entry in exports.iterdir():
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _write_result(folder: Path, result: ExportResult) -> None:
    summary = {
        "instances_written": result.instances_written,
        "failures": [{"sop_instance_uid": f.sop_instance_uid, "reason": f.reason} for f in result.failures],
    }
    (folder / _RESULT).write_text(json.dumps(summary))


def _read_result(folder: Path) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads((folder / _RESULT).read_text())
    except (OSError, ValueError):
        return None
    return loaded


class _ExportRun:
    """One export job: the File-set built in a thread, progress to the job table."""

    def __init__(
        self,
        context: ApiContext,
        job_id: int,
        exporter: FileSetExporter,
        sources: list[ExportSource],
        folder: Path,
    ) -> None:
        self._jobs = JobRepository(context.pool)
        self._job_id = job_id
        self._exporter = exporter
        self._sources = sources
        self._folder = folder

    async def run(self) -> None:
        loop = asyncio.get_running_loop()

        last = 0.0

        def progress(done: int, total: int) -> bool:
            # At most a few updates a second (each is a database round trip).
            nonlocal last
            now = time.monotonic()
            if done < total and now - last < _PROGRESS_INTERVAL_SECONDS:
                return True
            last = now
            report = self._jobs.report_progress(self._job_id, done, total)
            future = asyncio.run_coroutine_threadsafe(report, loop)
            return future.result(timeout=_PROGRESS_TIMEOUT_SECONDS)

        try:
            result = await asyncio.to_thread(
                self._exporter.export, self._sources, self._folder / _FILE_SET, progress
            )
            await asyncio.to_thread(_write_result, self._folder, result)
        except ExportCancelledError:
            logger.info("export cancelled", extra={"job_id": self._job_id})
            await asyncio.to_thread(shutil.rmtree, self._folder, True)
            return
        except Exception as exc:
            logger.exception("export failed", extra={"job_id": self._job_id})
            await asyncio.to_thread(shutil.rmtree, self._folder, True)
            error = f"export failed: {exc}"
            await self._finish(lambda: self._jobs.fail(self._job_id, error))
            return
        if not result.instances_written:
            first = result.failures[0].reason if result.failures else "nothing to export"
            await self._finish(lambda: self._jobs.fail(self._job_id, f"no instance exported: {first}"))
            return
        await self._finish(lambda: self._jobs.complete(self._job_id))
        logger.info(
            "export done",
            extra={
                "job_id": self._job_id,
                "instances_written": result.instances_written,
                "failures": len(result.failures),
            },
        )

    async def _finish(self, transition: Callable[[], Awaitable[Job]]) -> None:
        try:
            await transition()
        except Exception:  # cancelled meanwhile: the job keeps that state
            logger.info("export job not finished: its state changed", extra={"job_id": self._job_id})


async def _spool_body(request: Request, target: Path, max_bytes: int) -> int:
    """The request body streamed to ``target``; its size (413 past ``max_bytes``)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(status_code=413, detail=f"the upload is larger than {max_bytes} bytes")
    size = 0
    out = await asyncio.to_thread(target.open, "wb")
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(status_code=413, detail=f"the upload is larger than {max_bytes} bytes")
            await asyncio.to_thread(out.write, chunk)
    finally:
        await asyncio.to_thread(out.close)
    return size


def create_router(settings: MediaSettings | None = None) -> APIRouter:
    media = settings or MediaSettings()
    router = APIRouter(tags=["media"])
    # Export jobs running in this process (kept referenced until they end).
    running: set[asyncio.Task[None]] = set()

    @router.post(
        "/exports",
        status_code=202,
        response_model=ExportAccepted,
        summary="Export studies as a DICOM File-set (DICOMDIR), built by a job, downloaded as a zip",
        responses={404: {"description": "a study is not in the archive"}, 503: {"description": "no salt"}},
    )
    async def create_export(
        request: Request, response: Response, context: Context, principal: Exporter, body: ExportRequest
    ) -> ExportAccepted:
        async with audited(
            request,
            AuditEventId.EXPORT,
            AuditAction.READ,
            objects=[AuditObject(type="study", id=uid) for uid in body.study_uids],
            details={"operation": "media-export", "deidentify": body.deidentify},
        ):
            deidentifier = _deidentifier(body)
            signer = _signer(body)
            try:
                sources = await find_export_sources(context.pool, body.study_uids)
            except MissingStudiesError as exc:
                raise HTTPException(status_code=404, detail=str(exc)) from exc
            options = ExportOptions(
                deidentify=body.deidentify,
                explicit_vr_little_endian=body.explicit_vr_little_endian,
                sign=body.sign,
            )
            exporter = FileSetExporter(context.storage, options, deidentifier=deidentifier, signer=signer)
            exports = _exports_dir(context)
            await asyncio.to_thread(_sweep, exports, media.export_retention_seconds)
            job = await JobRepository(context.pool).start(
                JobKind.EXPORT,
                {
                    "study_uids": body.study_uids,
                    "deidentify": body.deidentify,
                    "explicit_vr_little_endian": body.explicit_vr_little_endian,
                    "sign": body.sign,
                },
                total=len(sources),
                created_by=principal.subject,
            )
            folder = exports / str(job.id)
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            task = asyncio.create_task(
                _ExportRun(context, job.id, exporter, sources, folder).run(), name=f"export-{job.id}"
            )
            running.add(task)
            task.add_done_callback(running.discard)
            status_url = str(request.url_for("get_export", job_id=job.id))
            response.headers["Location"] = status_url
            return ExportAccepted(
                job=job,
                status_url=status_url,
                download_url=str(request.url_for("download_export", job_id=job.id)),
            )

    async def _export_job(context: ApiContext, job_id: int) -> Job:
        job = await JobRepository(context.pool).get(job_id)
        if job is None or job.kind != JobKind.EXPORT:
            raise HTTPException(status_code=404, detail=f"no export {job_id}")
        return job

    @router.get("/exports/{job_id}", response_model=ExportStatus, summary="An export: its job and outcome")
    async def get_export(request: Request, context: Context, _: Exporter, job_id: JobId) -> ExportStatus:
        job = await _export_job(context, job_id)
        status = ExportStatus(job=job)
        if job.state == JobState.DONE:
            result = await asyncio.to_thread(_read_result, _exports_dir(context) / str(job_id))
            if result is not None:
                status.instances_written = int(result["instances_written"])
                status.failures = list(result["failures"])
                status.download_url = str(request.url_for("download_export", job_id=job_id))
        return status

    @router.get(
        "/exports/{job_id}/download",
        summary="The exported File-set as a zip (streamed)",
        response_class=StreamingResponse,
        responses={
            200: {"content": {ZIP: {}}},
            404: {"description": "no such export"},
            409: {"description": "the export is not done"},
            410: {"description": "the export was removed (retention time)"},
        },
    )
    async def download_export(
        request: Request, context: Context, _: Exporter, job_id: JobId
    ) -> StreamingResponse:
        async with audited(
            request,
            AuditEventId.EXPORT,
            AuditAction.READ,
            details={"operation": "media-download", "job": job_id},
        ) as scope:
            job = await _export_job(context, job_id)
            for uid in job.params.get("study_uids", []):
                scope.add("study", str(uid))
            if job.state != JobState.DONE:
                raise HTTPException(status_code=409, detail=f"export {job_id} is {job.state}, not done")
            file_set = _exports_dir(context) / str(job_id) / _FILE_SET
            if not await asyncio.to_thread((file_set / "DICOMDIR").is_file):
                raise HTTPException(status_code=410, detail=f"export {job_id} is no longer kept")
            return StreamingResponse(
                iter_zip(file_set),
                media_type=ZIP,
                headers={"Content-Disposition": f'attachment; filename="export-{job_id}.zip"'},
            )

    @router.post(
        "/imports",
        response_model=ImportReport,
        summary="Import a zip of DICOM files or of a File-set through the ingest path",
        responses={413: {"description": "too large"}, 415: {"description": "not application/zip"}},
    )
    async def import_zip(request: Request, context: Context, _: Storer) -> ImportReport:
        async with audited(
            request, AuditEventId.IMPORT, AuditAction.CREATE, details={"operation": "media-import"}
        ) as scope:
            content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
            if content_type != ZIP:
                raise HTTPException(status_code=415, detail=f"expected {ZIP}, got {content_type or 'none'}")
            spool = context.settings.spool_dir / "imports"
            await asyncio.to_thread(spool.mkdir, parents=True, exist_ok=True)
            upload = spool / f"upload-{time.time_ns()}.zip"
            try:
                await _spool_body(request, upload, media.max_import_bytes)
                if not await asyncio.to_thread(zipfile.is_zipfile, upload):
                    raise HTTPException(status_code=400, detail="the body is not a zip archive")
                client = request.client
                importer = MediaImporter(
                    context.receiver,
                    IngestSource(protocol="import", peer=f"{client.host}:{client.port}" if client else None),
                    spool_dir=spool,
                    max_zip_bytes=media.max_import_uncompressed_bytes,
                    trust_anchors=await asyncio.to_thread(SignatureSettings().anchors),
                )
                report = ImportReport()
                await asyncio.to_thread(importer.import_path, upload, report, label="upload.zip")
            finally:
                await asyncio.to_thread(upload.unlink, True)
            for item in report.files:
                if item.study_instance_uid and item.status == "stored":
                    scope.add("study", item.study_instance_uid)
            scope.details.update(report.summary())
            if report.failed:
                scope.outcome = AuditOutcome.MINOR_FAILURE if report.stored else AuditOutcome.SERIOUS_FAILURE
            return report

    return router
