"""WADO-RS frames and bulk data (PS3.18 10.4):
``.../instances/{instance}/frames/{frame_list}`` and ``.../bulkdata/{path}``.

Frames are served from the stored object with ranged reads: native pixels
as stored (in little endian), compressed frames as stored when the client
accepts that syntax (``transfer-syntax=*``, as cornerstone / OHIF ask), or
decompressed when it asks for uncompressed pixels.  Bulk values honour HTTP
``Range``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from dicomweb_api.accept import MediaRange, parse_accept
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.media import conditional_headers, etag_for, if_none_match_hits, not_modified
from dicomweb_api.multipart import Part, close_delimiter, encode_part, multipart_body, new_boundary
from dicomweb_api.pixels import (
    PIXEL_DATA_TAGS,
    PIXEL_ELEMENTS,
    FrameNotFoundError,
    NotAnImageError,
    PixelInfo,
    StoredValue,
    UnsupportedPixelDataError,
    decode_frame,
    decoded_bytes,
    media_type_of_syntax,
    native_little_endian,
    read_frames,
    read_value,
)
from dicomweb_api.ranges import ByteRange, RangeNotSatisfiableError, parse_range
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import InstancesAccessed
from dicomweb_api.stored import check_online, find_instance, restoring, run_blocking, storage_of
from pacs_common.dicom.transcode import can_decode
from pacs_common.storage import ObjectStorage

__all__ = ["INSTANCE_PATH", "FramesChoice", "choose_frames_form", "create_router", "parse_frame_list"]

INSTANCE_PATH: Final = "/studies/{study}/series/{series}/instances/{instance}"
OCTET_STREAM: Final = "application/octet-stream"
MULTIPART: Final = "multipart/related"
_MAX_FRAMES_PER_REQUEST: Final = 10_000
# Frames read (and held in memory) at a time when many are asked for.
_FRAMES_PER_READ: Final = 32
_BULK_PATH: Final = re.compile(r"^[0-9A-Fa-f]{8}(/\d+/[0-9A-Fa-f]{8})*$")
_UNCOMPRESSED_ALIASES: Final = frozenset({str(ExplicitVRLittleEndian)})


def parse_frame_list(frame_list: str) -> list[int]:
    """``"1,3,5"`` → [1, 3, 5]; 400 for anything else."""
    try:
        numbers = [int(part) for part in frame_list.split(",")]
    except ValueError:
        raise HTTPException(status_code=400, detail=f"invalid frame list {frame_list!r}") from None
    if not numbers or len(numbers) > _MAX_FRAMES_PER_REQUEST:
        raise HTTPException(status_code=400, detail="between 1 and 10000 frame numbers may be asked for")
    return numbers


@dataclass(frozen=True, slots=True)
class FramesChoice:
    """How frames go out: media type of each part, the transfer syntax of
    the bytes, whether they are decompressed, multipart or single part."""

    media_type: str
    transfer_syntax: str
    decompress: bool
    multipart: bool

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def _form_for(media: MediaRange, info: PixelInfo) -> FramesChoice | None:
    multipart = media.media_type in (MULTIPART, "*/*")
    wanted = (
        media.params.get("type", OCTET_STREAM).lower() if media.media_type == MULTIPART else media.media_type
    )
    syntax = media.params.get("transfer-syntax")
    stored = info.transfer_syntax
    stored_type = media_type_of_syntax(stored)
    if not info.encapsulated:
        # Native pixels always go out as Explicit VR Little Endian octets.
        if wanted in (OCTET_STREAM, "application/*", "*/*") and syntax in (None, "*", *_UNCOMPRESSED_ALIASES):
            return FramesChoice(
                OCTET_STREAM, str(ExplicitVRLittleEndian), decompress=False, multipart=multipart
            )
        return None
    if wanted in (OCTET_STREAM, "application/*", "*/*"):
        if syntax in {"*", stored}:
            media_type = stored_type if wanted == "*/*" and stored_type else OCTET_STREAM
            return FramesChoice(media_type, stored, decompress=False, multipart=multipart)
        if (syntax is None or syntax in _UNCOMPRESSED_ALIASES) and can_decode(stored):
            return FramesChoice(
                OCTET_STREAM, str(ExplicitVRLittleEndian), decompress=True, multipart=multipart
            )
        if syntax is None and wanted == "*/*" and stored_type:
            return FramesChoice(stored_type, stored, decompress=False, multipart=multipart)
        return None
    if stored_type and wanted in {stored_type, "image/*"} and syntax in (None, "*", stored):
        return FramesChoice(stored_type, stored, decompress=False, multipart=multipart)
    return None


def choose_frames_form(accept: Sequence[MediaRange], info: PixelInfo) -> FramesChoice:
    """The first acceptable form, in the client's order of preference; 406 when none is."""
    for media in accept:
        choice = _form_for(media, info)
        if choice is not None:
            return choice
    stored_type = media_type_of_syntax(info.transfer_syntax) or OCTET_STREAM
    raise HTTPException(
        status_code=406,
        detail=(
            f"the frames are stored in transfer syntax {info.transfer_syntax} ({UID(info.transfer_syntax).name}) "
            f'and can be sent as {MULTIPART}; type="{stored_type}"; transfer-syntax={info.transfer_syntax}'
            + (" or uncompressed" if not info.encapsulated or can_decode(info.transfer_syntax) else "")
        ),
    )


