"""The forwarding queue in PostgreSQL (``forward_item``) without a peer:
claims under lease shared by replicas, the per-destination bound that holds
across replicas, an expired claim taken over, cancelled and retried jobs,
the backoff."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pacs_common.jobs import JobKind, JobRepository, JobState
from prefetch_scheduler.forwarding.queue import ForwardQueue, ItemOutcome, ItemResult, RetryPolicy

POLICY = RetryPolicy(base_delay_seconds=0.0001, max_delay_seconds=0.001, max_attempts=3)


async def _items(pool: asyncpg.Pool, destination: str, count: int, *, job_id: int | None = None) -> list[int]:
    rows = await pool.fetch(
        """
        INSERT INTO forward_item (destination, study_instance_uid, sop_instance_uid, content_sha256, job_id)
        SELECT $1, '1.2.3', '1.2.3.' || $1 || '.' || n, repeat('0', 64), $3 FROM generate_series(1, $2) AS n
        RETURNING id
        """,
        destination,
        count,
        job_id,
    )
    return [row["id"] for row in rows]


def _queue(pool: asyncpg.Pool, *, lease: float = 60.0, concurrency: int = 1) -> ForwardQueue:
    return ForwardQueue(pool, lease_seconds=lease, concurrency_per_destination=concurrency)


async def test_a_destination_gets_at_most_its_associations_across_replicas(db_pool: asyncpg.Pool) -> None:
    await _items(db_pool, "A", 5)
    await _items(db_pool, "B", 1)
    replica1, replica2 = _queue(db_pool, concurrency=2), _queue(db_pool, concurrency=2)
    first = await replica1.claim("A", 2)
    second = await replica2.claim("A", 2)
    assert first is not None and second is not None
    assert {i.id for i in first.items}.isdisjoint({i.id for i in second.items})
    assert await replica1.claim("A", 2) is None  # two associations to A are open
    other = await replica2.claim("B", 2)  # another destination is not held up
    assert other is not None and len(other.items) == 1
    await replica1.finish(first, [ItemResult(i.id, ItemOutcome.SENT) for i in first.items], POLICY)
    third = await replica2.claim("A", 5)
    assert third is not None and len(third.items) == 1
    assert await db_pool.fetchval("SELECT count(*) FROM forward_item WHERE state = 'done'") == 2


async def test_concurrent_claims_never_share_an_item(db_pool: asyncpg.Pool) -> None:
    ids = await _items(db_pool, "A", 40)
    queue = _queue(db_pool, concurrency=64)
    claims = await asyncio.gather(*(queue.claim("A", 3) for _ in range(20)))
    claimed = [item.id for claim in claims if claim is not None for item in claim.items]
    assert len(claimed) == len(set(claimed)) <= len(ids)


async def test_an_expired_claim_is_taken_over_and_its_late_finish_changes_nothing(
    db_pool: asyncpg.Pool,
) -> None:
    [item] = await _items(db_pool, "A", 1)
    queue = _queue(db_pool, lease=0.2, concurrency=4)
    dead = await queue.claim("A", 10)
    assert dead is not None
    assert await queue.claim("A", 10) is None
    await asyncio.sleep(0.3)
    assert await queue.requeue_expired_claims() == 1
    alive = await queue.claim("A", 10)
    assert alive is not None and alive.token != dead.token
    assert alive.items[0].attempts == 2
    await queue.finish(dead, [ItemResult(item, ItemOutcome.FAILED, "late")], POLICY)
    assert await db_pool.fetchval("SELECT state FROM forward_item WHERE id = $1", item) == "sending"
    await queue.finish(alive, [ItemResult(item, ItemOutcome.SENT)], POLICY)
    assert await db_pool.fetchval("SELECT state FROM forward_item WHERE id = $1", item) == "done"


async def test_job_progress_failure_cancel_and_retry(db_pool: asyncpg.Pool) -> None:
    jobs = JobRepository(db_pool)
    job = await jobs.start(JobKind.FORWARD, {"destination": "A", "study_instance_uid": "1.2.3", "rule_id": 1})
    await _items(db_pool, "A", 3, job_id=job.id)
    queue = _queue(db_pool, concurrency=4)
    for attempt in range(1, POLICY.max_attempts + 1):
        await asyncio.sleep(0.01)
        claim = await queue.claim("A", 10)
        assert claim is not None and all(i.attempts == attempt for i in claim.items)
        sent = claim.items[:1] if attempt == 1 else []
        results = [ItemResult(i.id, ItemOutcome.SENT) for i in sent]
        results += [
            ItemResult(i.id, ItemOutcome.RETRY, "C-STORE status 0xA700") for i in claim.items[len(sent) :]
        ]
        await queue.finish(claim, results, POLICY)
        if attempt == 1:
            running = await jobs.get(job.id)
            assert running is not None
            assert (running.state, running.progress_done, running.progress_total) == (JobState.RUNNING, 1, 3)
    failed = await jobs.get(job.id)
    assert failed is not None
    assert (failed.state, failed.progress_done, failed.progress_total) == (JobState.FAILED, 1, 3)
    assert failed.error == "2 of 3 instances not delivered to A: C-STORE status 0xA700"

    # Retried by an operator: the failed items go out again from attempt zero.
    await jobs.retry(job.id)
    assert await queue.restart_retried_jobs() == [job.id]
    restarted = await jobs.get(job.id)
    assert restarted is not None and restarted.state == JobState.RUNNING
    assert (restarted.progress_done, restarted.progress_total) == (1, 3)
    states = await db_pool.fetch("SELECT state, attempts FROM forward_item ORDER BY id")
    assert [(r["state"], r["attempts"]) for r in states] == [("done", 1), ("queued", 0), ("queued", 0)]

    # Cancelled: what is still queued is not sent.
    await jobs.cancel(job.id)
    await queue.fail_cancelled()
    assert await queue.claim("A", 10) is None
    cancelled = await db_pool.fetch("SELECT last_error FROM forward_item WHERE state = 'failed'")
    assert [r["last_error"] for r in cancelled] == ["job cancelled", "job cancelled"]


@pytest.mark.parametrize("attempts", [1, 2, 5, 40])
def test_backoff_grows_exponentially_with_jitter_up_to_the_maximum(attempts: int) -> None:
    policy = RetryPolicy(base_delay_seconds=2.0, max_delay_seconds=60.0, max_attempts=10)
    ceiling = min(60.0, 2.0 * 2 ** (attempts - 1))
    delays = [policy.delay(attempts) for _ in range(50)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1
