"""Media types for the pixel and bulk data resources: ``Accept`` parsing,
``multipart/related`` bodies, ETags.

DICOMweb clients send ``Accept`` values such as
``multipart/related; type="application/octet-stream"; transfer-syntax=*``
(cornerstone / OHIF): a media range with parameters, several of them
comma-separated with ``q`` weights.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from fastapi import Response

__all__ = [
    "MediaRange",
    "Part",
    "close_delimiter",
    "conditional_headers",
    "encode_part",
    "etag_for",
    "if_none_match_hits",
    "multipart_body",
    "new_boundary",
    "not_modified",
    "parse_accept",
]

_CRLF: Final = b"\r\n"


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One entry of an ``Accept`` header: ``type/subtype`` (lower case) and parameters."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range accepts ``media_type`` (``*/*`` and ``image/*`` included)."""
        wanted_main, _, wanted_sub = self.media_type.partition("/")
        main, _, sub = media_type.lower().partition("/")
        return wanted_main in ("*", main) and wanted_sub in ("*", sub)


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an ``Accept`` header, most preferred first (stable
    for equal weights); ``*/*`` when there is no header."""
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for entry in _split_outside_quotes(header, ","):
        pieces = _split_outside_quotes(entry, ";")
        media_type = pieces[0].strip().lower()
        if not media_type:
            continue
        if "/" not in media_type:
            media_type = "*/*" if media_type == "*" else f"{media_type}/*"
        params: dict[str, str] = {}
        q = 1.0
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            name = name.strip().lower()
            value = value.strip().strip('"').strip()
            if not name:
                continue
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            else:
                params[name] = value
        if q > 0:
            ranges.append(MediaRange(media_type, params, q))
    return sorted(ranges, key=lambda r: -r.q)


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a multipart body."""

    content_type: str
    data: bytes
    headers: tuple[tuple[str, str], ...] = ()


def new_boundary() -> str:
    return uuid.uuid4().hex


def encode_part(boundary: str, part: Part) -> bytes:
    """One part of a ``multipart/related`` body: delimiter, headers, content."""
    head = [f"--{boundary}", f"Content-Type: {part.content_type}"]
    head += [f"{name}: {value}" for name, value in part.headers]
    head.append(f"Content-Length: {len(part.data)}")
    return "\r\n".join(head).encode("ascii") + _CRLF + _CRLF + part.data + _CRLF


def close_delimiter(boundary: str) -> bytes:
    return f"--{boundary}--".encode("ascii") + _CRLF


def multipart_body(parts: Sequence[Part]) -> tuple[bytes, str]:
    """A ``multipart/related`` body (RFC 2387) and its boundary."""
    boundary = new_boundary()
    return b"".join([*(encode_part(boundary, part) for part in parts), close_delimiter(boundary)]), boundary


def etag_for(content_sha256: str, *aspects: object) -> str:
    """A strong ETag for one representation of an instance's content: the
    stored object's digest plus whatever shapes the response (frames,
    media type, window...)."""
    digest = hashlib.sha256(content_sha256.encode("ascii"))
    for aspect in aspects:
        digest.update(b"\x00" + repr(aspect).encode("utf-8"))
    return f'"{digest.hexdigest()[:40]}"'


def if_none_match_hits(header: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if header is None:
        return False
    tags: Iterable[str] = (t.strip() for t in header.split(","))
    for tag in tags:
        if tag == "*":
            return True
        if tag.removeprefix("W/") == etag.removeprefix("W/"):
            return True
    return False


def conditional_headers(etag: str) -> dict[str, str]:
    """Headers of every pixel / bulk data response: its ETag, and the
    cross-origin policy that lets a viewer on another origin (OHIF) use it."""
    return {
        "ETag": etag,
        "Cross-Origin-Resource-Policy": "cross-origin",
        "Vary": "Accept",
        "Cache-Control": "private, no-cache",
    }


def not_modified(etag: str) -> Response:
    return Response(status_code=304, headers=conditional_headers(etag))
