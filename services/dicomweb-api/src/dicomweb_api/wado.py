"""WADO-RS (PS3.18 10.4): instances and metadata of a study, series or instance.

* ``GET /studies/{study}[/series/{series}[/instances/{instance}]]``:
  ``multipart/related; type="application/dicom"``, one part per instance,
  streamed from object storage (wherever the index says each object is).
  The ``transfer-syntax`` parameter of the Accept header decides the
  encoding (see :mod:`dicomweb_api.accept`): as stored when it is ``*`` or
  the stored syntax, else transcoded in a thread, one instance at a time,
  through a spool directory; 406 when an instance cannot be produced in
  any accepted syntax.
* ``.../metadata``: ``application/dicom+json``, the stored DICOM JSON of
  each instance with its BulkDataURI values made absolute:
  ``{base}/dicom-web/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path}``.

Both carry an ETag made from the content hashes of the instances (and the
negotiated syntaxes, or the base URL for metadata); ``If-None-Match`` with it
answers 304.  404 when nothing matches.

Archives: before a multipart body starts (it cannot be taken back), an
instance the index lists NEARLINE / OFFLINE, or whose object on an
archive-capable tier (S3 GLACIER / DEEP_ARCHIVE, Azure Archive) turns out
archived when probed, makes the answer ``503`` with ``Retry-After`` after
its restore was requested (see :mod:`dicomweb_api.stored`).  What is served
is recorded as accessed (last access, written in the background).  The capabilities description is
served here too (:mod:`dicomweb_api.capabilities`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Final

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from dicomweb_api import capabilities
from dicomweb_api.accept import (
    DICOM,
    DICOM_JSON,
    NotAcceptableError,
    accepts,
    instance_transfer_syntaxes,
    syntax_for_instance,
)
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.media import etag, if_none_match_hits, not_modified
from dicomweb_api.multipart import MultipartWriter
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import audited, study_objects
from dicomweb_api.stored import check_online, restoring
from dicomweb_api.urls import CORP_HEADERS, dicomweb_base, instance_url
from pacs_common.archive.tiers import may_hold_archived
from pacs_common.audit import AuditAction, AuditEventId
from pacs_common.dicom.transcode import transcode_file
from pacs_common.query import (
    InvalidQueryError,
    QueryLevel,
    QueryUnavailableError,
    RetrievableInstance,
    RetrieveRequest,
)
from pacs_common.storage import ObjectArchivedError, ObjectNotFoundError, ObjectStorage, StorageError

__all__ = ["create_router"]

logger = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1024 * 1024
# Objects on archive-capable tiers probed at once before a response starts.
_PROBE_CONCURRENCY: Final = 8
_STORAGE_RETRY_AFTER_SECONDS: Final = 5
BULK_DATA_URI: Final = "BulkDataURI"

_METADATA_SQL: Final = """
SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.content_sha256, m.metadata
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
JOIN instance_metadata m ON m.instance_fk = i.pk
WHERE st.study_instance_uid = $1
  AND ($2::text IS NULL OR se.series_instance_uid = $2)
  AND ($3::text IS NULL OR i.sop_instance_uid = $3)
ORDER BY se.series_number, se.pk, i.instance_number, i.pk
"""
_METADATA_VERSION_SQL: Final = """
SELECT i.sop_instance_uid, i.content_sha256
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
JOIN instance_metadata m ON m.instance_fk = i.pk
WHERE st.study_instance_uid = $1
  AND ($2::text IS NULL OR se.series_instance_uid = $2)
  AND ($3::text IS NULL OR i.sop_instance_uid = $3)
