"""Writing ``multipart/related`` bodies (RFC 2387): the one place that frames
parts, for every DICOMweb response that has parts.

The boundary is random (a UUID), so it cannot occur in a DICOM object by
accident with any practical probability.  Large bodies are streamed part by
part (:class:`MultipartWriter`: a part's header, its content, its end); small
ones are built whole (:func:`encode_part`, :func:`multipart_body`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MultipartWriter",
    "Part",
    "close_delimiter",
    "encode_part",
    "multipart_body",
    "new_boundary",
    "part_header",
]

_CRLF: Final = b"\r\n"


def new_boundary() -> str:
    return uuid.uuid4().hex


def part_header(
    boundary: str, content_type: str, headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()
) -> bytes:
    """The delimiter and headers that open a part (its content follows)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    lines.extend(f"{name}: {value}" for name, value in pairs)
    return "\r\n".join(lines).encode("ascii") + _CRLF + _CRLF


def close_delimiter(boundary: str) -> bytes:
    """The close delimiter that ends the body."""
    return f"--{boundary}--".encode("ascii") + _CRLF


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a multipart body, whole in memory."""

    content_type: str
    data: bytes
    headers: tuple[tuple[str, str], ...] = ()


def encode_part(boundary: str, part: Part) -> bytes:
    """One part: delimiter, headers (with its Content-Length), content."""
    headers = (*part.headers, ("Content-Length", str(len(part.data))))
    return part_header(boundary, part.content_type, headers) + part.data + _CRLF


def multipart_body(parts: Sequence[Part]) -> tuple[bytes, str]:
    """A whole ``multipart/related`` body and its boundary."""
    boundary = new_boundary()
    return b"".join([*(encode_part(boundary, part) for part in parts), close_delimiter(boundary)]), boundary


class MultipartWriter:
    """The framing of one streamed multipart/related body."""

    def __init__(self, part_type: str, boundary: str | None = None) -> None:
        self.part_type = part_type
        self.boundary = boundary or new_boundary()

    @property
    def content_type(self) -> str:
        """The response's Content-Type header."""
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def part_header(self, content_type: str, headers: Mapping[str, str] | None = None) -> bytes:
        """The delimiter and headers that open a part (its content follows)."""
        return part_header(self.boundary, content_type, headers or {})

    def part_end(self) -> bytes:
        """What ends a part's content (before the next delimiter)."""
        return _CRLF

    def close(self) -> bytes:
        """The close delimiter that ends the body."""
        return close_delimiter(self.boundary)
