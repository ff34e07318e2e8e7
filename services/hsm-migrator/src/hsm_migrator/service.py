"""The migrator's loop: queued migration jobs, the policy pass every
interval, restores of archived objects, tier statistics.

Every replica runs the same loop; PostgreSQL is the only coordination
(jobs are claimed with SKIP LOCKED, moves are leased, restore jobs are
claimed by the restore processor the same way), so any number of
replicas may run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import asyncpg
from pydantic import ValidationError

from hsm_migrator.metrics import HsmMetrics
from hsm_migrator.runner import PassResult, Runner
from pacs_common.hsm.jobs import MigrationJobParams
from pacs_common.hsm.policy import Selection, selections_for_rules
from pacs_common.hsm.settings import HsmSettings
from pacs_common.hsm.tiers import tier_statistics
from pacs_common.jobs import Job, JobKind, JobRepository, JobStateError
from pacs_common.storage import StorageRegistry

__all__ = ["HsmService", "RestoreRunner", "selections_for_job"]

logger = logging.getLogger(__name__)

_ERROR_BACKOFF_SECONDS = 5.0


class RestoreRunner(Protocol):
    """``pacs_common.archive.restore.RestoreProcessor``: progresses restore jobs."""

    async def run_once(self) -> int: ...


def selections_for_job(
    params: MigrationJobParams, settings: HsmSettings, configured: tuple[str, ...]
) -> list[Selection]:
    """What a migration job moves (see :mod:`pacs_common.hsm.jobs`); "from
    any tier" means any ``configured`` tier (an instance the index puts in a
    tier this deployment no longer has cannot be read, so is not moved)."""
    uids = params.study_instance_uids
    if params.to_tier is not None:
        if params.from_tier is not None:
            from_tiers: tuple[str, ...] = (params.from_tier,)
        else:
            from_tiers = tuple(tier for tier in configured if tier != params.to_tier)
        return [Selection(to_tier=params.to_tier, from_tiers=from_tiers).restricted_to(uids)]
    selections = selections_for_rules(settings.rules, from_tier=params.from_tier)
    if not selections:
        raise ValueError(
            "no policy rule applies"
            + (f" to tier {params.from_tier}" if params.from_tier else "")
            + ": give to_tier, or configure PACS_HSM_RULES"
        )
    return [selection.restricted_to(uids) for selection in selections]


class HsmService:
    """One replica's loop over a pool, the storage tiers and the settings."""

    def __init__(
        self,
        settings: HsmSettings,
        pool: asyncpg.Pool,
        storage: StorageRegistry,
        runner: Runner,
        metrics: HsmMetrics,
        *,
        restore: RestoreRunner | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._storage = storage
        self._runner = runner
        self._metrics = metrics
        self._restore = restore
        self._jobs = JobRepository(pool)
        self._policy = selections_for_rules(settings.rules)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: jobs as they come, the policy every interval."""
        next_policy = time.monotonic()
        while not stop.is_set():
            try:
                await self.run_queued_jobs(stop)
                if self._restore is not None:
                    self._metrics.restores.inc(await self._restore.run_once())
                if time.monotonic() >= next_policy and not stop.is_set():
                    next_policy = time.monotonic() + self._settings.interval_seconds
                    await self.policy_pass(stop)
                    await self.refresh_statistics()
                wait = min(self._settings.job_poll_seconds, max(0.0, next_policy - time.monotonic()))
            except Exception:
                logger.exception("migration loop failed; trying again")
                wait = _ERROR_BACKOFF_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def policy_pass(self, stop: asyncio.Event | None = None) -> PassResult | None:
        """Apply the configured rules once (and finish interrupted moves)."""
        if not self._policy:
            await self._runner.recover(stop=stop)
            return None
        return await self._runner.run_pass(self._policy, trigger="policy", stop=stop)

    async def refresh_statistics(self) -> None:
        self._metrics.record_tiers(await tier_statistics(self._pool, self._storage.names))

    async def run_queued_jobs(self, stop: asyncio.Event | None = None) -> int:
        """Run migration jobs until none is queued; how many ran."""
        await self._requeue_stale_jobs()
        ran = 0
        while stop is None or not stop.is_set():
            job = await self._jobs.claim(frozenset({JobKind.MIGRATION}))
            if job is None:
                break
            ran += 1
            await self.run_job(job, stop)
        if ran:
            await self.refresh_statistics()
        return ran

    async def run_job(self, job: Job, stop: asyncio.Event | None = None) -> None:
        """Run a claimed (running) migration job to its end."""
        try:
            params = MigrationJobParams.model_validate(job.params)
            params.check_tiers(self._storage.names)
            selections = selections_for_job(params, self._settings, self._storage.names)
        except (ValidationError, ValueError) as exc:
            await self._end(job, error=f"invalid migration job: {exc}")
            return

        async def progress(done: int, total: int | None) -> bool:
            return await self._jobs.report_progress(job.id, done, total)

        logger.info("running migration job", extra={"job": job.id, "params": job.params})
        heartbeat = asyncio.create_task(self._keep_alive(job.id), name=f"job:{job.id}")
        try:
            result = await self._runner.run_pass(
                selections,
                trigger="job",
                job_id=job.id,
                params=job.params,
                dry_run=params.dry_run,
                progress=progress,
                stop=stop,
            )
        except Exception as exc:
            logger.exception("migration job %s failed", job.id)
            await self._end(job, error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            heartbeat.cancel()
        if result.stopped:
            if stop is not None and stop.is_set():  # shutting down: another replica takes it
                await self._pool.execute(
                    "UPDATE job SET state = 'queued', updated_at = now() WHERE id = $1 AND state = 'running'",
                    job.id,
                )
            return  # else cancelled: it says so already
        await self._jobs.report_progress(job.id, result.done if not params.dry_run else result.planned)
        if result.failed:
            await self._end(
                job, error=f"{result.failed} instance(s) could not be moved; {result.moved} moved"
            )
        else:
            await self._end(job)

    async def _keep_alive(self, job_id: int) -> None:
        """Tell other replicas the job's migrator is alive (see
        :meth:`_requeue_stale_jobs`), however long a batch takes."""
        while True:
            await asyncio.sleep(self._settings.job_stale_seconds / 4)
            await self._pool.execute(
                "UPDATE job SET updated_at = now() WHERE id = $1 AND state = 'running'", job_id
            )

    async def _end(self, job: Job, *, error: str | None = None) -> None:
        try:
            if error is None:
                await self._jobs.complete(job.id)
            else:
                await self._jobs.fail(job.id, error)
        except JobStateError:  # cancelled meanwhile
            pass

    async def _requeue_stale_jobs(self) -> None:
        """Running migration jobs nobody reported on for too long (their
        migrator died) go back to the queue."""
        result = await self._pool.execute(
            """
            UPDATE job SET state = 'queued', updated_at = now()
            WHERE kind = $1 AND state = 'running' AND updated_at < now() - make_interval(secs => $2)
            """,
            str(JobKind.MIGRATION),
            float(self._settings.job_stale_seconds),
        )
        if result != "UPDATE 0":
            logger.warning("requeued stale migration jobs: %s", result)
