"""``ai_rule`` and ``ai_request`` over asyncpg: what the REST API and the
connector share (the connector's state transitions live in the connector)."""

from __future__ import annotations

from typing import Any, Final

import asyncpg

from pacs_common.ai.models import AiRequest, AiRequestState, AiRule, AiRuleCreate

__all__ = ["AiRequestRepository", "AiRuleExistsError", "AiRuleRepository"]

Executor = asyncpg.Pool | asyncpg.Connection

_RULE_COLUMNS: Final = (
    "id, name, enabled, modality, body_part_examined, sop_class_uid, endpoint_url, timeout_seconds, "
    "max_attempts, headers, secret_ref, description, created_at, updated_at"
)
REQUEST_COLUMNS: Final = (
    "r.id, r.rule_id, ru.name AS rule_name, r.study_instance_uid, r.job_id, r.state, r.attempts, "
    "r.next_attempt_at, r.error, r.params, r.result_sop_instance_uids, r.created_at, r.updated_at, "
    "r.started_at, r.finished_at"
)
REQUEST_FROM: Final = "ai_request r JOIN ai_rule ru ON ru.id = r.rule_id"


class AiRuleExistsError(Exception):
    """A rule with this name exists already."""


def _rule(row: asyncpg.Record) -> AiRule:
    return AiRule.model_validate(dict(row))


def request_from_row(row: asyncpg.Record) -> AiRequest:
    values: dict[str, Any] = dict(row)
    params = values.pop("params") or {}
    values["series_instance_uids"] = list(params.get("series", []))
    return AiRequest.model_validate(values)


def _values(rule: AiRuleCreate) -> tuple[Any, ...]:
    return (
        rule.name,
        rule.enabled,
        rule.modality,
        rule.body_part_examined,
        rule.sop_class_uid,
        rule.endpoint_url,
        rule.timeout_seconds,
        rule.max_attempts,
        rule.headers,
        rule.secret_ref,
        rule.description,
    )


class AiRuleRepository:
    """``ai_rule`` over an asyncpg pool (or a connection)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def add(self, rule: AiRuleCreate) -> AiRule:
        try:
            row = await self._db.fetchrow(
                f"""
                INSERT INTO ai_rule (name, enabled, modality, body_part_examined, sop_class_uid,
                                     endpoint_url, timeout_seconds, max_attempts, headers, secret_ref,
                                     description)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                RETURNING {_RULE_COLUMNS}
                """,
                *_values(rule),
            )
        except asyncpg.UniqueViolationError:
            raise AiRuleExistsError(f"an AI rule named {rule.name!r} exists already") from None
        assert row is not None
        return _rule(row)

    async def get(self, rule_id: int) -> AiRule | None:
        row = await self._db.fetchrow(f"SELECT {_RULE_COLUMNS} FROM ai_rule WHERE id = $1", rule_id)
        return None if row is None else _rule(row)

    async def list(self, *, enabled_only: bool = False) -> list[AiRule]:
        rows = await self._db.fetch(
            f"SELECT {_RULE_COLUMNS} FROM ai_rule WHERE enabled OR NOT $1 ORDER BY id", enabled_only
        )
        return [_rule(row) for row in rows]

    async def replace(self, rule_id: int, rule: AiRuleCreate) -> AiRule | None:
        """The rule with its new content; None when there is no such rule."""
        try:
            row = await self._db.fetchrow(
                f"""
                UPDATE ai_rule
                SET name = $2, enabled = $3, modality = $4, body_part_examined = $5, sop_class_uid = $6,
                    endpoint_url = $7, timeout_seconds = $8, max_attempts = $9, headers = $10,
                    secret_ref = $11, description = $12, updated_at = now()
                WHERE id = $1
                RETURNING {_RULE_COLUMNS}
                """,
                rule_id,
                *_values(rule),
            )
        except asyncpg.UniqueViolationError:
            raise AiRuleExistsError(f"an AI rule named {rule.name!r} exists already") from None
        return None if row is None else _rule(row)

    async def remove(self, rule_id: int) -> bool:
        """Remove the rule and its requests; False when there was none."""
        result = await self._db.execute("DELETE FROM ai_rule WHERE id = $1", rule_id)
        return result != "DELETE 0"


class AiRequestRepository:
    """Reading ``ai_request`` (the REST API's list and detail)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def get(self, request_id: int) -> AiRequest | None:
        row = await self._db.fetchrow(
            f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.id = $1", request_id
        )
        return None if row is None else request_from_row(row)

    async def list(
        self,
        *,
        states: frozenset[AiRequestState] | None = None,
        rule_id: int | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[AiRequest]]:
        """(how many match, this page of them, newest first)."""
        where = (
            "WHERE ($1::text[] IS NULL OR r.state = ANY($1)) AND ($2::bigint IS NULL OR r.rule_id = $2) "
            "AND ($3::text IS NULL OR r.study_instance_uid = $3)"
        )
        filters = (
            None if states is None else sorted(str(s) for s in states),
            rule_id,
            study_instance_uid,
        )
        total: int = await self._db.fetchval(f"SELECT count(*) FROM {REQUEST_FROM} {where}", *filters)
        rows = await self._db.fetch(
            f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} {where} "
            "ORDER BY r.created_at DESC, r.id DESC LIMIT $4 OFFSET $5",
            *filters,
            limit,
            offset,
        )
        return total, [request_from_row(row) for row in rows]
