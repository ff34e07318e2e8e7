"""Routing rules: where received instances are forwarded (``routing_rule``,
migration 0005).

A rule has a condition (modality, calling AE title, a Study Description
pattern with DICOM wildcards ``*`` and ``?``, matched case-insensitively;
an absent part matches anything) and destinations: AE titles of the
remote-node registry that may receive instances (``store``).  Enabled rules
are evaluated by ascending ``priority``; every matching rule forwards.  The
API edits the rules; the forwarding worker reads them
(:meth:`RoutingRuleRepository.list` with ``enabled_only``) and asks
:meth:`RoutingRule.matches`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "RoutingCondition",
    "RoutingRule",
    "RoutingRuleCreate",
    "RoutingRuleRepository",
    "RuleExistsError",
    "unknown_destinations",
]

_AE_TITLE: Final = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII but backslash


def _ae_title(value: str) -> str:
    value = value.strip(" ")
    if not _AE_TITLE.match(value):
        raise ValueError("an AE title has 1 to 16 printable ASCII characters other than backslash")
    return value


def _wildcard(pattern: str) -> re.Pattern[str]:
    """A DICOM wildcard pattern (``*``, ``?``) as a case-insensitive regular expression."""
    translated = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(translated, re.IGNORECASE | re.DOTALL)


class RoutingCondition(BaseModel):
    """What an instance must have for the rule to forward it (None: anything)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modality: str | None = Field(default=None, pattern=r"^[A-Z0-9_ ]{1,16}$")
    calling_ae_title: str | None = None
    study_description: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("calling_ae_title")
    @classmethod
    def _valid_calling_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)


class RoutingRuleCreate(BaseModel):
    """A rule to add, or the new content of one (PUT replaces it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    enabled: bool = True
    # Lower first.
    priority: int = Field(default=100, ge=0, le=1_000_000)
    condition: RoutingCondition = RoutingCondition()
    destinations: list[str] = Field(min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=1024)

    @field_validator("destinations")
    @classmethod
    def _valid_destinations(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(_ae_title(ae) for ae in value))


class RoutingRule(RoutingRuleCreate):
    id: int
    created_at: datetime
    updated_at: datetime

    def matches(
        self, *, modality: str | None, calling_ae_title: str | None, study_description: str | None
    ) -> bool:
        """Whether an instance with these attributes meets the condition (enabled or not)."""
        condition = self.condition
        if condition.modality is not None and condition.modality != (modality or "").strip().upper():
            return False
        if (
            condition.calling_ae_title is not None
            and condition.calling_ae_title != (calling_ae_title or "").strip()
        ):
            return False
        if condition.study_description is not None:
            return _wildcard(condition.study_description).fullmatch(study_description or "") is not None
        return True


class RuleExistsError(Exception):
    """A rule with this name exists already."""


_COLUMNS: Final = (
    "id, name, enabled, priority, modality, calling_ae_title, study_description_pattern, destinations, "
    "description, created_at, updated_at"
)

Executor = asyncpg.Pool | asyncpg.Connection


def _rule(row: asyncpg.Record) -> RoutingRule:
    values: dict[str, Any] = dict(row)
    values["condition"] = RoutingCondition(
        modality=values.pop("modality"),
        calling_ae_title=values.pop("calling_ae_title"),
        study_description=values.pop("study_description_pattern"),
    )
    return RoutingRule.model_validate(values)


def _values(rule: RoutingRuleCreate) -> tuple[Any, ...]:
    c = rule.condition
    return (
        rule.name,
        rule.enabled,
        rule.priority,
        c.modality,
        c.calling_ae_title,
        c.study_description,
        rule.destinations,
        rule.description,
    )


async def unknown_destinations(db: Executor, destinations: list[str]) -> list[str]:
    """The AE titles that are not registered nodes allowed to receive instances (``store``)."""
    known = await db.fetch(
        "SELECT ae_title FROM remote_node WHERE ae_title = ANY($1::text[]) AND 'store' = ANY(allowed_operations)",
        destinations,
    )
    found = {row["ae_title"] for row in known}
    return [ae for ae in destinations if ae not in found]


class RoutingRuleRepository:
    """``routing_rule`` over an asyncpg pool (or a connection)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def add(self, rule: RoutingRuleCreate) -> RoutingRule:
        try:
            row = await self._db.fetchrow(
                f"""
                INSERT INTO routing_rule (name, enabled, priority, modality, calling_ae_title,
                                          study_description_pattern, destinations, description)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                RETURNING {_COLUMNS}
                """,
                *_values(rule),
            )
        except asyncpg.UniqueViolationError:
            raise RuleExistsError(f"a routing rule named {rule.name!r} exists already") from None
        assert row is not None
        return _rule(row)

    async def get(self, rule_id: int) -> RoutingRule | None:
        row = await self._db.fetchrow(f"SELECT {_COLUMNS} FROM routing_rule WHERE id = $1", rule_id)
        return None if row is None else _rule(row)

    async def list(self, *, enabled_only: bool = False) -> list[RoutingRule]:
        """Every rule (or the enabled ones) in evaluation order."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM routing_rule WHERE enabled OR NOT $1 ORDER BY priority, id", enabled_only
        )
        return [_rule(row) for row in rows]

    async def replace(self, rule_id: int, rule: RoutingRuleCreate) -> RoutingRule | None:
        """The rule with its new content; None when there is no such rule."""
        try:
            row = await self._db.fetchrow(
                f"""
                UPDATE routing_rule
                SET name = $2, enabled = $3, priority = $4, modality = $5, calling_ae_title = $6,
                    study_description_pattern = $7, destinations = $8, description = $9, updated_at = now()
                WHERE id = $1
                RETURNING {_COLUMNS}
                """,
                rule_id,
                *_values(rule),
            )
        except asyncpg.UniqueViolationError:
            raise RuleExistsError(f"a routing rule named {rule.name!r} exists already") from None
        return None if row is None else _rule(row)

    async def remove(self, rule_id: int) -> bool:
        """Remove the rule; False when there was none."""
        result = await self._db.execute("DELETE FROM routing_rule WHERE id = $1", rule_id)
        return result != "DELETE 0"
