"""``multipart/related`` bodies (RFC 2387), as DICOMweb uses them: split a
WADO-RS answer into its parts, and build the answer of this service."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["DICOM_MEDIA_TYPE", "MultipartError", "Part", "build_multipart", "parse_multipart"]

DICOM_MEDIA_TYPE: Final = "application/dicom"
_BOUNDARY: Final = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


class MultipartError(ValueError):
    """The body is not the multipart/related message its Content-Type says."""


@dataclass(frozen=True, slots=True)
class Part:
    headers: dict[str, str]  # names lower-cased
    content: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def boundary_of(content_type: str) -> str:
    if not content_type.lower().startswith("multipart/"):
        raise MultipartError(f"not a multipart media type: {content_type!r}")
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise MultipartError(f"no boundary in {content_type!r}")
    return found.group(1) or found.group(2)


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """The parts of ``body``; preamble and epilogue are ignored."""
    delimiter = b"--" + boundary_of(content_type).encode("ascii")
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("the body does not contain the boundary")
    parts: list[Part] = []
    position = start + len(delimiter)
    while True:
        if body.startswith(b"--", position):
            return parts  # the close delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise MultipartError("truncated body: no line after a delimiter")
        next_delimiter = body.find(b"\r\n" + delimiter, line_end)
        if next_delimiter < 0:
            raise MultipartError("the body has no close delimiter")
        section = body[line_end + 2 : next_delimiter]
        head, separator, content = section.partition(b"\r\n\r\n")
        if not separator:
            if section.startswith(b"\r\n"):  # a part without headers
                head, content = b"", section[2:]
            else:
                raise MultipartError("a part without a header/content separator")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            if line.strip():
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, content))
        position = next_delimiter + 2 + len(delimiter)


def build_multipart(contents: Iterable[bytes], media_type: str = DICOM_MEDIA_TYPE) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/related message of ``contents``."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for content in contents:
        chunks.append(f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode("ascii"))
        chunks.append(content)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return f'multipart/related; type="{media_type}"; boundary={boundary}', b"".join(chunks)
