"""Building a match (DICOM JSON) from a result row.

Index columns hold DICOM strings: multiple values joined with ``\\``, PN
component groups joined with ``=``; they become DICOM JSON values here
(PN objects, numbers for IS/DS/US).  Other keys are copied from the stored
metadata of a representative instance.  Every key asked for is present,
without ``Value`` when there is none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from query_service.attributes import Kind, vr_of
from query_service.identifier import SPECIFIC_CHARACTER_SET
from query_service.plan import QueryPlan, ReturnKey, Source

__all__ = ["build_match"]

_NUMBER_VRS: Final = frozenset({"IS", "DS"})
#: The charset of every match: values are Unicode (the gateway encodes the response).
UNICODE_CHARSET: Final = "ISO_IR 192"


def _pn_value(text: str) -> dict[str, str]:
    groups = text.split("=")
    return {
        name: group
        for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
        if group
    }


def _number(text: str) -> int | float | str:
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and "." not in text and "e" not in text.lower():
        return int(number)
    return number


def _column_element(return_key: ReturnKey, value: Any) -> dict[str, Any]:
    element: dict[str, Any] = {"vr": return_key.vr}
    if value is None or value in ("", []):
        return element
    attribute = return_key.attribute
    kind = attribute.kind if attribute else Kind.TEXT
    values: list[Any]
    if kind is Kind.TEXT_ARRAY:
        values = list(value)
    elif isinstance(value, int):
        values = [value]
    elif return_key.vr == "PN":
        values = [_pn_value(v) for v in str(value).split("\\")]
    elif return_key.vr in _NUMBER_VRS:
        values = [_number(v) for v in str(value).split("\\")]
    elif kind is Kind.MULTI_TEXT:
        values = str(value).split("\\")
    else:
        values = [value]
    element["Value"] = values
    return element


def _metadata_element(return_key: ReturnKey, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    stored = metadata.get(return_key.tag) if metadata else None
    if not isinstance(stored, dict):
        return {"vr": return_key.vr}
    if stored.get("vr") == "SQ" and return_key.item_tags and stored.get("Value"):
        # Sequence return keys: the items with the item keys asked for.
        items = [
            {tag: item.get(tag) or {"vr": vr_of(tag)} for tag in return_key.item_tags}
            for item in stored["Value"]
            if isinstance(item, dict)
        ]
        return {"vr": "SQ", "Value": items}
    return dict(stored)


def build_match(plan: QueryPlan, row: Mapping[str, Any]) -> dict[str, Any]:
    """The DICOM JSON of one match (keys in tag order)."""
    metadata: Mapping[str, Any] | None = row.get("metadata") if "metadata" in row else None
    match: dict[str, Any] = {}
    if plan.include_all and metadata:
        for tag, element in metadata.items():
            if tag != SPECIFIC_CHARACTER_SET and (plan.include_tags is None or tag in plan.include_tags):
                match[tag] = element
    for return_key in plan.return_keys:
        if return_key.source is Source.COLUMN:
            assert return_key.column_name is not None
            match[return_key.tag] = _column_element(return_key, row[return_key.column_name])
        elif return_key.source is Source.METADATA:
            match[return_key.tag] = _metadata_element(return_key, metadata)
        elif return_key.source is Source.CHARSET:
            match[return_key.tag] = {"vr": "CS", "Value": [UNICODE_CHARSET]}
        else:
            match[return_key.tag] = {"vr": return_key.vr}
    return dict(sorted(match.items()))
