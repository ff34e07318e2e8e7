"""The prefetch loop of one replica: scan the worklist for items that call
for a prefetch (each becomes one job, whichever replica sees it first),
take over jobs whose replica died, and run queued jobs, several at once.

Nothing here is shared between replicas except through PostgreSQL; the
only local state is an event that wakes this replica's workers when its
own scan queued work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import timedelta
from typing import Final

import asyncpg
from prometheus_client import CollectorRegistry

from pacs_common.db.pool import is_connection_error
from pacs_common.resilience import Dependencies
from prefetch_scheduler.prefetch.dimse import DimseTimeouts, RemotePacs
from prefetch_scheduler.prefetch.metrics import PrefetchMetrics
from prefetch_scheduler.prefetch.repository import PrefetchRepository, TriggerWindow
from prefetch_scheduler.prefetch.runner import PrefetchRunner
from prefetch_scheduler.prefetch.settings import PrefetchSettings
from prefetch_scheduler.prefetch.throttle import RemoteThrottle

__all__ = ["run_prefetch"]

logger = logging.getLogger(__name__)

# On stop, the jobs in hand get this long to reach a point where they can be queued again.
_STOP_GRACE_SECONDS: Final = 30.0


async def _pause(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


class _Scheduler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: PrefetchSettings,
        metrics: PrefetchMetrics,
        breakers: Dependencies | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._repository = PrefetchRepository(pool)
        self._window = TriggerWindow(
            on_create=settings.on_create,
            created_within=timedelta(hours=settings.created_within_hours),
            lead_time=timedelta(hours=settings.lead_time_hours),
            past_grace=timedelta(hours=settings.past_grace_hours),
        )
        throttle = RemoteThrottle(
            pool,
            max_associations=settings.remote_max_associations,
            min_move_interval=settings.remote_min_move_interval_seconds,
        )
        remote = RemotePacs(
            settings.calling_ae,
            DimseTimeouts(
                connect=settings.connect_timeout_seconds,
                find=settings.find_timeout_seconds,
                move=settings.move_timeout_seconds,
            ),
            breakers=breakers,
        )
        self._runner = PrefetchRunner(pool, settings, remote, throttle, metrics, random.Random())
        self._work = asyncio.Event()

    async def scan(self) -> int:
        """Queue a job for each worklist item that calls for one; how many were queued."""
        queued = 0
        # Without a source to query, worklist items call for nothing (on-demand
        # jobs name their source).
        due = await self._repository.due_items(self._window) if self._settings.sources else []
        for item in due:
            job = await self._repository.request(item)
            if job is not None:
                queued += 1
                self._metrics.requests.labels(item.trigger).inc()
                logger.info(
                    "prefetch job %s queued for worklist item %s (%s), patient %s",
                    job.id,
                    item.pk,
                    item.trigger,
                    item.params.patient_id,
                )
        stale = await self._repository.requeue_stale(timedelta(seconds=self._settings.stale_after_seconds))
        if stale:
            logger.warning("prefetch jobs %s were abandoned by their scheduler; queued again", stale)
        return queued + len(stale)

    async def scan_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self.scan():
                    self._work.set()
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                logger.warning("prefetch: worklist scan failed, retrying: %s", exc)
            await _pause(stop, self._settings.poll_interval_seconds)

    async def worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                job = await self._repository.claim()
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                logger.warning("prefetch: could not take a job, retrying: %s", exc)
                job = None
            if job is None:
                self._work.clear()
                waker = asyncio.create_task(self._work.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait(
                    {waker, stopper},
                    timeout=self._settings.poll_interval_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waker.cancel()
                stopper.cancel()
                continue
            self._work.set()  # there may be more: let an idle sibling look
            try:
                await self._runner.run(job, stop)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                # Its state could not be written: it stays running until it is
                # stale, and then a replica takes it over.
                logger.warning("prefetch job %s: database unavailable while ending it: %s", job.id, exc)


async def run_prefetch(
    pool: asyncpg.Pool,
    settings: PrefetchSettings,
    registry: CollectorRegistry,
    stop: asyncio.Event,
    *,
    breakers: Dependencies | None = None,
) -> None:
    """Run the prefetch until ``stop`` is set; an unexpected error in the
    scan or a worker propagates (the process should exit, not limp on).
    ``breakers``: the per-remote-AE circuit breakers (and their metrics)."""
    scheduler = _Scheduler(pool, settings, PrefetchMetrics(registry), breakers)
    logger.info(
        "prefetch running",
        extra={
            "sources": settings.sources,
            "move_destination": settings.move_destination,
            "max_concurrent_jobs": settings.max_concurrent_jobs,
        },
    )
    tasks = [asyncio.create_task(scheduler.scan_loop(stop), name="prefetch-scan")]
    tasks += [
        asyncio.create_task(scheduler.worker(stop), name=f"prefetch-worker-{n}")
        for n in range(settings.max_concurrent_jobs)
    ]
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped and not stop.is_set():
                task.result()  # raises why it ended
                raise RuntimeError(f"{task.get_name()} ended unexpectedly")
        await asyncio.wait(tasks, timeout=_STOP_GRACE_SECONDS)
    finally:
        stopped.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
