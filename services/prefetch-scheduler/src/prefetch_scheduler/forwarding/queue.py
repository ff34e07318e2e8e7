"""The forwarding queue in PostgreSQL (``forward_item``, migration 0011).

Every replica works on the same rows; nothing is coordinated in memory:

* claiming takes a transaction-scoped advisory lock per destination, counts
  the claims of that destination still under lease (so at most
  ``concurrency_per_destination`` associations are open to it, whichever
  replicas hold them) and moves up to ``limit`` due rows to ``sending``
  under a fresh claim token (``FOR UPDATE SKIP LOCKED``);
* finishing updates only rows that still carry the claim's token (a claim
  whose lease expired and was taken over changes nothing);
* the forward jobs are locked (``FOR UPDATE``, in id order) before their
  progress is recounted, so the last transaction to touch a job's items
  sees all of them and ends the job.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final, TypeAlias

import asyncpg

from pacs_common.jobs import JobKind

__all__ = [
    "Claim",
    "ClaimedItem",
    "ForwardQueue",
    "ItemOutcome",
    "ItemResult",
    "RetryPolicy",
    "refresh_jobs",
]

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection, or the pool's proxy of one (generic in the stubs only).
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

_MAX_ERROR_LENGTH: Final = 1000


class ItemOutcome(StrEnum):
    SENT = "sent"
    WARNING = "warning"  # delivered, the peer answered with a warning status
    RETRY = "retry"  # failed this time: queued again (or failed once attempts are spent)
    FAILED = "failed"  # failed for good (e.g. the instance is gone from the index)


@dataclass(frozen=True)
class ItemResult:
    item_id: int
    outcome: ItemOutcome
    reason: str | None = None


@dataclass(frozen=True)
class ClaimedItem:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    attempts: int  # including this one
    job_id: int | None


@dataclass(frozen=True)
class Claim:
    token: uuid.UUID
    destination: str
    items: list[ClaimedItem]


@dataclass(frozen=True)
class RetryPolicy:
    base_delay_seconds: float
    max_delay_seconds: float
    max_attempts: int

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones: exponential, jittered."""
        exponent = min(max(attempts - 1, 0), 30)
        ceiling = min(self.max_delay_seconds, self.base_delay_seconds * 2**exponent)
        return float(ceiling * random.uniform(0.5, 1.0))


def _truncate(reason: str | None) -> str | None:
    if reason is None or len(reason) <= _MAX_ERROR_LENGTH:
        return reason
    return reason[:_MAX_ERROR_LENGTH] + "…"


async def refresh_jobs(connection: Connection, job_ids: Sequence[int | None]) -> None:
    """Recount the progress of these forward jobs from their items; a job
    with no live item left ends: done, or failed with the first reason.

    Call inside the transaction that changed the items.
    """
    ids = sorted({i for i in job_ids if i is not None})
    if not ids:
        return
    await connection.execute("SELECT id FROM job WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", ids)
    await connection.execute(
        """
        WITH counts AS (
            SELECT job_id,
                   count(*) AS total,
                   count(*) FILTER (WHERE state = 'done') AS done,
                   count(*) FILTER (WHERE state = 'failed') AS failed,
                   count(*) FILTER (WHERE state IN ('queued', 'sending')) AS live,
                   (array_agg(last_error ORDER BY finished_at, id) FILTER (WHERE state = 'failed'))[1]
                       AS first_error
            FROM forward_item WHERE job_id = ANY($1::bigint[]) GROUP BY job_id
        )
        UPDATE job j
        SET progress_done = c.done,
            progress_total = c.total,
            state = CASE WHEN c.live > 0 THEN j.state WHEN c.failed > 0 THEN 'failed' ELSE 'done' END,
            error = CASE
                WHEN c.live = 0 AND c.failed > 0 THEN
                    format('%s of %s instances not delivered to %s: %s',
                           c.failed, c.total, j.params ->> 'destination', coalesce(c.first_error, 'unknown'))
                ELSE j.error END,
            finished_at = CASE WHEN c.live = 0 THEN now() ELSE j.finished_at END,
            updated_at = now()
        FROM counts c
        WHERE j.id = c.job_id AND j.state = 'running' AND j.kind = $2
        """,
        ids,
        str(JobKind.FORWARD),
    )


