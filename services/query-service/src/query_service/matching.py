"""DICOM matching primitives (PS3.4 C.2.2.2), in SQL and in Python.

The one place where a matching key value becomes a condition.  Reused by
the patient/study/series/image engine and by the worklist:

* :func:`is_universal` — empty value, or only ``*`` (C.2.2.2.3, C.2.2.2.4);
* :func:`wildcard_to_like` — ``*``/``?`` to a LIKE pattern, the LIKE
  metacharacters of the value escaped (``\\`` is the escape character);
* :func:`parse_date_range`, :func:`parse_time_range`,
  :func:`parse_datetime_range` — range matching (C.2.2.2.5), open-ended
  ranges included; the upper bound of a time is padded to the end of its
  precision (``-1100`` includes 11:00:59.999999);
* :func:`split_uid_list` — list of UID matching (C.2.2.2.2);
* :func:`pn_query_groups` — person name component groups;
* SQL builders (:class:`SqlParams`, :func:`sql_text`, :func:`sql_range`,
  :func:`sql_in`, :func:`sql_pn`) that append bind parameters and return a
  boolean SQL expression;
* Python matchers (:func:`text_matches`, :func:`pn_matches`) with the same
  semantics, for values that are not in an indexed column.

Values are Unicode strings (the identifier arrives as DICOM JSON, already
decoded).  Invalid values raise :class:`InvalidKeyError`, which the HTTP
layer answers with 400 ``invalid-identifier``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "InvalidKeyError",
    "Range",
    "SqlParams",
    "has_wildcard",
    "is_universal",
    "parse_date_range",
    "parse_datetime_range",
    "parse_range",
    "parse_time_range",
    "pn_groups",
    "pn_matches",
    "pn_query_groups",
    "split_uid_list",
    "sql_in",
    "sql_pn",
    "sql_range",
    "sql_text",
    "text_matches",
    "wildcard_to_like",
    "wildcard_to_regex",
]

WILDCARDS: Final = frozenset("*?")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DATETIME = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")
# Where a name component starts in a stored PN (fuzzy matching).
_PN_COMPONENT_STARTS: Final = ("", "^", "=", " ")


class InvalidKeyError(ValueError):
    """A matching key value DICOM does not allow (an invalid date, a UID with wildcards…)."""


# -- values ----------------------------------------------------------------------


def is_universal(value: str | None) -> bool:
    """Universal matching: no value, an empty value, or only ``*``."""
    return value is None or value.strip(" ") == "" or set(value.strip(" ")) == {"*"}


def has_wildcard(value: str) -> bool:
    return any(c in WILDCARDS for c in value)


def wildcard_to_like(value: str) -> str:
    """``SMI*`` → ``SMI%``; ``A_B?`` → ``A\\_B_`` (use with LIKE's default escape ``\\``)."""
    out: list[str] = []
    for char in value:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "\\%_":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def wildcard_to_regex(value: str) -> re.Pattern[str]:
    """A compiled Python regex matching the whole value (for in-memory matching)."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value]
    return re.compile("".join(parts), re.DOTALL)


def split_uid_list(values: str | Iterable[str]) -> list[str]:
    """List of UID matching: ``1.2\\1.3`` (or a JSON list) → ``["1.2", "1.3"]``.

    Raises InvalidKeyError for wildcards or characters a UID cannot have."""
    raw = [values] if isinstance(values, str) else list(values)
    uids = [uid.strip(" \x00") for value in raw for uid in value.split("\\")]
    uids = [uid for uid in uids if uid]
    for uid in uids:
        if len(uid) > 64 or not _UID.match(uid):
            raise InvalidKeyError(f"not a UID: {uid!r}")
    return uids


# -- ranges ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive bounds, as strings that compare correctly with the stored text
    (``YYYYMMDD``, ``HHMMSS.FFFFFF``, ``YYYYMMDDHHMMSS.FFFFFF``); None = open."""

    lower: str | None
    upper: str | None

    def contains(self, value: str | None) -> bool:
        if value is None or value == "":
            return False
        if self.lower is not None and value < self.lower:
            return False
        return self.upper is None or value <= self.upper


def _split_range(value: str, *, datetime: bool = False) -> tuple[str, str | None]:
    """(low, high) of a range, (value, None) of a single value.  A DT of at
    least hour precision may end with a UTC offset ``-HHMM``: not a range."""
    value = value.strip(" ")
    if datetime and re.match(r"^\d{10}[\d.]*[+-]\d{4}$", value):
        return value, None
    if value.count("-") == 1:
        low, high = value.split("-")
        return low.strip(" "), high.strip(" ")
    return value, None


def _date(value: str) -> str:
    compact = value.replace(".", "") if len(value) == 10 else value  # ACR-NEMA YYYY.MM.DD
    match = _DATE.match(compact)
    if not match:
        raise InvalidKeyError(f"not a date (YYYYMMDD): {value!r}")
    month, day = int(match.group(2)), int(match.group(3))
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise InvalidKeyError(f"not a date (YYYYMMDD): {value!r}")
    return compact


def parse_date_range(value: str) -> Range:
    """DA single value or range: ``20200101``, ``20200101-20201231``,
    ``-20201231``, ``20200101-``."""
    low, high = _split_range(value)
    if high is None:
        date = _date(low)
        return Range(date, date)
    if not low and not high:
        raise InvalidKeyError(f"empty date range: {value!r}")
    return Range(_date(low) if low else None, _date(high) if high else None)


def _time(value: str) -> tuple[str, int]:
    """Validated time without colons, and its precision (number of digits before the fraction)."""
    compact = value.replace(":", "")
    match = _TIME.match(compact)
    if not match:
        raise InvalidKeyError(f"not a time (HHMMSS.FFFFFF): {value!r}")
    hh, mm, ss = match.group(1), match.group(2), match.group(3)
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        raise InvalidKeyError(f"not a time (HHMMSS.FFFFFF): {value!r}")
    if match.group(4) and ss is None:
        raise InvalidKeyError(f"not a time (HHMMSS.FFFFFF): {value!r}")
    return compact, len(compact.split(".")[0])


def _time_upper(value: str) -> str:
    """The last instant a time of this precision covers: ``11`` → ``115959.999999``."""
    compact, digits = _time(value)
    if "." in compact:
        whole, fraction = compact.split(".")
        return f"{whole}.{fraction.ljust(6, '9')}"
    return compact + "5959"[digits - 2 :] + ".999999"


def parse_time_range(value: str) -> Range:
    """TM single value or range; a single value covers its precision
    (``1030`` matches 10:30:00 to 10:30:59.999999)."""
    low, high = _split_range(value)
    if high is None:
        return Range(_time(low)[0], _time_upper(low))
    if not low and not high:
        raise InvalidKeyError(f"empty time range: {value!r}")
    return Range(_time(low)[0] if low else None, _time_upper(high) if high else None)


def _datetime(value: str) -> tuple[str, str]:
    """(lower form, upper form) of a DT; the UTC offset is dropped (stored values
    are compared as recorded)."""
    match = _DATETIME.match(value)
    if not match:
        raise InvalidKeyError(f"not a datetime (YYYYMMDDHHMMSS.FFFFFF): {value!r}")
    year, month, day, hour, minute, second, fraction, _offset = match.groups()
    if (month and not 1 <= int(month) <= 12) or (day and not 1 <= int(day) <= 31):
        raise InvalidKeyError(f"not a datetime: {value!r}")
    if (hour and int(hour) > 23) or (minute and int(minute) > 59) or (second and int(second) > 60):
        raise InvalidKeyError(f"not a datetime: {value!r}")
    lower = "".join(p for p in (year, month, day, hour, minute, second, fraction) if p)
    upper = "".join(
        (
            year,
            month or "12",
            day or "31",
            hour or "23",
            minute or "59",
            second or "59",
            "." + (fraction or ".")[1:].ljust(6, "9"),
        )
    )
    return lower, upper


def parse_datetime_range(value: str) -> Range:
    """DT single value or range; bounds padded like :func:`parse_time_range`."""
    low, high = _split_range(value, datetime=True)
    if high is None:
        lower, upper = _datetime(low)
        return Range(lower, upper)
    if not low and not high:
        raise InvalidKeyError(f"empty datetime range: {value!r}")
    return Range(_datetime(low)[0] if low else None, _datetime(high)[1] if high else None)


def parse_range(vr: str, value: str) -> Range:
    """The range of a DA, TM or DT matching key value."""
    if vr == "DA":
        return parse_date_range(value)
    if vr == "TM":
        return parse_time_range(value)
    if vr == "DT":
        return parse_datetime_range(value)
    raise InvalidKeyError(f"range matching does not apply to VR {vr}")


# -- person names ----------------------------------------------------------------


def pn_groups(value: str) -> list[str]:
    """``Alphabetic=Ideographic=Phonetic`` → its three component groups."""
    groups = value.split("=")[:3]
    return groups + [""] * (3 - len(groups))


def pn_query_groups(value: str) -> list[tuple[int | None, str]]:
    """The groups a PN matching key constrains: ``[(None, v)]`` for a value
    without ``=`` (matches any stored group), else ``[(position, group)]`` (1-3)
    for each non-universal group, which must match the same-position group."""
    if "=" not in value:
        return [(None, value)]
    return [(n, group) for n, group in enumerate(pn_groups(value), start=1) if not is_universal(group)]


def _fuzzy_components(value: str) -> list[str]:
    parts = re.split(r"[\^= ,]+", value.replace("*", " ").replace("?", " "))
    return [part.upper() for part in parts if part]


# -- SQL -------------------------------------------------------------------------


class SqlParams:
    """Bind parameters of one statement; :meth:`add` returns the placeholder."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _or(conditions: Sequence[str]) -> str:
    if not conditions:
        return "false"
    return conditions[0] if len(conditions) == 1 else "(" + " OR ".join(conditions) + ")"


def _and(conditions: Sequence[str]) -> str:
    if not conditions:
        return "true"
    return conditions[0] if len(conditions) == 1 else "(" + " AND ".join(conditions) + ")"


def sql_text(column: str, value: str, params: SqlParams, *, multi_valued: bool = False) -> str:
    """Single value or wildcard matching on a text column (case-sensitive).

    ``multi_valued``: the column holds backslash-joined values; any of them may match."""
    if multi_valued:
        element = "mv"
        inner = sql_text(element, value, params)
        return f"EXISTS (SELECT 1 FROM unnest(string_to_array({column}, '\\')) AS mv WHERE {inner})"
    if has_wildcard(value):
        return f"{column} LIKE {params.add(wildcard_to_like(value))}"
    return f"{column} = {params.add(value)}"


def sql_in(column: str, values: Sequence[str], params: SqlParams) -> str:
    """List matching (UIDs, or several values of any key): equal to one of them."""
    if len(values) == 1:
        return f"{column} = {params.add(values[0])}"
    return f"{column} = ANY({params.add(list(values))}::text[])"


def sql_range(column: str, bounds: Range, params: SqlParams) -> str:
    """Range matching on a text column holding DICOM DA/TM/DT strings."""
    conditions: list[str] = []
    if bounds.lower is not None and bounds.lower == bounds.upper:
        return f"{column} = {params.add(bounds.lower)}"
    if bounds.lower is not None:
        conditions.append(f"{column} >= {params.add(bounds.lower)}")
    if bounds.upper is not None:
        conditions.append(f"{column} <= {params.add(bounds.upper)}")
    return _and(conditions)


def _sql_pn_group(
    norm: str, raw: str | None, group: str, position: int, params: SqlParams, *, case_insensitive: bool
) -> str:
    norm_group = f"split_part({norm}, '=', {position})"
    conditions = [sql_text(norm_group, group.upper(), params)]
    if not case_insensitive and raw is not None:
        conditions.append(sql_text(f"split_part({raw}, '=', {position})", group, params))
    return _and(conditions)


def sql_pn(
    norm: str,
    raw: str | None,
    value: str,
    params: SqlParams,
    *,
    case_insensitive: bool = True,
    fuzzy: bool = False,
) -> str:
    """Person name matching by component group.

    ``norm`` is the upper-cased column (or ``upper(column)``), ``raw`` the
    column as stored, compared as well when matching is case-sensitive.  A
    value without ``=`` matches any stored group; with ``=``, each non-empty
    group matches the same-position group.  The ``split_part`` expressions
    are those of the 0002 expression indexes; a value starting with a
    wildcard adds a condition on the whole column that the trigram index
    serves.  ``fuzzy``: every name component of the value must begin a
    stored name component, case-insensitively."""
    if fuzzy:
        conditions = []
        for component in _fuzzy_components(value):
            like = wildcard_to_like(component)
            starts = [f"{norm} LIKE {params.add(like + '%')}"]
            starts += [
                f"{norm} LIKE {params.add('%' + sep + like + '%')}" for sep in _PN_COMPONENT_STARTS[1:]
            ]
            conditions.append(_or(starts))
        return _and(conditions)
    conditions = []
    for position, group in pn_query_groups(value):
        if position is None:
            branches = [
                _sql_pn_group(norm, raw, group, n, params, case_insensitive=case_insensitive)
                for n in (1, 2, 3)
            ]
            condition = _or(branches)
            if group.startswith(("*", "?")):
                condition = (
                    f"({norm} LIKE {params.add('%' + wildcard_to_like(group.upper()) + '%')} AND {condition})"
                )
            conditions.append(condition)
        else:
            conditions.append(
                _sql_pn_group(norm, raw, group, position, params, case_insensitive=case_insensitive)
            )
    return _and(conditions)


# -- Python ----------------------------------------------------------------------


def text_matches(query: str, stored: str | None, *, case_insensitive: bool = False) -> bool:
    """Single value or wildcard matching of one value, in memory."""
    if is_universal(query):
        return True
    if stored is None:
        return False
    if case_insensitive:
        query, stored = query.upper(), stored.upper()
    if has_wildcard(query):
        return wildcard_to_regex(query).fullmatch(stored) is not None
    return query == stored


def pn_matches(query: str, stored: str | None, *, case_insensitive: bool = True, fuzzy: bool = False) -> bool:
    """:func:`sql_pn`, in memory: ``stored`` is ``Alphabetic=Ideographic=Phonetic``."""
    if is_universal(query):
        return True
    if stored is None:
        return False
    if fuzzy:
        upper = stored.upper()
        return all(
            upper.startswith(c) or any(sep + c in upper for sep in _PN_COMPONENT_STARTS[1:])
            for c in _fuzzy_components(query)
        )
    groups = pn_groups(stored)

    def group_matches(group: str, candidate: str) -> bool:
        if not text_matches(group.upper(), candidate.upper()):
            return False
        return case_insensitive or text_matches(group, candidate)

    for position, group in pn_query_groups(query):
        if position is None:
            if not any(group_matches(group, candidate) for candidate in groups):
                return False
        elif not group_matches(group, groups[position - 1]):
            return False
    return True
