"""Matching keys on attributes the index does not hold, against DICOM JSON.

The index has columns for the usual query keys only.  A matching key on any
other attribute (a private tag, Patient's Birth Time, a sequence such as
Referenced Study Sequence…) is applied here, in Python, to the stored
metadata of a representative instance of each candidate entity (for a study:
its first instance; see ``query_service.plan``).  The rules are those of the
SQL side (``query_service.matching``): single value and wildcard
(case-sensitive but for PN), DA/TM/DT ranges, UID lists, PN groups, and
sequence matching — an item of the stored sequence must match every
matching key of the query's item.  A multi-valued stored attribute matches
when any of its values does.  Entities without the attribute do not match.
"""

from __future__ import annotations

from typing import Any

from query_service.identifier import Key
from query_service.matching import parse_range, pn_matches, split_uid_list, text_matches

__all__ = ["element_matches", "metadata_matches"]

_RANGE_VRS = frozenset({"DA", "TM", "DT"})


def _stored_texts(element: dict[str, Any]) -> list[str]:
    texts = []
    for value in element.get("Value") or []:
        if value is None:
            continue
        if isinstance(value, dict):  # PN
            groups = [str(value.get(n) or "") for n in ("Alphabetic", "Ideographic", "Phonetic")]
            while groups and not groups[-1]:
                groups.pop()
            texts.append("=".join(groups))
        elif isinstance(value, float) and value.is_integer():
            texts.append(str(int(value)))
        else:
            texts.append(str(value))
    return texts


def _value_matches(key: Key, query: str, stored: str, *, case_insensitive_pn: bool, fuzzy: bool) -> bool:
    if key.vr == "PN":
        return pn_matches(query, stored, case_insensitive=case_insensitive_pn, fuzzy=fuzzy)
    if key.vr in _RANGE_VRS:
        return parse_range(key.vr, query).contains(stored.replace(":", "") if key.vr == "TM" else stored)
    if key.vr == "UI":
        return stored in split_uid_list(query)
    return text_matches(query, stored)


def element_matches(
    key: Key, element: dict[str, Any] | None, *, case_insensitive_pn: bool = True, fuzzy: bool = False
) -> bool:
    """Whether the stored DICOM JSON ``element`` matches ``key``."""
    if not key.is_matching:
        return True
    if not element:
        return False
    if key.vr == "SQ":
        items = [item for item in element.get("Value") or [] if isinstance(item, dict)]
        return any(
            metadata_matches(key.items, item, case_insensitive_pn=case_insensitive_pn, fuzzy=fuzzy)
            for item in items
        )
    stored = _stored_texts(element)
    return any(
        _value_matches(key, query, value, case_insensitive_pn=case_insensitive_pn, fuzzy=fuzzy)
        for query in key.values
        for value in stored
    )


def metadata_matches(
    keys: list[Key] | tuple[Key, ...],
    metadata: dict[str, Any],
    *,
    case_insensitive_pn: bool = True,
    fuzzy: bool = False,
) -> bool:
    """Whether ``metadata`` (DICOM JSON of a dataset or item) matches every key."""
    return all(
        element_matches(key, metadata.get(key.tag), case_insensitive_pn=case_insensitive_pn, fuzzy=fuzzy)
        for key in keys
    )
