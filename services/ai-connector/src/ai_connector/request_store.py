"""The connector's side of ``ai_request``: creating requests for a stable
study, claiming due ones, and recording how an attempt ended.

Every transition is one conditional statement, so any number of replicas
share the table without other coordination:

* creation is ``INSERT … ON CONFLICT (rule_id, study_instance_uid) DO
  NOTHING`` — a redelivered event or a second replica creates nothing;
* claiming is ``FOR UPDATE SKIP LOCKED`` and sets a lease; a running request
  is taken over only after its lease expired (its replica died, or an
  asynchronous result never came);
* an attempt's outcome is written only while the request is still running
  that attempt (``state = 'running' AND attempts = n``), so a replica that
  lost its lease cannot overwrite the outcome of the one that took over.

The request's ``job`` row (``JobKind.AI``) follows: running at the first
claim, done or failed at the end.  An administrator cancelling the job stops
the request at its next claim; retrying a failed job queues the request
again with fresh attempts.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

import asyncpg

from pacs_common.ai import AiRule
from pacs_common.jobs import JobKind, JobRepository

__all__ = ["AsyncRequest", "ClaimedRequest", "RequestStore"]

_MAX_ERROR_LENGTH: Final = 4000


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_LENGTH else text[:_MAX_ERROR_LENGTH] + "…"


@dataclass(frozen=True)
class ClaimedRequest:
    """A request this replica now runs (attempt ``attempts``)."""

    id: int
    rule: AiRule
    study_instance_uid: str
    job_id: int | None
    job_state: str | None
    attempts: int
    series_instance_uids: list[str]
    callback_token: str
    # A running request whose lease expired: its previous attempt never ended.
    taken_over: bool

    @property
    def public_job_id(self) -> str:
        return str(self.job_id) if self.job_id is not None else f"request-{self.id}"


@dataclass(frozen=True)
class AsyncRequest:
    """A request waiting for its results at the callback."""

    id: int
    rule_name: str
    max_attempts: int
    endpoint_url: str
    study_instance_uid: str
    job_id: int | None
    attempts: int
    callback_token: str
    started_at: datetime | None


_RULE_COLUMNS: Final = (
    "ru.id AS rule__id, ru.name AS rule__name, ru.enabled AS rule__enabled, ru.modality AS rule__modality, "
    "ru.body_part_examined AS rule__body_part_examined, ru.sop_class_uid AS rule__sop_class_uid, "
    "ru.endpoint_url AS rule__endpoint_url, ru.timeout_seconds AS rule__timeout_seconds, "
    "ru.max_attempts AS rule__max_attempts, ru.headers AS rule__headers, ru.secret_ref AS rule__secret_ref, "
    "ru.description AS rule__description, ru.created_at AS rule__created_at, ru.updated_at AS rule__updated_at"
)


def _claimed(row: asyncpg.Record) -> ClaimedRequest:
    values: dict[str, Any] = dict(row)
    rule = AiRule.model_validate(
        {key.removeprefix("rule__"): value for key, value in values.items() if key.startswith("rule__")}
    )
    params = values["params"] or {}
    return ClaimedRequest(
        id=values["id"],
        rule=rule,
        study_instance_uid=values["study_instance_uid"],
        job_id=values["job_id"],
        job_state=values["job_state"],
        attempts=values["attempts"],
        series_instance_uids=list(params.get("series", [])),
        callback_token=str(params.get("callback_token", "")),
        taken_over=bool(values["taken_over"]),
    )


class RequestStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self, rule: AiRule, study_instance_uid: str, series_instance_uids: Sequence[str]
    ) -> int | None:
        """A queued request and its job, in one transaction; None when the
        rule already has a request for the study (nothing is changed)."""
        params = {"series": list(series_instance_uids), "callback_token": secrets.token_urlsafe(32)}
        async with self._pool.acquire() as connection, connection.transaction():
            request_id: int | None = await connection.fetchval(
                """
                INSERT INTO ai_request (rule_id, study_instance_uid, params)
                VALUES ($1, $2, $3)
                ON CONFLICT (rule_id, study_instance_uid) DO NOTHING
                RETURNING id
                """,
                rule.id,
                study_instance_uid,
                params,
            )
            if request_id is None:
                return None
            job = await JobRepository(cast(asyncpg.Connection, connection)).create(
                JobKind.AI,
                {
                    "ai_request_id": request_id,
                    "rule": rule.name,
                    "rule_id": rule.id,
                    "study_instance_uid": study_instance_uid,
                    "endpoint_url": rule.endpoint_url,
                },
                created_by="ai-connector",
            )
            await connection.execute("UPDATE ai_request SET job_id = $2 WHERE id = $1", request_id, job.id)
        return request_id

    async def claim(self, lease_margin_seconds: float) -> ClaimedRequest | None:
        """The next due request, now running (attempt + 1) under a lease.

        Only active requests are looked at (a small partial index), however
        many finished ones the table holds."""
        row = await self._pool.fetchrow(
            f"""
            WITH due AS (
                SELECT r.id, r.state AS previous_state
                FROM ai_request r
                WHERE r.state IN ('queued', 'running')
                  AND ((r.state = 'queued' AND r.next_attempt_at <= now())
                       OR (r.state = 'running' AND r.lease_expires_at < now()))
                ORDER BY r.next_attempt_at, r.id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE ai_request r
                SET state = 'running',
                    attempts = r.attempts + 1,
                    lease_expires_at = now() + make_interval(secs => ru.timeout_seconds + $1),
                    started_at = coalesce(r.started_at, now()),
                    updated_at = now()
                FROM due, ai_rule ru
                WHERE r.id = due.id AND ru.id = r.rule_id
                RETURNING r.*, due.previous_state = 'running' AS taken_over
            )
            SELECT c.id, c.study_instance_uid, c.job_id, c.attempts, c.params, c.taken_over,
                   j.state AS job_state, {_RULE_COLUMNS}
            FROM claimed c JOIN ai_rule ru ON ru.id = c.rule_id LEFT JOIN job j ON j.id = c.job_id
            """,
            lease_margin_seconds,
        )
        return None if row is None else _claimed(row)

    async def requeue_retried(self) -> int:
        """Failed requests whose job an administrator retried (the job is
        queued again) → queued, due now, with fresh attempts; how many."""
        result = await self._pool.execute(
            """
            UPDATE ai_request r
            SET state = 'queued', attempts = 0, next_attempt_at = now(), lease_expires_at = NULL, error = NULL,
                result_sop_instance_uids = '{}', finished_at = NULL, updated_at = now()
            FROM job j
            WHERE j.id = r.job_id AND j.kind = 'ai' AND j.state = 'queued' AND r.state = 'failed'
            """
        )
        return int(result.split()[-1])

    async def start_job(self, job_id: int) -> None:
        """The request's job → running (the first attempt; retried jobs too)."""
        await self._pool.execute(
            """
            UPDATE job SET state = 'running', attempts = attempts + 1, started_at = coalesce(started_at, now()),
                           finished_at = NULL, error = NULL, updated_at = now()
            WHERE id = $1 AND state = 'queued'
            """,
            job_id,
        )

    async def release(self, request_id: int, attempt: int) -> bool:
        """Hand an interrupted attempt back: queued and due now, the attempt
        not counted (the connector stopped; the endpoint's answer was never read)."""
        result = await self._pool.execute(
            """
            UPDATE ai_request
            SET state = 'queued', attempts = attempts - 1, lease_expires_at = NULL, next_attempt_at = now(),
                updated_at = now()
            WHERE id = $1 AND state = 'running' AND attempts = $2
            """,
            request_id,
            attempt,
        )
        return result != "UPDATE 0"

    async def extend_lease(self, request: ClaimedRequest, seconds: float) -> bool:
        """Keep the running attempt ours for ``seconds`` more (waiting for a callback)."""
        result = await self._pool.execute(
            """
            UPDATE ai_request SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
            WHERE id = $1 AND state = 'running' AND attempts = $2
            """,
            request.id,
            request.attempts,
            seconds,
        )
        return result != "UPDATE 0"

    async def succeed(self, request_id: int, attempt: int, result_uids: Sequence[str]) -> bool:
        """Attempt ``attempt`` succeeded; False when it was no longer ours."""
        async with self._pool.acquire() as connection, connection.transaction():
            job_id = await connection.fetchval(
                """
                UPDATE ai_request
                SET state = 'succeeded', result_sop_instance_uids = $3, error = NULL, lease_expires_at = NULL,
                    finished_at = now(), updated_at = now()
                WHERE id = $1 AND state = 'running' AND attempts = $2
                RETURNING coalesce(job_id, 0)
                """,
                request_id,
                attempt,
                list(result_uids),
            )
            if job_id is None:
                return False
            await connection.execute(
                """
                UPDATE job SET state = 'done', progress_done = 1, progress_total = 1, error = NULL,
                               finished_at = now(), updated_at = now()
                WHERE id = $1 AND state IN ('queued', 'running')
                """,
                job_id,
            )
        return True

    async def retry_later(self, request_id: int, attempt: int, error: str, delay_seconds: float) -> bool:
        """Attempt ``attempt`` failed; the request is due again after ``delay_seconds``."""
        async with self._pool.acquire() as connection, connection.transaction():
            job_id = await connection.fetchval(
                """
                UPDATE ai_request
                SET state = 'queued', error = $3, lease_expires_at = NULL,
                    next_attempt_at = now() + make_interval(secs => $4), updated_at = now()
                WHERE id = $1 AND state = 'running' AND attempts = $2
                RETURNING coalesce(job_id, 0)
                """,
                request_id,
                attempt,
                _truncate(error),
                delay_seconds,
            )
            if job_id is None:
                return False
            await connection.execute(
                "UPDATE job SET error = $2, updated_at = now() WHERE id = $1 AND state = 'running'",
                job_id,
                _truncate(f"attempt {attempt} failed, retrying: {error}"),
            )
        return True

    async def fail(self, request_id: int, attempt: int, error: str) -> bool:
        """The request failed for good (attempts spent, or a permanent error)."""
        async with self._pool.acquire() as connection, connection.transaction():
            job_id = await connection.fetchval(
                """
                UPDATE ai_request
                SET state = 'failed', error = $3, lease_expires_at = NULL, finished_at = now(), updated_at = now()
                WHERE id = $1 AND state = 'running' AND attempts = $2
                RETURNING coalesce(job_id, 0)
                """,
                request_id,
                attempt,
                _truncate(error),
            )
            if job_id is None:
                return False
            await connection.execute(
                """
                UPDATE job SET state = 'failed', error = $2, finished_at = now(), updated_at = now()
                WHERE id = $1 AND state IN ('queued', 'running')
                """,
                job_id,
                _truncate(error),
            )
        return True

    async def job_cancelled(self, job_id: int | None) -> bool:
        if job_id is None:
            return False
        state: str | None = await self._pool.fetchval("SELECT state FROM job WHERE id = $1", job_id)
        return state == "cancelled"

    async def waiting_for_callback(self, job_id: int) -> AsyncRequest | None:
        """The running request of ``job_id`` (the target of a callback)."""
        row = await self._pool.fetchrow(
            """
            SELECT r.id, ru.name AS rule_name, ru.max_attempts, ru.endpoint_url, r.study_instance_uid, r.job_id,
                   r.attempts, r.params, r.updated_at AS started_at
            FROM ai_request r JOIN ai_rule ru ON ru.id = r.rule_id
            WHERE r.job_id = $1 AND r.state = 'running'
            """,
            job_id,
        )
        if row is None:
            return None
        return AsyncRequest(
            id=row["id"],
            rule_name=row["rule_name"],
            max_attempts=row["max_attempts"],
            endpoint_url=row["endpoint_url"],
            study_instance_uid=row["study_instance_uid"],
            job_id=row["job_id"],
            attempts=row["attempts"],
            callback_token=str((row["params"] or {}).get("callback_token", "")),
            started_at=row["started_at"],
        )
