"""One attempt of one prefetch job: query, choose, skip what is local, move,
wait for the index; then done, back in the queue with a backoff, or failed.

The attempt records what it learns in ``job.params`` as it goes (the chosen
priors, each one's outcome), so a retry — by this replica or another —
continues where the last attempt stopped: the query is not repeated once
priors were chosen, and studies already moved or found local are not
touched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

import asyncpg
from pydantic import ValidationError

from pacs_common.jobs import Job, JobRepository, JobStateError
from pacs_common.nodes import RemoteNodeRepository, tls_client_context
from prefetch_scheduler.prefetch.dimse import Peer, RemoteError, RemotePacs, StudyQuery
from prefetch_scheduler.prefetch.metrics import PrefetchMetrics
from prefetch_scheduler.prefetch.models import PrefetchParams, RemoteStudy, StudyOutcome, StudyTask
from prefetch_scheduler.prefetch.repository import PrefetchRepository
from prefetch_scheduler.prefetch.selection import PriorCriteria, choose_priors
from prefetch_scheduler.prefetch.settings import PrefetchSettings
from prefetch_scheduler.prefetch.throttle import RemoteThrottle

__all__ = ["PrefetchRunner", "backoff_seconds"]

logger = logging.getLogger(__name__)

_INDEX_POLL_SECONDS: Final = 0.25
_FINAL: Final = frozenset({StudyOutcome.MOVED, StudyOutcome.SKIPPED_LOCAL})


def backoff_seconds(attempt: int, base: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: after attempt ``n`` (1, 2, …), between
    half and all of ``min(maximum, base * 2**(n-1))``."""
    ceiling = min(maximum, base * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class _StoppedError(Exception):
    """The job was cancelled, or the service is stopping."""


class _GiveUpError(Exception):
    """A failure no retry can mend (the message says why)."""


@dataclass
class _Attempt:
    """What one attempt of one job shares between its steps."""

    job: Job
    params: PrefetchParams
    cancelled: asyncio.Event
    stop: asyncio.Event

    def check(self) -> None:
        if self.cancelled.is_set() or self.stop.is_set():
            raise _StoppedError


class PrefetchRunner:
    def __init__(  # noqa: PLR0917 - the wiring of one service, in one place
        self,
        pool: asyncpg.Pool,
        settings: PrefetchSettings,
        remote: RemotePacs,
        throttle: RemoteThrottle,
        metrics: PrefetchMetrics,
        rng: random.Random,
    ) -> None:
        self._settings = settings
        self._remote = remote
        self._throttle = throttle
        self._metrics = metrics
        self._rng = rng
        self._repository = PrefetchRepository(pool)
        self._jobs = JobRepository(pool)
        self._nodes = RemoteNodeRepository(pool)

    async def run(self, job: Job, stop: asyncio.Event) -> None:
        """Run one attempt of ``job`` (claimed: running) and leave it done,
        queued again or failed.  Returns early when ``stop`` is set or the job
        is cancelled (a stopped job goes back to the queue, attempt not counted)."""
        started = time.monotonic()
        try:
            params = PrefetchParams.model_validate(job.params)
        except ValidationError as exc:
            await self._end(job, None, f"invalid prefetch parameters: {exc.errors()[0]['msg']}", started)
            return
        attempt = _Attempt(job, params, asyncio.Event(), stop)
        heartbeat = asyncio.create_task(self._heartbeat(attempt), name=f"prefetch-heartbeat-{job.id}")
        error: str | None
        final = False
        try:
            if params.attempt > self._settings.max_attempts:
                error = params.last_error or "too many attempts"
            else:
                error = await self._attempt(attempt)
        except _StoppedError:
            error = None
        except _GiveUpError as exc:
            error, final = str(exc), True
        except Exception as exc:  # a bug or the database: this attempt failed, the service goes on
            logger.exception("prefetch job %s: attempt failed unexpectedly", job.id)
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
                cause = cause.exceptions[0]
            error = f"internal error: {type(cause).__name__}: {cause}"
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if attempt.cancelled.is_set():
            self._metrics.jobs.labels("cancelled").inc()
            logger.info("prefetch job %s cancelled", job.id)
        elif stop.is_set() and error is None and not self._complete_enough(params):
            params.attempt = max(0, params.attempt - 1)
            await self._repository.requeue(job.id, params)
            self._metrics.jobs.labels("interrupted").inc()
            logger.info("prefetch job %s interrupted by shutdown; queued again", job.id)
        else:
            await self._end(job, params, error, started, final=final)

    @staticmethod
    def _complete_enough(params: PrefetchParams) -> bool:
        return params.studies is not None and all(s.outcome in _FINAL for s in params.studies)

    async def _end(
        self,
        job: Job,
        params: PrefetchParams | None,
        error: str | None,
        started: float,
        *,
        final: bool = False,
    ) -> None:
        duration = time.monotonic() - started
        try:
            if params is None:
                await self._jobs.fail(job.id, error or "invalid parameters")
                outcome = "failed"
            elif error is None:
                params.last_error = None
                params.next_attempt_at = None
                await self._save(job.id, params)
                await self._jobs.complete(job.id)
                outcome = "done"
            elif final or params.attempt >= self._settings.max_attempts:
                attempts = params.attempt
                params.last_error = error
                params.next_attempt_at = None
                params.attempt = 0  # a manual retry gets a fresh budget
                await self._save(job.id, params)
                await self._jobs.fail(
                    job.id, f"{error} (gave up after {attempts} attempt{'s' if attempts != 1 else ''})"
                )
                outcome = "failed"
            else:
                delay = backoff_seconds(
                    params.attempt,
                    self._settings.retry_base_seconds,
                    self._settings.retry_max_seconds,
                    self._rng,
                )
                params.last_error = error
                params.next_attempt_at = datetime.now(UTC) + timedelta(seconds=delay)
                await self._repository.requeue(job.id, params)
                outcome = "retried"
                logger.warning(
                    "prefetch job %s attempt %s failed, retrying in %.1fs: %s",
                    job.id,
                    params.attempt,
                    delay,
                    error,
                )
        except JobStateError:
            outcome = "cancelled"  # cancelled while we were finishing
        self._metrics.jobs.labels(outcome).inc()
        self._metrics.duration.labels(outcome).observe(duration)
        if outcome in {"done", "failed"}:
            logger.info("prefetch job %s %s", job.id, outcome, extra={"error": error})

    async def _heartbeat(self, attempt: _Attempt) -> None:
        interval = max(0.5, self._settings.stale_after_seconds / 5)
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._repository.touch(attempt.job.id):
                    attempt.cancelled.set()
                    return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("prefetch job %s: heartbeat failed: %s", attempt.job.id, exc)

    async def _save(self, job_id: int, params: PrefetchParams) -> bool:
        done = sum(1 for s in params.studies or [] if s.outcome is not StudyOutcome.PENDING)
        total = None if params.studies is None else len(params.studies)
        return await self._repository.save(job_id, params, done, total)

    async def _record(self, attempt: _Attempt) -> None:
        if not await self._save(attempt.job.id, attempt.params):
            attempt.cancelled.set()
            raise _StoppedError

    async def _peer(self, ae_title: str) -> Peer:
        node = await self._nodes.get(ae_title)
        if node is None:
            raise RemoteError(f"{ae_title} is not a registered node (pacs node add {ae_title} ...)")
        context = None
        if node.tls:
            s = self._settings
            context = tls_client_context(s.tls_ca_file, s.tls_cert_file, s.tls_key_file)
        return Peer(node.ae_title, node.host, node.port, context)

    def _criteria(self, params: PrefetchParams) -> PriorCriteria:
        lookback = self._settings.lookback
        return PriorCriteria(
            modality=params.modality,
            body_part=params.body_part,
            exclude_study_uid=params.exclude_study_uid,
            earliest=None if lookback is None else date.today() - lookback,
            max_studies=self._settings.max_studies,
            prefer_same_modality=self._settings.prefer_same_modality,
            prefer_same_body_part=self._settings.prefer_same_body_part,
        )

    async def _attempt(self, attempt: _Attempt) -> str | None:
        """The attempt's work; the reason it failed, or None."""
        params = attempt.params
        try:
            if params.studies is None:
                await self._choose(attempt)
        except RemoteError as exc:
            return str(exc)
        errors: list[str] = []
        # Studies are moved side by side, as many at once as a remote takes
        # associations (the throttle holds that across replicas), started in
        # the order of preference.
        gate = asyncio.Semaphore(self._settings.remote_max_associations)

        async def fetch(task: StudyTask) -> None:
            async with gate:
                attempt.check()
                await self._fetch(task, errors, attempt)
                await self._record(attempt)

        try:
            async with asyncio.TaskGroup() as group:
                for task in params.studies or []:
                    if task.outcome not in _FINAL:
                        group.create_task(fetch(task))
        except* _StoppedError:
            raise _StoppedError from None
        await self._wait_indexed(attempt)
        if not errors:
            return None
        more = f" (and {len(errors) - 1} more failed)" if len(errors) > 1 else ""
        return errors[0] + more

    async def _choose(self, attempt: _Attempt) -> None:
        params = attempt.params
        sources = [params.source] if params.source else list(self._settings.sources)
        if not sources:
            raise _GiveUpError("no remote PACS to query: set PACS_PREFETCH_SOURCES or ask for a source")
        criteria = self._criteria(params)
        query = StudyQuery(patient_id=params.patient_id, earliest=criteria.earliest)
        candidates: list[RemoteStudy] = []
        for source in sources:
            peer = await self._peer(source)
            attempt.check()
            async with self._throttle.association(source):
                try:
                    found = await asyncio.to_thread(self._remote.find_studies, peer, query)
                except RemoteError:
                    self._metrics.operations.labels("find", "failed").inc()
                    raise
            self._metrics.operations.labels("find", "ok").inc()
            candidates.extend(found)
        chosen = choose_priors(candidates, criteria)
        params.studies = [StudyTask(**study.model_dump()) for study in chosen]
        logger.info(
            "prefetch job %s: %d of %d studies of patient %s chosen",
            attempt.job.id,
            len(chosen),
            len(candidates),
            params.patient_id,
        )
        await self._record(attempt)

    async def _fetch(self, task: StudyTask, errors: list[str], attempt: _Attempt) -> None:
        local = await self._repository.local_instances(task.study_instance_uid)
        if local and (task.instances is None or local >= task.instances):
            task.outcome = StudyOutcome.SKIPPED_LOCAL
            task.detail = f"{local} instances held locally"
            task.indexed = True
            self._metrics.studies.labels("skipped-local").inc()
            return
        started = time.monotonic()
        try:
            peer = await self._peer(task.source)
            await self._throttle.pace_move(task.source)
            attempt.check()  # the wait for the remote's turn may have been long
            async with self._throttle.association(task.source):
                attempt.check()
                task.moves += 1
                moving = time.monotonic()
                result = await asyncio.to_thread(
                    self._remote.move_study, peer, task.study_instance_uid, self._settings.move_destination
                )
        except RemoteError as exc:
            self._metrics.operations.labels("move", "failed").inc()
            self._metrics.studies.labels("failed").inc()
            task.outcome = StudyOutcome.FAILED
            task.detail = str(exc)
            errors.append(str(exc))
            return
        self._metrics.operations.labels("move", "ok").inc()
        self._metrics.studies.labels("moved").inc()
        task.outcome = StudyOutcome.MOVED
        task.moved_instances = result.completed + result.warning
        task.failed_instances = result.failed
        task.detail = f"{task.moved_instances} instances sent to {self._settings.move_destination}"
        task.indexed = None
        logger.info(
            "prior %s moved from %s: %d instances in %.2fs (%.2fs waiting for the remote's turn)",
            task.study_instance_uid,
            task.source,
            task.moved_instances,
            time.monotonic() - moving,
            moving - started,
        )

    async def _wait_indexed(self, attempt: _Attempt) -> None:
        """Until the index holds every moved study (bounded by index_wait_seconds):
        a job that is done means priors one can query."""
        waiting = [
            t for t in attempt.params.studies or [] if t.outcome is StudyOutcome.MOVED and not t.indexed
        ]
        if not waiting:
            return
        deadline = time.monotonic() + self._settings.index_wait_seconds
        while True:
            for task in waiting:
                wanted = task.instances if task.instances is not None else task.moved_instances
                local = await self._repository.local_instances(task.study_instance_uid) or 0
                task.indexed = local >= max(1, wanted)
            waiting = [t for t in waiting if not t.indexed]
            if not waiting or time.monotonic() >= deadline:
                break
            attempt.check()
            await asyncio.sleep(_INDEX_POLL_SECONDS)
        await self._record(attempt)