ORDER BY i.sop_instance_uid
"""


def _identifier(study: str, series: str | None, instance: str | None) -> tuple[QueryLevel, dict[str, Any]]:
    identifier: dict[str, Any] = {"0020000D": {"vr": "UI", "Value": [study]}}
    level = QueryLevel.STUDY
    if series is not None:
        identifier["0020000E"] = {"vr": "UI", "Value": [series]}
        level = QueryLevel.SERIES
    if instance is not None:
        identifier["00080018"] = {"vr": "UI", "Value": [instance]}
        level = QueryLevel.IMAGE
    return level, identifier


async def _retrievable(
    context: ApiContext, study: str, series: str | None, instance: str | None
) -> list[RetrievableInstance]:
    level, identifier = _identifier(study, series, instance)
    try:
        found = await context.query.retrieve(RetrieveRequest(level=level, identifier=identifier))
    except InvalidQueryError as exc:
        raise HTTPException(status_code=400, detail=exc.reason) from exc
    except QueryUnavailableError as exc:
        raise HTTPException(status_code=503, detail=f"query-service unavailable: {exc.reason}") from exc
    if not found:
        raise HTTPException(status_code=404, detail=f"no {level.lower()} matches")
    return found


def _storages(context: ApiContext, instances: list[RetrievableInstance]) -> dict[str, ObjectStorage]:
    """The storage of each instance's tier; 503 when one is not configured here."""
    storages: dict[str, ObjectStorage] = {}
    for instance in instances:
        tier = instance.location.tier
        if tier not in storages:
            try:
                storages[tier] = context.storage.get(tier)
            except KeyError as exc:
                raise HTTPException(status_code=503, detail=str(exc.args[0])) from exc
    return storages


def _probe(storage: ObjectStorage, instance: RetrievableInstance) -> bool:
    """Read one byte of the object: True when it is archived; an object store
    that is down (or whose circuit is open) is 503, a missing object 500."""
    location = instance.location
    try:
        storage.read_range(location.key, 0, 1)
    except ObjectArchivedError:
        return True
    except ObjectNotFoundError as exc:
        logger.error("indexed object missing", extra={"key": location.key, "tier": location.tier})
        raise HTTPException(
            status_code=500, detail=f"stored object of {instance.sop_instance_uid} is missing"
        ) from exc
    except StorageError as exc:
        raise HTTPException(
            status_code=503,
            detail=f"storage tier {location.tier} unavailable: {exc}",
            headers={"Retry-After": str(_STORAGE_RETRY_AFTER_SECONDS)},
        ) from exc
    return False


async def _check_readable(
    context: ApiContext, instances: list[RetrievableInstance], storages: dict[str, ObjectStorage]
) -> None:
    """Before a multipart body starts (it cannot be taken back): instances
    the index lists as not ONLINE, and objects on archive-capable tiers that
    turn out archived, answer 503 after their restores were requested.  The
    first object is read whatever its tier, so an object store that is down
    answers 503 rather than a body broken off after its headers (an outage
    that starts mid-body can still only break the body off)."""
    await check_online(context, ((i.sop_instance_uid, i.availability) for i in instances))
    probed = [
        instance
        for number, instance in enumerate(instances)
        if number == 0 or may_hold_archived(storages[instance.location.tier])
    ]
    limit = asyncio.Semaphore(_PROBE_CONCURRENCY)

    async def archived(instance: RetrievableInstance) -> bool:
        async with limit:
            return await asyncio.to_thread(_probe, storages[instance.location.tier], instance)

    flags = await asyncio.gather(*(archived(i) for i in probed))
    if found := [i.sop_instance_uid for i, flag in zip(probed, flags, strict=True) if flag]:
        raise await restoring(context, found)


def _read_chunk(stream: BinaryIO) -> bytes:
    return stream.read(CHUNK_SIZE)


async def _part(
    writer: MultipartWriter, part_type: str, size: int, stream: BinaryIO
) -> AsyncGenerator[bytes, None]:
    """One part: its header, then the content of ``stream`` (closed at the end)."""
    try:
        yield writer.part_header(part_type, {"Content-Length": str(size)})
        while chunk := await asyncio.to_thread(_read_chunk, stream):
            yield chunk
        yield writer.part_end()
    finally:
        await asyncio.to_thread(stream.close)


