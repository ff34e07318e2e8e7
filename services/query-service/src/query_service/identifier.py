"""The identifier of a request (DICOM JSON) as a list of keys.

An element with a non-empty ``Value`` is a matching key; without one it is
a return key (universal matching).  Values become DICOM strings: a person
name ``{"Alphabetic": "A", "Ideographic": "I"}`` becomes ``A=I``; numbers
become their decimal form.  A sequence element keeps its items as keys, for
sequence matching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from query_service.attributes import vr_of
from query_service.matching import InvalidKeyError, is_universal

__all__ = ["IGNORED_TAGS", "Key", "parse_identifier"]

_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
#: Elements of an identifier that are not keys: Specific Character Set (the
#: identifier is Unicode already), Query/Retrieve Level and the like.
IGNORED_TAGS: Final = frozenset({"00080005", "00080052", "00080053"})
SPECIFIC_CHARACTER_SET: Final = "00080005"


@dataclass(frozen=True, slots=True)
class Key:
    """One element of the identifier."""

    tag: str
    vr: str
    # Matching values as DICOM strings; empty: universal matching (return key).
    values: tuple[str, ...] = ()
    # Sequence matching: the keys of the first item (a return key with no matching item keys otherwise).
    items: tuple[Key, ...] = field(default=())

    @property
    def is_matching(self) -> bool:
        if self.vr == "SQ":
            return any(item.is_matching for item in self.items)
        return bool(self.values)


def _pn_text(value: Any) -> str:
    if isinstance(value, dict):
        groups = [str(value.get(name) or "") for name in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    return str(value)


def _without_nul(vr: str, text: str) -> str:
    # No indexed value holds one (PostgreSQL text cannot): a query that has
    # one is malformed, not a reason for the database to fail.
    if "\x00" in text:
        raise InvalidKeyError(f"a {vr} value holds a NUL character")
    return text


def _value_text(vr: str, value: Any) -> str:
    if value is None:
        return ""
    if vr == "PN":
        return _without_nul(vr, _pn_text(value))
    if isinstance(value, bool | dict | list):
        raise InvalidKeyError(f"unexpected {type(value).__name__} value for VR {vr}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _without_nul(vr, str(value).strip(" ").rstrip("\x00"))  # UIDs may be NUL-padded


def _key(tag: str, element: Any) -> Key:
    if not isinstance(element, dict):
        raise InvalidKeyError(f"element {tag} is not a DICOM JSON object")
    vr = str(element.get("vr") or "")
    if not vr:
        vr = vr_of(tag)
    raw_values = element.get("Value")
    if raw_values is not None and not isinstance(raw_values, list):
        raise InvalidKeyError(f"element {tag}: Value must be a list")
    if vr == "SQ":
        items: tuple[Key, ...] = ()
        if raw_values:
            first = raw_values[0]
            if not isinstance(first, dict):
                raise InvalidKeyError(f"element {tag}: sequence items must be objects")
            items = tuple(parse_identifier(first))
        return Key(tag.upper(), vr, (), items)
    texts = [_value_text(vr, v) for v in raw_values or []]
    values = tuple(t for t in texts if not is_universal(t))
    if len(values) < len(texts) and values:
        # A universal value among several makes the whole key universal.
        values = ()
    return Key(tag.upper(), vr, values)


def parse_identifier(identifier: dict[str, Any]) -> list[Key]:
    """The keys of ``identifier``, in tag order; raises InvalidKeyError when malformed."""
    keys = []
    for tag in sorted(identifier, key=str.upper):
        if not _TAG.match(tag):
            raise InvalidKeyError(f"not a DICOM JSON tag: {tag!r} (expected 8 hex digits)")
        if tag.upper() in IGNORED_TAGS or tag.endswith("0000"):
            continue
        keys.append(_key(tag, identifier[tag]))
    return keys