class ForwardQueue:
    """``forward_item`` over a pool: what the senders do with it."""

    def __init__(self, pool: asyncpg.Pool, *, lease_seconds: float, concurrency_per_destination: int) -> None:
        self._pool = pool
        self._lease_seconds = lease_seconds
        self._concurrency = concurrency_per_destination

    async def due_destinations(self) -> list[str]:
        """Destinations with items due now, those waiting longest first."""
        rows = await self._pool.fetch(
            """
            SELECT destination FROM forward_item
            WHERE state = 'queued' AND next_attempt_at <= now()
            GROUP BY destination ORDER BY min(next_attempt_at), destination
            """
        )
        return [row["destination"] for row in rows]

    async def claim(self, destination: str, limit: int) -> Claim | None:
        """Up to ``limit`` due items of ``destination``, now ``sending`` under
        a new token; None when none are due or the destination has all the
        associations it may have."""
        token = uuid.uuid4()
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('pacs.forward:' || $1, 0))", destination
            )
            active = await connection.fetchval(
                """
                SELECT count(DISTINCT claim_token) FROM forward_item
                WHERE destination = $1 AND state = 'sending' AND lease_expires_at > now()
                """,
                destination,
            )
            if active >= self._concurrency:
                return None
            rows = await connection.fetch(
                """
                UPDATE forward_item f
                SET state = 'sending', attempts = f.attempts + 1, claim_token = $3,
                    lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
                WHERE f.id IN (
                    SELECT id FROM forward_item
                    WHERE destination = $1 AND state = 'queued' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at, id
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                RETURNING f.id, f.sop_instance_uid, f.study_instance_uid, f.attempts, f.job_id
                """,
                destination,
                limit,
                token,
                self._lease_seconds,
            )
        if not rows:
            return None
        items = [
            ClaimedItem(
                id=row["id"],
                sop_instance_uid=row["sop_instance_uid"],
                study_instance_uid=row["study_instance_uid"],
                attempts=row["attempts"],
                job_id=row["job_id"],
            )
            for row in sorted(rows, key=lambda r: r["id"])
        ]
        return Claim(token=token, destination=destination, items=items)

    async def finish(
        self, claim: Claim, results: Sequence[ItemResult], policy: RetryPolicy
    ) -> dict[int, str]:
        """Record what became of the claimed items (those without a result
        are retried); returns each item's new state."""
        by_id = {r.item_id: r for r in results}
        done_ids: list[int] = []
        done_notes: list[str | None] = []
        retry_ids: list[int] = []
        retry_delays: list[float] = []
        retry_reasons: list[str | None] = []
        failed_ids: list[int] = []
        failed_reasons: list[str | None] = []
        for item in claim.items:
            result = by_id.get(item.id) or ItemResult(item.id, ItemOutcome.RETRY, "not sent")
            if result.outcome in (ItemOutcome.SENT, ItemOutcome.WARNING):
                done_ids.append(item.id)
                done_notes.append(_truncate(result.reason))
            elif result.outcome is ItemOutcome.RETRY and item.attempts < policy.max_attempts:
                retry_ids.append(item.id)
                retry_delays.append(policy.delay(item.attempts))
                retry_reasons.append(_truncate(result.reason))
            else:
                failed_ids.append(item.id)
                failed_reasons.append(_truncate(result.reason))
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute(
                """
                UPDATE forward_item f
                SET state = 'done', last_error = u.note, finished_at = now(), claim_token = NULL,
                    lease_expires_at = NULL, updated_at = now()
                FROM unnest($1::bigint[], $2::text[]) AS u(id, note)
                WHERE f.id = u.id AND f.claim_token = $3
                """,
                done_ids,
                done_notes,
                claim.token,
            )
            await connection.execute(
                """
                UPDATE forward_item f
                SET state = 'queued', next_attempt_at = now() + make_interval(secs => u.delay),
                    last_error = u.reason, claim_token = NULL, lease_expires_at = NULL, updated_at = now()
                FROM unnest($1::bigint[], $2::float8[], $3::text[]) AS u(id, delay, reason)
                WHERE f.id = u.id AND f.claim_token = $4
                """,
                retry_ids,
                retry_delays,
                retry_reasons,
                claim.token,
            )
            await connection.execute(
                """
                UPDATE forward_item f
                SET state = 'failed', last_error = coalesce(u.reason, 'failed'), finished_at = now(),
                    claim_token = NULL, lease_expires_at = NULL, updated_at = now()
                FROM unnest($1::bigint[], $2::text[]) AS u(id, reason)
                WHERE f.id = u.id AND f.claim_token = $3
                """,
                failed_ids,
                failed_reasons,
                claim.token,
            )
            await refresh_jobs(connection, [item.job_id for item in claim.items])
        states = {i: "done" for i in done_ids}
        states.update({i: "queued" for i in retry_ids})
        states.update({i: "failed" for i in failed_ids})
        return states

    async def extend_lease(self, claim: Claim) -> None:
        """Keep a claim that is still being sent from expiring."""
        await self._pool.execute(
            """
            UPDATE forward_item SET lease_expires_at = now() + make_interval(secs => $2)
            WHERE claim_token = $1 AND state = 'sending'
            """,
            claim.token,
            self._lease_seconds,
        )

    @property
    def lease_seconds(self) -> float:
        return self._lease_seconds

    async def defer_destination(self, destination: str, seconds: float) -> None:
        """Hold back every queued item of ``destination`` for ``seconds``
        (it refused or did not answer an association): their attempts are
        not spent on a peer known to be down."""
        await self._pool.execute(
            """
            UPDATE forward_item SET next_attempt_at = greatest(next_attempt_at, now() + make_interval(secs => $2))
            WHERE destination = $1 AND state = 'queued'
            """,
            destination,
            seconds,
        )

    async def requeue_expired_claims(self) -> int:
        """Items whose claim's lease ran out (its replica died) → queued again."""
        result = await self._pool.execute(
            """
            UPDATE forward_item
            SET state = 'queued', claim_token = NULL, lease_expires_at = NULL, next_attempt_at = now(),
                last_error = coalesce(last_error, 'claim expired'), updated_at = now()
            WHERE state = 'sending' AND lease_expires_at <= now()
            """
        )
        return int(result.split()[-1])

    async def fail_cancelled(self) -> None:
        """Queued items of cancelled forward jobs → failed (not sent)."""
        await self._pool.execute(
            """
            UPDATE forward_item f
            SET state = 'failed', last_error = 'job cancelled', finished_at = now(), updated_at = now()
            FROM job j
            WHERE f.job_id = j.id AND j.state = 'cancelled' AND f.state = 'queued'
            """
        )

    async def restart_retried_jobs(self) -> list[int]:
        """Forward jobs an operator retried (``queued`` again): running, with
        their failed items queued again from attempt zero."""
        restarted: list[int] = []
        while True:
            async with self._pool.acquire() as connection, connection.transaction():
                job_id = await connection.fetchval(
                    """
                    UPDATE job SET state = 'running', attempts = attempts + 1, started_at = now(),
                                   updated_at = now()
                    WHERE id = (
                        SELECT id FROM job WHERE state = 'queued' AND kind = $1
                        ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
                    )
                    RETURNING id
                    """,
                    str(JobKind.FORWARD),
                )
                if job_id is None:
                    return restarted
                await connection.execute(
                    """
                    UPDATE forward_item f
                    SET state = 'queued', attempts = 0, next_attempt_at = now(), last_error = NULL,
                        finished_at = NULL, updated_at = now()
                    WHERE f.job_id = $1 AND f.state = 'failed' AND NOT EXISTS (
                        SELECT 1 FROM forward_item o
                        WHERE o.destination = f.destination AND o.sop_instance_uid = f.sop_instance_uid
                          AND o.state IN ('queued', 'sending')
                    )
                    """,
                    job_id,
                )
                await refresh_jobs(connection, [job_id])
                restarted.append(job_id)

    async def depths(self) -> dict[str, int]:
        """Queued or sending items per destination."""
        rows = await self._pool.fetch(
            """
            SELECT destination, count(*) AS depth FROM forward_item
            WHERE state IN ('queued', 'sending') GROUP BY destination
            """
        )
        return {row["destination"]: int(row["depth"]) for row in rows}

    async def purge_finished(self, older_than_seconds: float) -> int:
        result = await self._pool.execute(
            """
            DELETE FROM forward_item
            WHERE state IN ('done', 'failed') AND finished_at < now() - make_interval(secs => $1)
            """,
            older_than_seconds,
        )
        return int(result.split()[-1])