def _frame_payloads(
    storage: ObjectStorage, key: str, info: PixelInfo, numbers: Sequence[int], choice: FramesChoice
) -> list[bytes]:
    frames = read_frames(storage, key, info, numbers)
    if choice.decompress:
        return [decoded_bytes(decode_frame(info, frame)) for frame in frames]
    if not info.encapsulated:
        return [native_little_endian(info, frame) for frame in frames]
    return frames


def _bulk_payload(
    storage: ObjectStorage,
    *,
    key: str,
    path: str,
    value: StoredValue,
    transfer_syntax: str,
    range_header: str | None,
) -> tuple[bytes, ByteRange | None]:
    """The value (or the part ``Range`` asks for); contiguous little endian
    values are read for just that range."""
    swapped = transfer_syntax == ExplicitVRBigEndian and value.vr in ("OW", "OF", "OL", "OD", "OV")
    if value.offset is not None and value.length is not None and not swapped:
        wanted = parse_range(range_header, value.length)
        if wanted is None:
            return storage.read_range(key, value.offset, value.length), None
        return storage.read_range(key, value.offset + wanted.start, wanted.length), wanted
    data = read_value(storage, key, path, value, transfer_syntax)
    wanted = parse_range(range_header, len(data))
    if wanted is None:
        return data, None
    return data[wanted.start : wanted.start + wanted.length], wanted


