"""HTTP ``Range`` requests (RFC 9110 14.1): one byte range of a representation.

Only a single range is served; a request for several ranges gets the whole
representation (a server may ignore ``Range``), which every client handles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["ByteRange", "RangeNotSatisfiableError", "parse_range"]

_SINGLE_RANGE: Final = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class RangeNotSatisfiableError(ValueError):
    """The range lies wholly outside the representation (answer 416)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """``length`` bytes from ``start`` of a representation of ``total`` bytes."""

    start: int
    length: int
    total: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.start + self.length - 1}/{self.total}"


def parse_range(header: str | None, total: int) -> ByteRange | None:
    """The range ``header`` asks for in a representation of ``total`` bytes.

    None when the whole representation is to be sent: no header, a header
    that is not a single ``bytes`` range (ignored, as RFC 9110 allows).
    Raises :class:`RangeNotSatisfiableError`
    when no byte of the range exists.
    """
    if header is None:
        return None
    match = _SINGLE_RANGE.match(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or total == 0:
            raise RangeNotSatisfiableError(f"bytes=-{suffix} of {total} bytes")
        start = max(total - suffix, 0)
        end = total - 1
    else:
        start = int(first)
        end = int(last) if last else total - 1
        if last and end < start:
            return None  # syntactically invalid: ignored
        if start >= total:
            raise RangeNotSatisfiableError(f"bytes={start}- of {total} bytes")
        end = min(end, total - 1)
    return ByteRange(start=start, length=end - start + 1, total=total)