def _transcode(storage: ObjectStorage, key: str, syntax: str, spool_dir: Path) -> tuple[Path, int, Path]:
    """The object converted to ``syntax`` in a spool file: (file, its size, its directory)."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="wado-", dir=spool_dir))
    try:
        source, target = directory / "stored.dcm", directory / "sent.dcm"
        with storage.open(key) as stream, source.open("wb") as out:
            shutil.copyfileobj(stream, out, CHUNK_SIZE)
        transcode_file(source, target, syntax)
        source.unlink()
        size = target.stat().st_size
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return target, size, directory


async def _instance_parts(
    context: ApiContext, writer: MultipartWriter, plan: list[tuple[RetrievableInstance, str]]
) -> AsyncIterator[bytes]:
    """The multipart body: one part per instance, read (and converted) one at a time."""
    for instance, syntax in plan:
        location = instance.location
        part_type = f"{DICOM}; transfer-syntax={syntax}"
        try:
            storage = context.storage.get(location.tier)
            if syntax == instance.transfer_syntax_uid:
                stream = await asyncio.to_thread(storage.open, location.key)
                async with contextlib.aclosing(_part(writer, part_type, location.size, stream)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            else:
                path, size, directory = await asyncio.to_thread(
                    _transcode, storage, location.key, syntax, context.settings.spool_dir
                )
                try:
                    converted = await asyncio.to_thread(path.open, "rb")
                    async with contextlib.aclosing(_part(writer, part_type, size, converted)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                finally:
                    await asyncio.to_thread(shutil.rmtree, directory, True)
        except Exception as exc:
            if isinstance(exc, ObjectArchivedError):
                # Archived since the check: too late for a 503, but restore it.
                with contextlib.suppress(Exception):
                    await context.restore_requester.request([instance.sop_instance_uid])
            # Headers are gone: all that is left is to break the body off.
            logger.exception(
                "WADO-RS retrieval failed mid-stream",
                extra={"sop_instance_uid": instance.sop_instance_uid, "key": location.key},
            )
            raise
    yield writer.close()


def _audit_details(series: str | None, instance: str | None) -> dict[str, Any]:
    return {"series": series, "instance": instance}


async def _retrieve(
    request: Request, context: ApiContext, study: str, series: str | None, instance: str | None
) -> Response:
    details = _audit_details(series, instance)
    async with audited(
        request,
        AuditEventId.INSTANCES_ACCESSED,
        AuditAction.READ,
        objects=study_objects(study),
        details=details,
    ):
        return await _retrieve_instances(request, context, study, series, instance)


async def _retrieve_instances(
    request: Request, context: ApiContext, study: str, series: str | None, instance: str | None
) -> Response:
    try:
        accepted = instance_transfer_syntaxes(request.headers.get("accept"))
    except NotAcceptableError as exc:
        raise HTTPException(status_code=406, detail=str(exc)) from exc
    instances = await _retrievable(context, study, series, instance)
    plan: list[tuple[RetrievableInstance, str]] = []
    for found in instances:
        syntax = syntax_for_instance(found.transfer_syntax_uid, accepted)
        if syntax is None:
            raise HTTPException(
                status_code=406,
                detail=(
                    f"instance {found.sop_instance_uid} is stored in {found.transfer_syntax_uid} "
                    f"and cannot be converted to {', '.join(accepted)}"
                ),
            )
        plan.append((found, syntax))
    tag = etag(f"{i.sop_instance_uid}:{i.location.sha256}:{syntax}" for i, syntax in plan)
    if if_none_match_hits(request.headers.get("if-none-match"), tag):
        return not_modified(tag)
    storages = _storages(context, instances)
    await _check_readable(context, instances, storages)
    context.record_access(study, [i.sop_instance_uid for i in instances])
    writer = MultipartWriter(DICOM)
    headers = {"ETag": tag, "Vary": "Accept", **CORP_HEADERS}
    return StreamingResponse(
        _instance_parts(context, writer, plan), media_type=writer.content_type, headers=headers
    )


def _absolute_bulk_data(dataset: dict[str, Any], url: str) -> None:
    """Rewrite relative BulkDataURI values (``bulkdata/...``) under ``url``, in place."""
    for element in dataset.values():
        if not isinstance(element, dict):
            continue
        uri = element.get(BULK_DATA_URI)
        if isinstance(uri, str) and "://" not in uri:
            element[BULK_DATA_URI] = f"{url}/{uri.lstrip('/')}"
        if element.get("vr") == "SQ":
            for item in element.get("Value") or []:
                if isinstance(item, dict):
                    _absolute_bulk_data(item, url)


def _render_metadata(rows: list[Any], base: str) -> bytes:
    body = []
    for row in rows:
        metadata = row["metadata"]
        url = instance_url(
            base, row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"]
        )
        _absolute_bulk_data(metadata, url)
        body.append(metadata)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def _metadata(
    request: Request, context: ApiContext, study: str, series: str | None, instance: str | None
) -> Response:
    details = _audit_details(series, instance)
    async with audited(
        request,
        AuditEventId.INSTANCES_ACCESSED,
        AuditAction.READ,
        objects=study_objects(study),
        details=details,
    ):
        return await _instance_metadata(request, context, study, series, instance)


async def _instance_metadata(
    request: Request, context: ApiContext, study: str, series: str | None, instance: str | None
) -> Response:
    if not accepts(request.headers.get("accept"), (DICOM_JSON, "application/json")):
        raise HTTPException(status_code=406, detail="metadata is sent as application/dicom+json only")
    base = dicomweb_base(request, context.settings)
    async with context.pool.acquire() as connection:
        versions = await connection.fetch(_METADATA_VERSION_SQL, study, series, instance)
        if not versions:
            raise HTTPException(status_code=404, detail="no instance matches")
        tag = etag([base, *(f"{r['sop_instance_uid']}:{r['content_sha256']}" for r in versions)])
        if if_none_match_hits(request.headers.get("if-none-match"), tag):
            return not_modified(tag)
        rows = await connection.fetch(_METADATA_SQL, study, series, instance)
    body = await asyncio.to_thread(_render_metadata, list(rows), base)
    return Response(body, media_type=DICOM_JSON, headers={"ETag": tag, **CORP_HEADERS})


ReadPrincipal = Annotated[Principal, Depends(require(Permission.READ))]
Context = Annotated[ApiContext, Depends(get_context)]

_RETRIEVE_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": 'The instances, as multipart/related; type="application/dicom"',
        "content": {"multipart/related": {}},
    },
    304: {"description": "Not modified (If-None-Match)"},
    404: {"description": "Nothing matches"},
    406: {"description": "No accepted media type or transfer syntax can be produced"},
    503: {
        "description": (
            "The query-service is unavailable, or instances are archived (NEARLINE): their restores "
            "were requested, the body names them and Retry-After says when to ask again"
        )
    },
}
_METADATA_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"description": "DICOM JSON of each instance", "content": {DICOM_JSON: {}}},
    304: {"description": "Not modified (If-None-Match)"},
    404: {"description": "Nothing matches"},
    406: {"description": "The Accept header excludes application/dicom+json"},
}


def create_router() -> APIRouter:
    router = APIRouter(tags=["WADO-RS"])

    @router.get("/studies/{study}", response_class=Response, responses=_RETRIEVE_RESPONSES)
    async def retrieve_study(
        study: str, request: Request, context: Context, principal: ReadPrincipal
    ) -> Response:
        """Every instance of a study."""
        return await _retrieve(request, context, study, None, None)

    @router.get("/studies/{study}/series/{series}", response_class=Response, responses=_RETRIEVE_RESPONSES)
    async def retrieve_series(
        study: str, series: str, request: Request, context: Context, principal: ReadPrincipal
    ) -> Response:
        """Every instance of a series."""
        return await _retrieve(request, context, study, series, None)

    @router.get(
        "/studies/{study}/series/{series}/instances/{instance}",
        response_class=Response,
        responses=_RETRIEVE_RESPONSES,
    )
    async def retrieve_instance(
        *,
        study: str,
        series: str,
        instance: str,
        request: Request,
        context: Context,
        principal: ReadPrincipal,
    ) -> Response:
        """One instance (a multipart body with one part)."""
        return await _retrieve(request, context, study, series, instance)

    @router.get("/studies/{study}/metadata", response_class=Response, responses=_METADATA_RESPONSES)
    async def study_metadata(
        study: str, request: Request, context: Context, principal: ReadPrincipal
    ) -> Response:
        """The metadata of every instance of a study."""
        return await _metadata(request, context, study, None, None)

    @router.get(
        "/studies/{study}/series/{series}/metadata", response_class=Response, responses=_METADATA_RESPONSES
    )
    async def series_metadata(
        study: str, series: str, request: Request, context: Context, principal: ReadPrincipal
    ) -> Response:
        """The metadata of every instance of a series."""
        return await _metadata(request, context, study, series, None)

    @router.get(
        "/studies/{study}/series/{series}/instances/{instance}/metadata",
        response_class=Response,
        responses=_METADATA_RESPONSES,
    )
    async def instance_metadata(
        *,
        study: str,
        series: str,
        instance: str,
        request: Request,
        context: Context,
        principal: ReadPrincipal,
    ) -> Response:
        """The metadata of one instance (an array of one)."""
        return await _metadata(request, context, study, series, instance)

    capabilities.add_routes(router)
    return router
