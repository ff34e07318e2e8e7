"""One replica's task loop: claim a due task, run it while renewing its
lease, record how it ended; when nothing is due, wait a poll interval.

Replicas coordinate only through ``scheduled_task`` (see
:mod:`pacs_common.tasks.repository`): a task is claimed by one replica at a
time, and its next occurrence is set when it is claimed, so no other
replica runs it again.  When the service stops, the running task finishes
its current batch, its run is recorded as ``interrupted`` and the task is
made due again, so the next replica to look (or this one after a restart)
runs it again — the integrity check from its saved cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import asyncpg

from pacs_common.audit import AuditLog
from pacs_common.db.pool import is_connection_error
from pacs_common.storage import StorageRegistry
from pacs_common.tasks import Claim, RunStatus, TaskKind, TaskRepository
from prefetch_scheduler.tasks.context import RunContext, Runner, RunResult
from prefetch_scheduler.tasks.integrity import run_integrity
from prefetch_scheduler.tasks.metrics import TaskMetrics
from prefetch_scheduler.tasks.orphans import run_orphans
from prefetch_scheduler.tasks.retention import run_retention
from prefetch_scheduler.tasks.settings import TaskSchedulerSettings

__all__ = ["RUNNERS", "TaskScheduler"]

logger = logging.getLogger(__name__)

RUNNERS: Final[dict[TaskKind, Runner]] = {
    TaskKind.RETENTION: run_retention,
    TaskKind.INTEGRITY: run_integrity,
    TaskKind.ORPHANS: run_orphans,
}


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)


class TaskScheduler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        storage: StorageRegistry,
        *,
        audit: AuditLog,
        metrics: TaskMetrics,
        settings: TaskSchedulerSettings,
        runner_id: str,
    ) -> None:
        self._pool = pool
        self._storage = storage
        self._audit = audit
        self._metrics = metrics
        self._settings = settings
        self._runner_id = runner_id
        self._tasks = TaskRepository(pool)

    async def run(self, stop: asyncio.Event) -> None:
        logger.info("task scheduler started", extra={"runner_id": self._runner_id})
        while not stop.is_set():
            try:
                await self._tasks.schedule_unscheduled()
                claim = await self._tasks.claim(self._runner_id, self._settings.lease_seconds)
            except Exception as exc:
                # Never take the process down for it: log, look again later.
                if is_connection_error(exc):
                    logger.warning("task scheduler: database unreachable: %s", exc)
                else:
                    logger.exception("task scheduler: looking for due tasks failed")
                await _wait(stop, self._settings.poll_interval_seconds)
                continue
            if claim is None:
                await _wait(stop, self._settings.poll_interval_seconds)
                continue
            await self.execute(claim, stop)
        logger.info("task scheduler stopped", extra={"runner_id": self._runner_id})

    async def execute(self, claim: Claim, stop: asyncio.Event) -> None:
        """Run a claimed task to its end (or to the end of its current batch
        once ``stop`` is set) and record the run."""
        task = claim.task
        lost = asyncio.Event()
        finished = asyncio.Event()

        async def save_state(new_state: dict[str, Any]) -> None:
            if not await self._tasks.save_state(task.id, self._runner_id, new_state):
                lost.set()

        context = RunContext(
            pool=self._pool,
            storage=self._storage,
            audit=self._audit,
            metrics=self._metrics,
            task=task,
            state=dict(claim.state),
            should_stop=lambda: stop.is_set() or lost.is_set(),
            save_state=save_state,
        )
        renewer = asyncio.create_task(self._renew(claim, lost, finished), name=f"lease:{task.name}")
        logger.info(
            "task run started",
            extra={
                "task": task.name,
                "kind": str(task.kind),
                "run_id": claim.run.id,
                "trigger": claim.run.trigger,
            },
        )
        started = time.monotonic()
        status, summary, error = RunStatus.FAILED, {}, None
        try:
            result: RunResult = await RUNNERS[task.kind](context)
            summary = result.summary
            if result.completed:
                status = RunStatus.SUCCEEDED
            else:
                status = RunStatus.INTERRUPTED
                error = "lease lost" if lost.is_set() else "the scheduler stopped"
        except asyncio.CancelledError:
            status, error = RunStatus.INTERRUPTED, "the scheduler was cancelled"
            await self._record(claim, status, summary, error)
            raise
        except Exception as exc:
            status, error = RunStatus.FAILED, f"{type(exc).__name__}: {exc}"
            logger.exception("task run failed", extra={"task": task.name, "run_id": claim.run.id})
        finally:
            finished.set()
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            elapsed = time.monotonic() - started
            self._metrics.duration.labels(task=task.name).observe(elapsed)
            self._metrics.runs.labels(task=task.name, status=str(status)).inc()
        await self._record(claim, status, summary, error)
        if status is RunStatus.SUCCEEDED:
            self._metrics.last_success.labels(task=task.name).set_to_current_time()
        logger.info(
            "task run ended",
            extra={"task": task.name, "run_id": claim.run.id, "status": str(status), "error": error},
        )

    async def _record(
        self, claim: Claim, status: RunStatus, summary: dict[str, Any], error: str | None
    ) -> None:
        try:
            await self._tasks.finish(
                claim,
                self._runner_id,
                status,
                summary=summary,
                error=error,
                run_again_now=status is RunStatus.INTERRUPTED,
            )
        except Exception as exc:  # the lease expires; the next claim records the run as interrupted
            logger.error(
                "task run not recorded: %s", exc, extra={"task": claim.task.name, "run_id": claim.run.id}
            )

    async def _renew(self, claim: Claim, lost: asyncio.Event, finished: asyncio.Event) -> None:
        every = self._settings.lease_seconds / 3
        while not finished.is_set():
            await _wait(finished, every)
            if finished.is_set():
                return
            try:
                if not await self._tasks.renew(claim.task.id, self._runner_id, self._settings.lease_seconds):
                    logger.error("task lease lost to another replica", extra={"task": claim.task.name})
                    lost.set()
                    return
            except Exception as exc:
                logger.warning("task lease not renewed: %s", exc, extra={"task": claim.task.name})