def create_router() -> APIRouter:
    router = APIRouter(tags=["WADO-RS"])

    @router.get(
        INSTANCE_PATH + "/frames/{frame_list}",
        summary="Retrieve frames (pixel data of the listed 1-based frames)",
        response_class=Response,
    )
    async def retrieve_frames(
        *,
        study: str,
        series: str,
        instance: str,
        frame_list: str,
        request: Request,
        context: Annotated[ApiContext, Depends(get_context)],
        principal: Annotated[Principal, Depends(require(Permission.READ))],
        audit: InstancesAccessed,
    ) -> Response:
        numbers = parse_frame_list(frame_list)
        stored = await find_instance(
            context.pool, study, series, instance, elements=PIXEL_ELEMENTS, bulk_paths=PIXEL_DATA_TAGS
        )
        try:
            info = PixelInfo.from_index(stored.transfer_syntax_uid, stored.metadata, stored.bulk_data)
            info.check_frames(numbers)
        except (NotAnImageError, FrameNotFoundError) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        choice = choose_frames_form(parse_accept(request.headers.get("accept")), info)
        if not choice.multipart and len(numbers) > 1:
            choice = FramesChoice(
                choice.media_type, choice.transfer_syntax, choice.decompress, multipart=True
            )
        etag = etag_for(stored.content_sha256, "frames", numbers, choice)
        if if_none_match_hits(request.headers.get("if-none-match"), etag):
            return not_modified(etag)
        await check_online(context, [(stored.sop_instance_uid, stored.availability)])
        storage = storage_of(context.storage, stored)
        batches = [numbers[i : i + _FRAMES_PER_READ] for i in range(0, len(numbers), _FRAMES_PER_READ)]
        try:
            first = await run_blocking(
                partial(_frame_payloads, storage, stored.key, info, batches[0], choice),
                archived=lambda: restoring(context, [stored.sop_instance_uid]),
            )
        except UnsupportedPixelDataError as exc:
            raise HTTPException(status_code=406, detail=str(exc)) from exc
        context.record_access(stored.study_instance_uid, [stored.sop_instance_uid])
        headers = conditional_headers(etag)
        if not choice.multipart:
            return Response(first[0], media_type=choice.content_type, headers=headers)
        boundary = new_boundary()
        media_type = f'{MULTIPART}; type="{choice.media_type}"; transfer-syntax={choice.transfer_syntax}; boundary={boundary}'
        base = request.url.path.rsplit("/", 1)[0]

        def encoded(batch: Sequence[int], payloads: Sequence[bytes]) -> bytes:
            return b"".join(
                encode_part(
                    boundary, Part(choice.content_type, data, (("Content-Location", f"{base}/{number}"),))
                )
                for number, data in zip(batch, payloads, strict=True)
            )

        if len(batches) == 1:
            body = encoded(batches[0], first) + close_delimiter(boundary)
            return Response(body, media_type=media_type, headers=headers)

        async def stream() -> AsyncIterator[bytes]:
            # Many frames: a batch at a time, never all of them in memory.  A
            # failure after the first batch can only cut the body short.
            yield encoded(batches[0], first)
            for batch in batches[1:]:
                payloads = await asyncio.to_thread(_frame_payloads, storage, stored.key, info, batch, choice)
                yield encoded(batch, payloads)
            yield close_delimiter(boundary)

        return StreamingResponse(stream(), media_type=media_type, headers=headers)

    @router.get(
        INSTANCE_PATH + "/bulkdata/{path:path}",
        summary="Retrieve a bulk data value (a BulkDataURI of the metadata), with HTTP Range",
        response_class=Response,
    )
    async def retrieve_bulk_data(
        *,
        study: str,
        series: str,
        instance: str,
        path: str,
        request: Request,
        context: Annotated[ApiContext, Depends(get_context)],
        principal: Annotated[Principal, Depends(require(Permission.READ))],
        audit: InstancesAccessed,
    ) -> Response:
        if not _BULK_PATH.match(path):
            raise HTTPException(status_code=404, detail=f"no bulk data at {path!r}")
        path = path.upper()
        stored = await find_instance(context.pool, study, series, instance, elements=(), bulk_paths=(path,))
        if path not in stored.bulk_data:
            raise HTTPException(status_code=404, detail=f"the instance has no bulk data at {path}")
        value = StoredValue.model_validate(stored.bulk_data[path])
        encapsulated = value.length is None and UID(stored.transfer_syntax_uid).is_encapsulated
        syntax = stored.transfer_syntax_uid if encapsulated else str(ExplicitVRLittleEndian)
        multipart = _bulk_form(parse_accept(request.headers.get("accept")), syntax, encapsulated)
        content_type = f"{OCTET_STREAM}; transfer-syntax={syntax}" if encapsulated else OCTET_STREAM
        etag = etag_for(stored.content_sha256, "bulkdata", path, multipart)
        if if_none_match_hits(request.headers.get("if-none-match"), etag):
            return not_modified(etag)
        await check_online(context, [(stored.sop_instance_uid, stored.availability)])
        storage = storage_of(context.storage, stored)
        range_header = request.headers.get("range")

        def payload() -> tuple[bytes, ByteRange | None]:
            return _bulk_payload(
                storage,
                key=stored.key,
                path=path,
                value=value,
                transfer_syntax=stored.transfer_syntax_uid,
                range_header=range_header,
            )

        try:
            data, wanted = await run_blocking(
                payload, archived=lambda: restoring(context, [stored.sop_instance_uid])
            )
        except RangeNotSatisfiableError as exc:
            total = value.length if value.length is not None else "*"
            raise HTTPException(
                status_code=416,
                detail=f"range not satisfiable: {exc}",
                headers={"Content-Range": f"bytes */{total}"},
            ) from exc
        context.record_access(stored.study_instance_uid, [stored.sop_instance_uid])
        headers = conditional_headers(etag) | {"Accept-Ranges": "bytes"}
        status = 200
        part_headers: tuple[tuple[str, str], ...] = ()
        if wanted is not None:
            status = 206
            headers["Content-Range"] = wanted.content_range
            part_headers = (("Content-Range", wanted.content_range),)
        if not multipart:
            return Response(data, status_code=status, media_type=content_type, headers=headers)
        body, boundary = multipart_body([Part(content_type, data, part_headers)])
        media_type = f'{MULTIPART}; type="{OCTET_STREAM}"; boundary={boundary}'
        return Response(body, status_code=status, media_type=media_type, headers=headers)

    return router


def _bulk_form(accept: Sequence[MediaRange], syntax: str, encapsulated: bool) -> bool:
    """Whether the value goes out as multipart (the PS3.18 default) or single
    part; 406 when neither is accepted."""
    for media in accept:
        wanted_syntax = media.params.get("transfer-syntax")
        if wanted_syntax not in (None, "*", syntax) and not (
            not encapsulated and wanted_syntax in _UNCOMPRESSED_ALIASES
        ):
            continue
        if media.media_type == MULTIPART and media.params.get("type", OCTET_STREAM).lower() in (
            OCTET_STREAM,
            "*/*",
        ):
            return True
        if media.media_type == "*/*":
            return True
        if media.matches(OCTET_STREAM):
            return False
    raise HTTPException(
        status_code=406,
        detail=f'bulk data is sent as {MULTIPART}; type="{OCTET_STREAM}" or {OCTET_STREAM} (transfer syntax {syntax})',
    )
