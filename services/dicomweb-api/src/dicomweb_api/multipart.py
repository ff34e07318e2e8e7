"""Writing ``multipart/related`` responses (RFC 2387) part by part.

The boundary is random (a UUID), so it cannot occur in a DICOM object by
accident with any practical probability; parts are streamed, never joined
in memory.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

__all__ = ["MultipartWriter"]


class MultipartWriter:
    """The framing of one multipart/related body."""

    def __init__(self, part_type: str, boundary: str | None = None) -> None:
        self.part_type = part_type
        self.boundary = boundary or uuid.uuid4().hex

    @property
    def content_type(self) -> str:
        """The response's Content-Type header."""
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def part_header(self, content_type: str, headers: Mapping[str, str] | None = None) -> bytes:
        """The delimiter and headers that open a part (its content follows)."""
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def part_end(self) -> bytes:
        """What ends a part's content (before the next delimiter)."""
        return b"\r\n"

    def close(self) -> bytes:
        """The close delimiter that ends the body."""
        return f"--{self.boundary}--\r\n".encode("ascii")
