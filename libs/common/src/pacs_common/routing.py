"""Routing rules: where received instances are forwarded (``routing_rule``,
migrations 0005 and 0011).

A rule has a trigger, a condition and destinations:

* the trigger is the event it reacts to: ``instance.stored`` (each instance
  once it is indexed; the default) or ``study.stable`` (a study that
  received nothing for the quiet period);
* the condition: modality, calling AE title, SOP Class UID, Body Part
  Examined (case-insensitive) and a Study Description pattern with DICOM
  wildcards ``*`` and ``?`` (case-insensitive); an absent part matches
  anything.  An ``instance.stored`` rule forwards the instance when it meets
  the condition; a ``study.stable`` rule forwards the whole study when any of
  its instances meets it;
* destinations: AE titles of the remote-node registry that may receive
  instances (``store``).

Enabled rules are evaluated by ascending ``priority``; every matching rule
forwards (an instance goes to each destination once).  The API edits the
rules; the forwarder (prefetch-scheduler) reads them
(:meth:`RoutingRuleRepository.list` with ``enabled_only`` and ``trigger``)
and asks :meth:`RoutingRule.matches`.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DestinationQueue",
    "RoutingCondition",
    "RoutingRule",
    "RoutingRuleCreate",
    "RoutingRuleRepository",
    "RoutingTrigger",
    "RuleExistsError",
    "forwarding_queues",
    "unknown_destinations",
]

_AE_TITLE: Final = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII but backslash
_UID: Final = r"^[0-9]+(\.[0-9]+)*$"


class RoutingTrigger(StrEnum):
    """The event a rule reacts to (the routing key of the events exchange)."""

    INSTANCE_STORED = "instance.stored"
    STUDY_STABLE = "study.stable"


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
    sop_class_uid: str | None = Field(default=None, max_length=64, pattern=_UID)
    # Code String: compared upper-case, spaces around it do not count.
    body_part_examined: str | None = Field(default=None, pattern=r"^ *[A-Za-z0-9_][A-Za-z0-9_ ]{0,15}$")

    @field_validator("calling_ae_title")
    @classmethod
    def _valid_calling_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @field_validator("body_part_examined")
    @classmethod
    def _upper_body_part(cls, value: str | None) -> str | None:
        return None if value is None else value.strip().upper()


class RoutingRuleCreate(BaseModel):
    """A rule to add, or the new content of one (PUT replaces it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    enabled: bool = True
    trigger: RoutingTrigger = RoutingTrigger.INSTANCE_STORED
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
        self,
        *,
        modality: str | None,
        calling_ae_title: str | None,
        study_description: str | None,
        sop_class_uid: str | None = None,
        body_part_examined: str | None = None,
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
        if condition.sop_class_uid is not None and condition.sop_class_uid != (sop_class_uid or "").strip():
            return False
        if (
            condition.body_part_examined is not None
            and condition.body_part_examined != (body_part_examined or "").strip().upper()
        ):
            return False
        if condition.study_description is not None:
            return _wildcard(condition.study_description).fullmatch(study_description or "") is not None
        return True


class DestinationQueue(BaseModel):
    """The forwarding queue of one destination (``forward_item``, migration 0011)."""

    model_config = ConfigDict(frozen=True)

    destination: str
    queued: int
    sending: int
    done: int
    failed: int
    # When the next queued instance is due (None: nothing queued).
    next_attempt_at: datetime | None
    # The latest reason an instance queued again or failed.
    last_error: str | None


class RuleExistsError(Exception):
    """A rule with this name exists already."""


_COLUMNS: Final = (
    "id, name, enabled, trigger, priority, modality, calling_ae_title, study_description_pattern, "
    "sop_class_uid, body_part_examined, destinations, description, created_at, updated_at"
)

Executor = asyncpg.Pool | asyncpg.Connection


def _rule(row: asyncpg.Record) -> RoutingRule:
    values: dict[str, Any] = dict(row)
    values["condition"] = RoutingCondition(
        modality=values.pop("modality"),
        calling_ae_title=values.pop("calling_ae_title"),
        study_description=values.pop("study_description_pattern"),
        sop_class_uid=values.pop("sop_class_uid"),
        body_part_examined=values.pop("body_part_examined"),
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
        str(rule.trigger),
        c.sop_class_uid,
        c.body_part_examined,
    )


async def unknown_destinations(db: Executor, destinations: list[str]) -> list[str]:
    """The AE titles that are not registered nodes allowed to receive instances (``store``)."""
    known = await db.fetch(
        "SELECT ae_title FROM remote_node WHERE ae_title = ANY($1::text[]) AND 'store' = ANY(allowed_operations)",
        destinations,
    )
    found = {row["ae_title"] for row in known}
    return [ae for ae in destinations if ae not in found]


async def forwarding_queues(db: Executor) -> list[DestinationQueue]:
    """Per destination: how many instances are queued, being sent, sent and failed."""
    rows = await db.fetch(
        """
        SELECT destination,
               count(*) FILTER (WHERE state = 'queued') AS queued,
               count(*) FILTER (WHERE state = 'sending') AS sending,
               count(*) FILTER (WHERE state = 'done') AS done,
               count(*) FILTER (WHERE state = 'failed') AS failed,
               min(next_attempt_at) FILTER (WHERE state = 'queued') AS next_attempt_at,
               (array_agg(last_error ORDER BY updated_at DESC, id DESC)
                   FILTER (WHERE state IN ('queued', 'failed') AND last_error IS NOT NULL))[1] AS last_error
        FROM forward_item GROUP BY destination ORDER BY destination
        """
    )
    return [DestinationQueue.model_validate(dict(row)) for row in rows]


class RoutingRuleRepository:
    """``routing_rule`` over an asyncpg pool (or a connection)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def add(self, rule: RoutingRuleCreate) -> RoutingRule:
        try:
            row = await self._db.fetchrow(
                f"""
                INSERT INTO routing_rule (name, enabled, priority, modality, calling_ae_title,
                                          study_description_pattern, destinations, description,
                                          trigger, sop_class_uid, body_part_examined)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
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

    async def list(
        self, *, enabled_only: bool = False, trigger: RoutingTrigger | None = None
    ) -> list[RoutingRule]:
        """Every rule (or the enabled ones; or those of one trigger) in evaluation order."""
        rows = await self._db.fetch(
            f"""
            SELECT {_COLUMNS} FROM routing_rule
            WHERE (enabled OR NOT $1) AND ($2::text IS NULL OR trigger = $2)
            ORDER BY priority, id
            """,
            enabled_only,
            None if trigger is None else str(trigger),
        )
        return [_rule(row) for row in rows]

    async def replace(self, rule_id: int, rule: RoutingRuleCreate) -> RoutingRule | None:
        """The rule with its new content; None when there is no such rule."""
        try:
            row = await self._db.fetchrow(
                f"""
                UPDATE routing_rule
                SET name = $2, enabled = $3, priority = $4, modality = $5, calling_ae_title = $6,
                    study_description_pattern = $7, destinations = $8, description = $9, trigger = $10,
                    sop_class_uid = $11, body_part_examined = $12, updated_at = now()
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
