"""The sending loop: claim due items per destination, send each claim over
one association in a worker thread, record the outcome.

Destinations are served independently: a destination that is down only
delays its own items (its claims fail fast, its queue is held back with
backoff), and at most ``max_associations`` claims are in flight in this
process.  Housekeeping runs every poll: expired claims are queued again,
items of cancelled jobs are failed, forward jobs an operator retried are
restarted, queue depths are published, and old finished items are purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Final

import asyncpg

from pacs_common.db.pool import is_connection_error
from pacs_common.nodes import Operation, RemoteNodeRepository
from pacs_common.resilience import CircuitOpenError, Dependencies, remote_ae_dependency
from prefetch_scheduler.forwarding.metrics import ForwardMetrics
from prefetch_scheduler.forwarding.queue import (
    Claim,
    ForwardQueue,
    ItemOutcome,
    ItemResult,
    RetryPolicy,
)
from prefetch_scheduler.forwarding.sender import AssociationFailedError, BatchSender, OutgoingInstance
from prefetch_scheduler.forwarding.settings import ForwardSettings

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)

_PURGE_EVERY_SECONDS: Final = 3600.0
_STOP_GRACE_SECONDS: Final = 30.0


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        queue: ForwardQueue,
        sender: BatchSender,
        settings: ForwardSettings,
        metrics: ForwardMetrics,
        *,
        breakers: Dependencies | None = None,
    ) -> None:
        self._pool = pool
        # One circuit breaker per destination AE: while it is open a claim
        # fails at once, as a refused association would, without dialling.
        self._breakers = breakers or Dependencies()
        self._queue = queue
        self._sender = sender
        self._settings = settings
        self._metrics = metrics
        self._policy = RetryPolicy(
            base_delay_seconds=settings.retry_base_delay_seconds,
            max_delay_seconds=settings.retry_max_delay_seconds,
            max_attempts=settings.max_attempts,
        )
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._seen_destinations: set[str] = set()
        self._last_purge = -_PURGE_EVERY_SECONDS

    @property
    def _total_in_flight(self) -> int:
        return sum(len(tasks) for tasks in self._in_flight.values())

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self._wake.clear()  # a batch ending from here on wakes the next round
                try:
                    await self._housekeeping()
                    await self._dispatch()
                except Exception as exc:
                    if not is_connection_error(exc):
                        logger.exception("forwarding dispatch failed")
                    else:
                        logger.warning("database unavailable for forwarding: %r", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.poll_interval_seconds):
                        waits = {asyncio.create_task(stop.wait()), asyncio.create_task(self._wake.wait())}
                        try:
                            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            for waiting in waits:
                                waiting.cancel()
        finally:
            tasks = [t for ts in self._in_flight.values() for t in ts]
            if tasks:
                logger.info("waiting for %d batches in flight", len(tasks))
                _, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE_SECONDS)
                for task in pending:  # their claims expire and are sent again
                    task.cancel()

    async def _dispatch(self) -> None:
        for destination in await self._queue.due_destinations():
            tasks = self._in_flight.setdefault(destination, set())
            while (
                len(tasks) < self._settings.concurrency_per_destination
                and self._total_in_flight < self._settings.max_associations
            ):
                claim = await self._queue.claim(destination, self._settings.batch_size)
                if claim is None:
                    break
                task = asyncio.create_task(self._process(claim), name=f"forward-{destination}")
                tasks.add(task)
                task.add_done_callback(functools.partial(self._done, destination))
            if self._total_in_flight >= self._settings.max_associations:
                return

    def _done(self, destination: str, task: asyncio.Task[None]) -> None:
        self._in_flight.get(destination, set()).discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("forwarding batch to %s crashed", destination, exc_info=task.exception())

    async def _housekeeping(self) -> None:
        expired = await self._queue.requeue_expired_claims()
        if expired:
            logger.warning("%d forward items had an expired claim: queued again", expired)
        await self._queue.fail_cancelled()
        restarted = await self._queue.restart_retried_jobs()
        if restarted:
            logger.info("forward jobs retried", extra={"jobs": restarted})
        depths = await self._queue.depths()
        self._seen_destinations.update(depths)
        for destination in self._seen_destinations:
            self._metrics.queue_depth.labels(destination).set(depths.get(destination, 0))
        now = time.monotonic()
        if now - self._last_purge >= _PURGE_EVERY_SECONDS:
            self._last_purge = now
            purged = await self._queue.purge_finished(self._settings.retention_days * 86400)
            if purged:
                logger.info("purged %d finished forward items", purged)

    async def _process(self, claim: Claim) -> None:
        destination = claim.destination
        deferred = False
        try:
            node = await RemoteNodeRepository(self._pool).get(destination)
            if node is None or not node.allows(Operation.STORE):
                reason = f"{destination} is not a registered node allowed to receive instances"
                results = [ItemResult(i.id, ItemOutcome.RETRY, reason) for i in claim.items]
            else:
                instances = await self._outgoing(claim)
                heartbeat = asyncio.create_task(self._keep_claim(claim))
                breaker = self._breakers.breaker(remote_ae_dependency(node.ae_title, node.host, node.port))
                try:
                    with breaker.attempt(AssociationFailedError):
                        results = await asyncio.to_thread(self._sender.send, node, instances)
                except (AssociationFailedError, CircuitOpenError) as exc:
                    logger.warning("forwarding to %s: %s", destination, exc)
                    self._metrics.association_failures.labels(destination).inc()
                    results = [ItemResult(i.id, ItemOutcome.RETRY, str(exc)) for i in claim.items]
                    deferred = True
                finally:
                    heartbeat.cancel()
        except Exception as exc:
            if is_connection_error(exc):
                logger.warning("forwarding to %s interrupted: %r (the claim will expire)", destination, exc)
                return
            logger.exception("forwarding to %s failed", destination)
            results = [ItemResult(i.id, ItemOutcome.RETRY, f"internal error: {exc!r}") for i in claim.items]
        states = await self._queue.finish(claim, results, self._policy)
        for result in results:
            state = states.get(result.item_id)
            if state == "done":
                outcome = "warning" if result.outcome is ItemOutcome.WARNING else "sent"
            elif state == "queued":
                outcome = "retry"
            elif state == "failed":
                outcome = "failed"
            else:
                continue  # the claim was taken over meanwhile
            self._metrics.instances.labels(destination, outcome).inc()
        if deferred:
            attempts = min(i.attempts for i in claim.items)
            await self._queue.defer_destination(destination, self._policy.delay(attempts))

    async def _keep_claim(self, claim: Claim) -> None:
        """Extend the claim's lease every third of it while the batch is sent."""
        while True:
            await asyncio.sleep(self._queue.lease_seconds / 3)
            try:
                await self._queue.extend_lease(claim)
            except Exception as exc:
                logger.warning("could not extend the claim on %s: %r", claim.destination, exc)

    async def _outgoing(self, claim: Claim) -> list[OutgoingInstance]:
        rows = await self._pool.fetch(
            """
            SELECT f.id, f.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.availability,
                   l.tier, l.key
            FROM forward_item f
            LEFT JOIN instance i ON i.sop_instance_uid = f.sop_instance_uid
            LEFT JOIN instance_location l ON l.instance_fk = i.pk
            WHERE f.id = ANY($1::bigint[])
            ORDER BY f.id
            """,
            [item.id for item in claim.items],
        )
        return [
            OutgoingInstance(
                item_id=row["id"],
                sop_instance_uid=row["sop_instance_uid"],
                sop_class_uid=row["sop_class_uid"],
                transfer_syntax_uid=row["transfer_syntax_uid"],
                availability=row["availability"],
                tier=row["tier"],
                key=row["key"],
            )
            for row in rows
        ]
