"""Migration passes: finish the moves others left behind, then claim and
move the instances of each selection, a batch at a time, several objects at
once.

A pass is recorded in ``hsm_run`` (what it planned, moved and failed).  An
instance is tried at most once per pass, so a pass always ends; what failed
is tried again by a later pass once the failure backoff has passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from hsm_migrator.metrics import HsmMetrics
from hsm_migrator.mover import FaultHook, MoveError, MoveOutcome, Mover
from hsm_migrator.moves import LeaseLostError, Move, MoveStore, TargetPlan
from pacs_common.hsm.policy import Selection
from pacs_common.hsm.settings import HsmSettings
from pacs_common.hsm.tiers import availability_in
from pacs_common.storage import StorageError, StorageRegistry

__all__ = ["PassResult", "Runner"]

logger = logging.getLogger(__name__)

#: Called after each batch with (done, total); False stops the pass (a cancelled job).
ProgressCallback = Callable[[int, int | None], Awaitable[bool]]


@dataclass
class PassResult:
    run_pk: int
    planned: int = 0
    planned_bytes: int = 0
    moved: int = 0
    moved_bytes: int = 0
    failed: int = 0
    abandoned: int = 0
    postponed: int = 0
    recovered: int = 0
    stopped: bool = False

    @property
    def done(self) -> int:
        return self.moved + self.failed + self.abandoned + self.postponed


class Runner:
    """Runs migration passes for one migrator (``owner``)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        storage: StorageRegistry,
        settings: HsmSettings,
        *,
        owner: str,
        metrics: HsmMetrics | None = None,
        fault: FaultHook | None = None,
    ) -> None:
        self._pool = pool
        self._storage = storage
        self._settings = settings
        self.owner = owner
        self._metrics = metrics
        self.store = MoveStore(pool, owner, lease_seconds=settings.lease_seconds)
        self._mover = Mover(
            pool,
            storage,
            self.store,
            lock_holder=settings.lock_holder,
            postpone_seconds=min(settings.interval_seconds, settings.lease_seconds),
            fault=fault,
        )

    def target_plan(self, tier: str) -> TargetPlan:
        target = self._storage.get(tier)  # KeyError names the configured tiers
        return TargetPlan(tier=tier, backend=target.kind, availability=str(availability_in(target)))

    async def run_pass(
        self,
        selections: Sequence[Selection],
        *,
        trigger: str,
        job_id: int | None = None,
        params: dict[str, Any] | None = None,
        dry_run: bool = False,
        progress: ProgressCallback | None = None,
        stop: asyncio.Event | None = None,
    ) -> PassResult:
        """One pass over ``selections`` (recovering expired moves first)."""
        for selection in selections:
            self.target_plan(selection.to_tier)
            for tier in selection.from_tiers or ():
                self._storage.get(tier)
        run_pk = await self.store.start_run(trigger, job_id=job_id, params=params or {}, dry_run=dry_run)
        result = PassResult(run_pk=run_pk)
        if self._metrics is not None:
            self._metrics.runs.labels(trigger=trigger).inc()
        # Counting costs a scan: only for who wants a total (jobs, dry runs).
        counted = dry_run or progress is not None
        try:
            for selection in selections if counted else ():
                instances, size = await self.store.count(
                    selection,
                    failure_backoff_seconds=self._settings.failure_backoff_seconds,
                    lock_holder=self._settings.lock_holder,
                )
                result.planned += instances
                result.planned_bytes += size
            if dry_run:
                if progress is not None:
                    await progress(result.planned, result.planned)
                return result
            if progress is not None and not await progress(0, result.planned):
                result.stopped = True
                return result
            result.recovered = await self.recover(result, stop=stop)
            for selection in selections:
                if await self._run_selection(selection, result, progress, stop):
                    result.stopped = True
                    break
            return result
        finally:
            if not counted:
                result.planned = result.done
            await self.store.finish_run(
                run_pk,
                planned=result.planned,
                moved=result.moved,
                moved_bytes=result.moved_bytes,
                failed=result.failed,
                discard=trigger == "policy" and result.done == 0 and result.recovered == 0,
            )
            logger.info(
                "migration pass finished",
                extra={
                    "run": run_pk,
                    "trigger": trigger,
                    "job": job_id,
                    "planned": result.planned,
                    "moved": result.moved,
                    "moved_bytes": result.moved_bytes,
                    "failed": result.failed,
                    "abandoned": result.abandoned,
                    "recovered": result.recovered,
                },
            )

    async def recover(self, result: PassResult | None = None, *, stop: asyncio.Event | None = None) -> int:
        """Finish the open moves whose lease expired; how many were taken."""
        result = result or PassResult(run_pk=0)
        taken = 0
        while stop is None or not stop.is_set():
            moves = await self.store.take_over_expired(limit=self._settings.batch_size)
            if not moves:
                break
            taken += len(moves)
            logger.info("taking over %d interrupted move(s)", len(moves))
            await self._process(moves, result)
        return taken

    async def _run_selection(
        self,
        selection: Selection,
        result: PassResult,
        progress: ProgressCallback | None,
        stop: asyncio.Event | None,
    ) -> bool:
        """Move what ``selection`` matches; True when stopped early."""
        target = self.target_plan(selection.to_tier)
        while True:
            if stop is not None and stop.is_set():
                return True
            moves = await self.store.claim(
                selection,
                target,
                run_pk=result.run_pk,
                limit=self._settings.batch_size,
                failure_backoff_seconds=self._settings.failure_backoff_seconds,
                lock_holder=self._settings.lock_holder,
            )
            if not moves:
                return False
            await self._process(moves, result)
            if progress is not None and not await progress(result.done, max(result.planned, result.done)):
                return True

    async def _process(self, moves: Sequence[Move], result: PassResult) -> None:
        semaphore = asyncio.Semaphore(self._settings.concurrency)

        async def one(move: Move) -> None:
            async with semaphore:
                await self._move(move, result)

        # A task group: if one move dies of something unexpected, the others
        # are cancelled and awaited (interrupted moves are finished by a later
        # pass), never left running behind the caller's back.
        async with asyncio.TaskGroup() as group:
            for move in moves:
                group.create_task(one(move))

    async def _keep_leased(self, move: Move) -> None:
        """Renew the move's lease while a long step (a large copy) runs."""
        while True:
            await asyncio.sleep(self._settings.lease_seconds / 3)
            if not await self.store.renew(move.pk):
                return

    async def _move(self, move: Move, result: PassResult) -> None:
        labels = {"source": move.source_tier, "target": move.target_tier}
        started = time.monotonic()
        heartbeat = asyncio.create_task(self._keep_leased(move), name=f"lease:{move.pk}")
        try:
            outcome = await self._mover.run(move)
        except LeaseLostError as exc:
            logger.warning("lost a move to another migrator: %s", exc)
            return
        except (MoveError, StorageError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._failed(move, exc, result)
            return
        finally:
            heartbeat.cancel()
        if outcome is MoveOutcome.DONE:
            result.moved += 1
            result.moved_bytes += move.size
            if self._metrics is not None:
                self._metrics.migrated_instances.labels(**labels).inc()
                self._metrics.migrated_bytes.labels(**labels).inc(move.size)
                self._metrics.duration.labels(**labels).observe(time.monotonic() - started)
        elif outcome is MoveOutcome.ABANDONED:
            result.abandoned += 1
            if self._metrics is not None:
                self._metrics.abandoned.labels(**labels).inc()
        else:
            result.postponed += 1

    async def _failed(self, move: Move, exc: Exception, result: PassResult) -> None:
        reason = exc.reason if isinstance(exc, MoveError) else _reason(exc)
        permanent = isinstance(exc, MoveError) and exc.permanent
        result.failed += 1
        if self._metrics is not None:
            self._metrics.failures.labels(
                source=move.source_tier, target=move.target_tier, reason=reason
            ).inc()
        logger.warning(
            "move failed",
            extra={"move": move.pk, "instance": move.instance_fk, "reason": reason, "error": str(exc)},
        )
        try:
            recorded = await self.store.record_failure(
                move, f"{reason}: {exc}", retry_in_seconds=min(self._settings.lease_seconds, 30.0)
            )
            if permanent or recorded.attempts >= self._settings.max_attempts:
                given_up = await self.store.give_up(move.pk, f"{reason}: {exc}")
                if given_up is not None:
                    await self._mover.remove_copy(given_up)
        except LeaseLostError:
            return
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as db_error:
            # The lease expires and a later pass takes the move over.
            logger.warning("could not record the failure of move %s: %s", move.pk, db_error)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return "database"
    return type(exc).__name__.lower()
