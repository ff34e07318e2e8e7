"""Reading a ``multipart/related`` request body as it streams (STOW-RS).

The body is fed chunk by chunk to python-multipart's streaming
:class:`~python_multipart.multipart.MultipartParser`; each part's bytes go
straight to a file of its own in a spool directory, so neither the body nor
a part is ever held in memory.  Parsing and file writes run in a worker
thread, a batch of chunks at a time, to keep the event loop free.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

__all__ = [
    "BodyTooLargeError",
    "MalformedMultipartError",
    "SpooledPart",
    "UnsupportedMediaTypeError",
    "boundary_of",
    "spool_multipart",
]

MULTIPART_RELATED: Final = "multipart/related"
# Chunks are handed to the parsing thread in batches of about this size.
_BATCH_BYTES: Final = 1024 * 1024


class MalformedMultipartError(ValueError):
    """The body is not a well-formed multipart message (HTTP 400)."""


class UnsupportedMediaTypeError(ValueError):
    """The request's Content-Type is not one this endpoint accepts (HTTP 415)."""


class BodyTooLargeError(ValueError):
    """The body is longer than allowed (HTTP 413)."""


@dataclass(frozen=True, slots=True)
class SpooledPart:
    """One body part, on disk."""

    path: Path
    # The part's media type, lower case, without parameters; None when absent.
    content_type: str | None
    size: int


def boundary_of(content_type: str | None, accepted_types: frozenset[str]) -> bytes:
    """The boundary of a ``multipart/related`` Content-Type whose ``type``
    parameter (when given) is one of ``accepted_types``.

    Raises UnsupportedMediaTypeError for another media type or ``type``, and
    MalformedMultipartError when the boundary is missing or invalid.
    """
    media_type, params = parse_options_header(content_type)
    if media_type.decode("latin-1") != MULTIPART_RELATED:
        shown = media_type.decode("latin-1") or "none"
        raise UnsupportedMediaTypeError(f"Content-Type must be {MULTIPART_RELATED}, not {shown}")
    part_type = params.get(b"type")
    if part_type is not None and part_type.decode("latin-1").lower() not in accepted_types:
        accepted = ", ".join(sorted(accepted_types))
        raise UnsupportedMediaTypeError(
            f'multipart/related type "{part_type.decode("latin-1")}" is not supported (supported: {accepted})'
        )
    boundary = params.get(b"boundary")
    # RFC 2046 5.1.1: 1 to 70 characters.
    if not boundary or len(boundary) > 70:
        raise MalformedMultipartError("multipart/related Content-Type without a valid boundary parameter")
    return boundary


@dataclass
class _Spooler:
    """python-multipart callbacks writing each part to its own file (blocking)."""

    directory: Path
    parts: list[SpooledPart] = field(default_factory=list)
    _headers: dict[str, str] = field(default_factory=dict)
    _field: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _file: BinaryIO | None = None
    _path: Path | None = None
    _size: int = 0

    def on_part_begin(self) -> None:
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        self._path = self.directory / f"part-{len(self.parts):06d}"
        self._file = self._path.open("xb")
        self._size = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is None:  # pragma: no cover - the parser calls headers_finished first
            raise MalformedMultipartError("part data before the part's headers")
        self._file.write(data[start:end])
        self._size += end - start

    def on_part_end(self) -> None:
        if self._file is None or self._path is None:
            raise MalformedMultipartError("a body part without headers")
        self._file.close()
        self._file = None
        media_type = parse_options_header(self._headers.get("content-type"))[0].decode("latin-1")
        self.parts.append(SpooledPart(self._path, media_type or None, self._size))
        self._path = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _SpoolingParser:
    """A MultipartParser wired to a :class:`_Spooler`."""

    def __init__(self, boundary: bytes, directory: Path) -> None:
        self.spooler = _Spooler(directory)
        s = self.spooler
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": s.on_part_begin,
                "on_header_field": s.on_header_field,
                "on_header_value": s.on_header_value,
                "on_header_end": s.on_header_end,
                "on_headers_finished": s.on_headers_finished,
                "on_part_data": s.on_part_data,
                "on_part_end": s.on_part_end,
            },
        )

    def write(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise MalformedMultipartError(f"malformed multipart body: {exc}") from exc

    def finish(self) -> list[SpooledPart]:
        if self._parser.state != MultipartState.END:
            raise MalformedMultipartError("malformed multipart body: it ends before the closing boundary")
        return list(self.spooler.parts)


async def spool_multipart(
    chunks: AsyncIterator[bytes], boundary: bytes, directory: Path, max_bytes: int
) -> list[SpooledPart]:
    """Parse the body ``chunks`` stream and spool every part to a file in
    ``directory`` (which the caller owns and removes).

    Raises BodyTooLargeError as soon as more than ``max_bytes`` arrived, and
    MalformedMultipartError for a body that is not a complete multipart
    message.
    """
    parser = _SpoolingParser(boundary, directory)
    received = 0
    batch: list[bytes] = []
    batched = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise BodyTooLargeError(f"the request body is larger than {max_bytes} bytes")
            batch.append(chunk)
            batched += len(chunk)
            if batched >= _BATCH_BYTES:
                await asyncio.to_thread(parser.write, b"".join(batch))
                batch, batched = [], 0
        if batch:
            await asyncio.to_thread(parser.write, b"".join(batch))
        return parser.finish()
    finally:
        parser.spooler.close()
