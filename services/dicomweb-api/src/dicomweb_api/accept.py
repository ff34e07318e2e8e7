"""Content negotiation: the Accept header, and the ``transfer-syntax``
parameter of DICOMweb media types (PS3.18 8.7.3).

For instance retrieval a client asks for
``multipart/related; type="application/dicom"; transfer-syntax=UID``:

* no ``transfer-syntax`` parameter: Explicit VR Little Endian (the PS3.18
  default; instances stored otherwise are transcoded);
* ``transfer-syntax=*``: each instance as it is stored, unchanged;
* a UID: that syntax, transcoded when the instance is stored otherwise and
  the conversion can be done losslessly here (else 406).

Several acceptable media ranges are tried in order of their ``q`` values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from pydicom.uid import ExplicitVRLittleEndian

from pacs_common.dicom.transcode import choose_transfer_syntax

__all__ = [
    "AS_STORED",
    "DICOM",
    "DICOM_JSON",
    "MediaRange",
    "NotAcceptableError",
    "accepts",
    "instance_transfer_syntaxes",
    "parse_accept",
    "syntax_for_instance",
]

DICOM: Final = "application/dicom"
DICOM_JSON: Final = "application/dicom+json"
MULTIPART_RELATED: Final = "multipart/related"
#: ``transfer-syntax=*``: as stored.
AS_STORED: Final = "*"
DEFAULT_TRANSFER_SYNTAX: Final = str(ExplicitVRLittleEndian)

# One parameter: ;name=value or ;name="quoted value"
_PARAM = re.compile(r';\s*([^\s=;,]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)')
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
_RANGE = re.compile(r'\s*([^\s;,]+)((?:\s*;\s*[^\s=;,]+\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;,\s]*))*)\s*(?:,|$)')


class NotAcceptableError(Exception):
    """Nothing the client accepts can be produced (HTTP 406); the message says why."""


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One element of an Accept header."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range covers ``media_type`` (``*/*``, ``type/*``, exact)."""
        if self.media_type == "*/*":
            return True
        main, _, sub = self.media_type.partition("/")
        if sub == "*":
            return media_type.startswith(main + "/")
        return self.media_type == media_type


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of ``header``, best first (``*/*`` when there is none).

    Ranges with ``q=0`` are left out; a malformed ``q`` counts as 1.
    """
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    position = 0
    while position < len(header):
        found = _RANGE.match(header, position)
        if found is None or found.end() == position:
            break
        position = found.end()
        params = {
            name.lower(): value[1:-1].replace('\\"', '"') if value.startswith('"') else value
            for name, value in _PARAM.findall(found.group(2))
        }
        q_text = params.pop("q", "1")
        try:
            q = float(q_text)
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(found.group(1).lower(), params, q))
    ranges.sort(key=lambda r: -r.q)  # stable: equal q keeps the client's order
    return ranges


def accepts(header: str | None, media_types: tuple[str, ...]) -> bool:
    """Whether the client accepts one of ``media_types``."""
    return any(r.matches(t) for r in parse_accept(header) for t in media_types)


def instance_transfer_syntaxes(header: str | None) -> list[str]:
    """The transfer syntaxes a client accepts instances in, best first
    (:data:`AS_STORED` for ``*``); raises NotAcceptableError when it accepts
    no ``multipart/related; type="application/dicom"`` response."""
    syntaxes: list[str] = []
    for media_range in parse_accept(header):
        if media_range.media_type in ("*/*", "multipart/*"):
            syntaxes.append(DEFAULT_TRANSFER_SYNTAX)
        elif media_range.media_type == MULTIPART_RELATED:
            part_type = media_range.params.get("type", DICOM).lower()
            if part_type not in (DICOM, "*/*", "application/*"):
                continue
            syntaxes.append(media_range.params.get("transfer-syntax", DEFAULT_TRANSFER_SYNTAX).strip())
    if not syntaxes:
        raise NotAcceptableError('instances are sent as multipart/related; type="application/dicom" only')
    return list(dict.fromkeys(syntaxes))


def syntax_for_instance(stored: str, accepted: list[str]) -> str | None:
    """The syntax to send an instance stored in ``stored`` in: ``stored``
    itself (no conversion), another syntax it can be losslessly converted
    to, or None when none of ``accepted`` can be produced."""
    for syntax in accepted:
        if syntax in (AS_STORED, stored):
            return stored
        if not _UID.match(syntax):
            continue
        chosen = choose_transfer_syntax(stored, [syntax])
        if chosen is not None:
            return str(chosen)
    return None
