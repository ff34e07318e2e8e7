"""A query request → one SQL statement, plus what the engine does in Python.

The statement has two parts.  The inner query finds the matching entities
(primary keys only), in a deterministic order, with ``OFFSET``/``LIMIT``
when everything is matched in SQL; the outer query joins back the rows of
those entities and computes the return keys (columns, computed attributes,
the metadata of a representative instance), so expensive values are only
computed for the entities returned.

Keys on attributes the index does not hold are matched in Python against the
stored metadata (``query_service.metadata_match``); paging then happens in
Python too, since SQL cannot know which rows that filter drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from pacs_common.query.models import InformationModel, QueryLevel, QueryRequest
from pacs_common.settings import QuerySettings
from query_service.attributes import (
    LEVEL_DEPTH,
    UNIQUE_KEYS,
    Attribute,
    Kind,
    attribute_for,
    level_of,
    levels_from_root,
    tags_of_level,
    unique_keys_through,
)
from query_service.identifier import SPECIFIC_CHARACTER_SET, Key, parse_identifier
from query_service.matching import (
    InvalidKeyError,
    SqlParams,
    has_wildcard,
    parse_range,
    split_uid_list,
    sql_in,
    sql_pn,
    sql_range,
    sql_text,
)

__all__ = ["InvalidLevelError", "QueryPlan", "ReturnKey", "Source", "plan_query"]

PATIENT, STUDY, SERIES, IMAGE = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

_ALIAS: Final = {PATIENT: "p", STUDY: "st", SERIES: "se", IMAGE: "i"}
_TABLE: Final = {PATIENT: "patient", STUDY: "study", SERIES: "series", IMAGE: "instance"}
# How each level joins the one above it.
_PARENT_JOIN: Final = {
    STUDY: "patient p ON p.pk = st.patient_fk",
    SERIES: "study st ON st.pk = se.study_fk",
    IMAGE: "series se ON se.pk = i.series_fk",
}
_ORDER: Final = {
    PATIENT: "p.pk",
    STUDY: "st.study_date DESC NULLS LAST, st.pk DESC",
    SERIES: "se.study_fk, se.series_number, se.pk",
    IMAGE: "i.series_fk, i.instance_number, i.pk",
}
# The columns of the order, selected by the inner query (for the fenced form).
_ORDER_KEYS: Final = {
    PATIENT: "p.pk AS o1",
    STUDY: "st.study_date AS o1, st.pk AS o2",
    SERIES: "se.study_fk AS o1, se.series_number AS o2, se.pk AS o3",
    IMAGE: "i.series_fk AS o1, i.instance_number AS o2, i.pk AS o3",
}
_ORDER_ALIASED: Final = {
    PATIENT: "o1",
    STUDY: "o1 DESC NULLS LAST, o2 DESC",
    SERIES: "o1, o2, o3",
    IMAGE: "o1, o2, o3",
}
# The primary key of a representative instance of an entity of each level.
_REPRESENTATIVE: Final = {
    IMAGE: "i.pk",
    SERIES: "(SELECT x.pk FROM instance x WHERE x.series_fk = se.pk ORDER BY x.instance_number, x.pk LIMIT 1)",
    STUDY: (
        "(SELECT x.pk FROM instance x WHERE x.series_fk = "
        "(SELECT y.pk FROM series y WHERE y.study_fk = st.pk ORDER BY y.series_number, y.pk LIMIT 1) "
        "ORDER BY x.instance_number, x.pk LIMIT 1)"
    ),
    PATIENT: (
        "(SELECT x.pk FROM instance x WHERE x.series_fk = "
        "(SELECT y.pk FROM series y WHERE y.study_fk = "
        "(SELECT z.pk FROM study z WHERE z.patient_fk = p.pk ORDER BY z.pk DESC LIMIT 1) "
        "ORDER BY y.series_number, y.pk LIMIT 1) "
        "ORDER BY x.instance_number, x.pk LIMIT 1)"
    ),
}
# Request Attributes Sequence item keys kept in series.request_attributes (by the indexer).
_REQUEST_ATTRIBUTE_KEYS: Final = {
    "00400009": "ScheduledProcedureStepID",
    "00401001": "RequestedProcedureID",
    "00080050": "AccessionNumber",
    "0020000D": "StudyInstanceUID",
    "00321060": "RequestedProcedureDescription",
    "00400007": "ScheduledProcedureStepDescription",
}


class InvalidLevelError(ValueError):
    """The level does not exist in the information model (PATIENT in Study Root)."""


class Source(StrEnum):
    COLUMN = "column"  # an index column of the outer query
    METADATA = "metadata"  # the stored metadata of a representative instance
    EMPTY = "empty"  # not available at this level: returned without a value
    CHARSET = "charset"  # Specific Character Set of the (Unicode) match


@dataclass(frozen=True, slots=True)
class ReturnKey:
    tag: str
    vr: str
    source: Source
    # COLUMN: the attribute (its kind decides the conversion) and the column's name in the row.
    attribute: Attribute | None = None
    column_name: str | None = None
    # METADATA of a sequence: the item keys asked for (empty: whole items).
    item_tags: tuple[str, ...] = ()


@dataclass(slots=True)
class QueryPlan:
    level: QueryLevel
    sql: str
    params: list[Any]
    return_keys: list[ReturnKey]
    # Matching keys applied to the metadata in Python (not indexed).
    python_filters: list[Key] = field(default_factory=list)
    # The statement has OFFSET/LIMIT; otherwise the engine pages.
    paged_in_sql: bool = True
    offset: int = 0
    # The most matches to return (limit / max_matches); one more row is fetched to know.
    cap: int = 0
    # Tags of the level for include_all (None: all of the metadata).
    include_all: bool = False
    include_tags: frozenset[str] | None = None
    case_insensitive_pn: bool = True
    fuzzy: bool = False


def _check_level(model: InformationModel, level: QueryLevel) -> None:
    if model is InformationModel.STUDY_ROOT and level is PATIENT:
        raise InvalidLevelError("the PATIENT level does not exist in the Study Root information model")


def _check_hierarchy(model: InformationModel, level: QueryLevel, keys: dict[str, Key]) -> None:
    """Hierarchical queries: the unique key of every level above is given
    (a single value, or a UID list), not a wildcard nor universal."""
    for above in levels_from_root(model, level)[:-1]:
        unique = UNIQUE_KEYS[above]
        key = keys.get(unique.tag)
        if key is None or not key.values:
            raise InvalidKeyError(
                f"{unique.keyword} is required at the {level} level (hierarchical query); "
                "give it, or ask for relational queries"
            )
        if unique.kind is Kind.UID:
            split_uid_list(key.values)
        elif len(key.values) != 1 or has_wildcard(key.values[0]):
            raise InvalidKeyError(f"{unique.keyword} must be a single value without wildcards")


def _ints(values: Sequence[str], keyword: str) -> list[int]:
    try:
        return [int(v.strip()) for v in values]
    except ValueError as exc:
        raise InvalidKeyError(f"{keyword} must be an integer: {list(values)}") from exc


def _or(conditions: Sequence[str]) -> str:
    return conditions[0] if len(conditions) == 1 else "(" + " OR ".join(conditions) + ")"


def _request_attributes_condition(column: str, key: Key, params: SqlParams) -> str | None:
    """Sequence matching on series.request_attributes; None when an item key is
    not kept there (the engine then matches the metadata)."""
    conditions = []
    for item in key.items:
        if not item.is_matching:
            continue
        keyword = _REQUEST_ATTRIBUTE_KEYS.get(item.tag)
        if keyword is None or item.vr == "SQ":
            return None
        field_sql = f"(ra.item ->> '{keyword}')"
        if item.vr == "UI":
            conditions.append(sql_in(field_sql, split_uid_list(item.values), params))
        else:
            conditions.append(_or([sql_text(field_sql, v, params) for v in item.values]))
    if not conditions:
        return "true"
    where = " AND ".join(conditions)
    return f"EXISTS (SELECT 1 FROM jsonb_array_elements({column}) AS ra(item) WHERE {where})"


def condition(
    attribute: Attribute, key: Key, params: SqlParams, *, case_insensitive_pn: bool, fuzzy: bool
) -> str | None:
    """The SQL condition of a matching key on an indexed attribute (None: match in Python)."""
    column = attribute.column
    values = key.values
    match attribute.kind:
        case Kind.UID:
            return sql_in(column, split_uid_list(values), params)
        case Kind.PN:
            norm = attribute.norm_column or f"upper({column})"
            return _or(
                [
                    sql_pn(norm, column, v, params, case_insensitive=case_insensitive_pn, fuzzy=fuzzy)
                    for v in values
                ]
            )
        case Kind.DATE | Kind.TIME | Kind.DATETIME:
            return _or([sql_range(column, parse_range(attribute.vr, v), params) for v in values])
        case Kind.INT:
            numbers = _ints(values, attribute.keyword)
            if len(numbers) == 1:
                return f"{column} = {params.add(numbers[0])}"
            return f"{column} = ANY({params.add(numbers)}::bigint[])"
        case Kind.TEXT_ARRAY:
            if any(has_wildcard(v) for v in values):
                inner = _or([sql_text("v", v, params) for v in values])
                return f"EXISTS (SELECT 1 FROM unnest({column}) AS v WHERE {inner})"
            return f"{column} && {params.add(list(values))}::text[]"
        case Kind.MULTI_TEXT:
            return _or([sql_text(column, v, params, multi_valued=True) for v in values])
        case Kind.REQUEST_ATTRIBUTES:
            return _request_attributes_condition(column, key, params)
        case _:
            return _or([sql_text(column, v, params) for v in values])


@dataclass(slots=True)
class _Builder:
    level: QueryLevel
    params: SqlParams = field(default_factory=SqlParams)
    where: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    return_keys: dict[str, ReturnKey] = field(default_factory=dict)
    python_filters: list[Key] = field(default_factory=list)
    # Whether a condition is on a parent table of the level's.
    parent_conditions: bool = False

    def add_column(self, attribute: Attribute) -> str:
        name = f"c{len(self.columns)}"
        self.columns.append(f"{attribute.column} AS {name}")
        return name

    def return_key(self, key: Key, attribute: Attribute | None) -> None:
        if key.tag in self.return_keys:
            return
        if attribute is not None and attribute.kind is not Kind.REQUEST_ATTRIBUTES:
            name = self.add_column(attribute)
            self.return_keys[key.tag] = ReturnKey(key.tag, attribute.vr, Source.COLUMN, attribute, name)
        elif level_of(key.tag) is not None and attribute is None:
            # An attribute of a level below the query's: no single value to return.
            self.return_keys[key.tag] = ReturnKey(key.tag, key.vr, Source.EMPTY)
        else:
            item_tags = tuple(item.tag for item in key.items)
            self.return_keys[key.tag] = ReturnKey(key.tag, key.vr, Source.METADATA, item_tags=item_tags)


def _inner_from(level: QueryLevel) -> str:
    parts = [f"{_TABLE[level]} {_ALIAS[level]}"]
    lv = level
    while lv in _PARENT_JOIN:
        parts.append(f"LEFT JOIN {_PARENT_JOIN[lv]}")
        lv = next(k for k, d in LEVEL_DEPTH.items() if d == LEVEL_DEPTH[lv] - 1)
    return " ".join(parts)


def _outer_joins(level: QueryLevel) -> str:
    """The rows of a matched entity and of its parents, by primary and foreign keys."""
    joins = [f"JOIN {_TABLE[level]} {_ALIAS[level]} ON {_ALIAS[level]}.pk = q.entity_pk"]
    lv = level
    while lv in _PARENT_JOIN:
        joins.append(f"JOIN {_PARENT_JOIN[lv]}")
        lv = next(k for k, d in LEVEL_DEPTH.items() if d == LEVEL_DEPTH[lv] - 1)
    return " ".join(joins)


def _metadata_sql(level: QueryLevel, tags: frozenset[str] | None) -> str:
    """The metadata of a representative instance: all of it, or only ``tags``."""
    if tags is None:
        selected = "m.metadata"
    else:
        pairs = ", ".join(f"'{tag}', m.metadata -> '{tag}'" for tag in sorted(tags))
        selected = f"jsonb_build_object({pairs})"
    return f"(SELECT {selected} FROM instance_metadata m WHERE m.instance_fk = {_REPRESENTATIVE[level]})"


def plan_query(request: QueryRequest, settings: QuerySettings) -> QueryPlan:
    """Plan ``request``; raises InvalidLevelError or InvalidKeyError when it is invalid."""
    level, model = request.level, request.information_model
    _check_level(model, level)
    keys = {key.tag: key for key in parse_identifier(request.identifier)}
    if not request.relational:
        _check_hierarchy(model, level, keys)
    case_insensitive_pn = (
        settings.pn_case_insensitive if request.case_insensitive_pn is None else request.case_insensitive_pn
    )
    builder = _Builder(level)
    for unique in unique_keys_through(model, level):
        builder.return_key(Key(unique.tag, unique.vr), unique)
    for key in keys.values():
        attribute = attribute_for(key.tag, level)
        builder.return_key(key, attribute)
        if not key.is_matching:
            continue
        if attribute is None:
            if level_of(key.tag) is None:
                builder.python_filters.append(key)
            # A key of a level below the query's cannot select entities of this level: ignored.
            continue
        sql = condition(
            attribute,
            key,
            builder.params,
            case_insensitive_pn=case_insensitive_pn,
            fuzzy=request.fuzzy_matching,
        )
        if sql is None:
            builder.python_filters.append(key)
        else:
            builder.where.append(sql)
            builder.parent_conditions |= attribute.level is not level

    if SPECIFIC_CHARACTER_SET in request.identifier:
        builder.return_keys[SPECIFIC_CHARACTER_SET] = ReturnKey(SPECIFIC_CHARACTER_SET, "CS", Source.CHARSET)

    cap = min(request.limit or settings.max_matches, settings.max_matches)
    paged_in_sql = not builder.python_filters
    alias = _ALIAS[level]
    # Parents are LEFT JOINed: those without a condition are removed by the planner.
    inner = f"SELECT {alias}.pk AS entity_pk, {_ORDER_KEYS[level]} FROM {_inner_from(level)}"
    if builder.where:
        inner += " WHERE " + " AND ".join(builder.where)
    if builder.parent_conditions:
        # A condition on a parent (a patient's name at the STUDY level, the
        # study UID at the SERIES level) selects few rows: find them all, then
        # sort.  Without the fence the planner may walk the order's index and
        # test each row against the parent, which a LIMIT makes look cheap.
        inner = f"SELECT * FROM ({inner} OFFSET 0) fenced ORDER BY {_ORDER_ALIASED[level]}"
    else:
        inner += f" ORDER BY {_ORDER[level]}"
    if paged_in_sql:
        inner += f" OFFSET {builder.params.add(request.offset)} LIMIT {builder.params.add(cap + 1)}"

    metadata_tags: set[str] = {
        rk.tag for rk in builder.return_keys.values() if rk.source is Source.METADATA
    } | {key.tag for key in builder.python_filters}
    include_tags = tags_of_level(level) if request.include_all else None
    outer_columns = ["q.entity_pk", *builder.columns]
    if request.include_all:
        outer_columns.append(f"{_metadata_sql(level, None)} AS metadata")
    elif metadata_tags:
        outer_columns.append(f"{_metadata_sql(level, frozenset(metadata_tags))} AS metadata")
    sql = f"SELECT {', '.join(outer_columns)} FROM ({inner}) q {_outer_joins(level)} ORDER BY {_ORDER[level]}"
    return QueryPlan(
        level=level,
        sql=sql,
        params=builder.params.values,
        return_keys=list(builder.return_keys.values()),
        python_filters=builder.python_filters,
        paged_in_sql=paged_in_sql,
        offset=request.offset,
        cap=cap,
        include_all=request.include_all,
        include_tags=include_tags,
        case_insensitive_pn=case_insensitive_pn,
        fuzzy=request.fuzzy_matching,
    )
