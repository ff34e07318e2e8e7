"""The worker loop: claim due AI requests, call their endpoint, settle them.

Each replica runs up to ``concurrency`` requests at once; which replica
runs which request is decided by PostgreSQL alone (see
:mod:`ai_connector.request_store`).  Synchronous results are checked and stored
here; asynchronous ones arrive at the callback (:mod:`ai_connector.http`)
and are settled with :meth:`AiWorker.settle` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import httpx
from opentelemetry import trace

from ai_connector.endpoint import Outcome, OutcomeKind, call_endpoint
from ai_connector.metrics import ConnectorMetrics
from ai_connector.payload import build_request
from ai_connector.request_store import ClaimedRequest, RequestStore
from ai_connector.results import InvalidResultError, ResultStorer, check_results
from ai_connector.settings import ConnectorSettings
from pacs_common.messaging.models import IngestSource

__all__ = ["AiWorker", "Attempt"]

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("ai_connector")


@dataclass(frozen=True)
class Attempt:
    """One attempt of a request, as far as settling it needs."""

    request_id: int
    attempt: int
    max_attempts: int
    rule_name: str
    endpoint_url: str
    study_instance_uid: str


class AiWorker:
    def __init__(  # noqa: PLR0917 - the wiring, in one place
        self,
        pool: asyncpg.Pool,
        store: RequestStore,
        storer: ResultStorer,
        http: httpx.AsyncClient,
        settings: ConnectorSettings,
        metrics: ConnectorMetrics,
        *,
        public_url: Callable[[], str | None],
        secrets: Mapping[str, str],
    ) -> None:
        self._pool = pool
        self._store = store
        self._storer = storer
        self._http = http
        self._settings = settings
        self._metrics = metrics
        self._public_url = public_url
        self._secrets = secrets
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Look for due requests now (a request was just created)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        slots = asyncio.Semaphore(self._settings.concurrency)
        try:
            while not stop.is_set():
                if not await _acquire_unless_stopped(slots, stop):
                    break
                try:
                    if await self._store.requeue_retried():
                        logger.info("AI requests queued again: their jobs were retried")
                    claimed = await self._store.claim(self._settings.lease_margin_seconds)
                except Exception:
                    logger.exception("claiming AI requests failed")
                    claimed = None
                if claimed is None:
                    slots.release()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._settings.poll_interval_seconds):
                            await _either(stop, self._wake)
                    continue
                task = asyncio.create_task(self._process_guarded(claimed), name=f"ai-request-{claimed.id}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            await self._drain()

    async def _drain(self) -> None:
        """Let running attempts finish for a grace period (their results are
        worth keeping); the others are interrupted and handed back."""
        if not self._running:
            return
        _, pending = await asyncio.wait(set(self._running), timeout=self._settings.shutdown_grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _process_guarded(self, claimed: ClaimedRequest) -> None:
        try:
            await self.process(claimed)
        except asyncio.CancelledError:
            # Stopping: the attempt did not happen; any replica may run it now.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.release(claimed.id, claimed.attempts))
            logger.info("AI request %d handed back (stopping)", claimed.id)
            raise
        except Exception:
            logger.exception("AI request %d failed unexpectedly; its lease will expire", claimed.id)

    async def process(self, claimed: ClaimedRequest) -> None:
        with _tracer.start_as_current_span(
            "ai request",
            attributes={
                "pacs.ai.rule": claimed.rule.name,
                "pacs.ai.request_id": claimed.id,
                "pacs.ai.attempt": claimed.attempts,
                "pacs.study_instance_uid": claimed.study_instance_uid,
            },
        ):
            await self._process(claimed)

    async def _process(self, claimed: ClaimedRequest) -> None:
        rule = claimed.rule
        attempt = Attempt(
            claimed.id,
            claimed.attempts,
            rule.max_attempts,
            rule.name,
            rule.endpoint_url,
            claimed.study_instance_uid,
        )
        if claimed.job_state == "cancelled":
            await self._fail(attempt, "cancelled by an administrator")
            return
        if claimed.taken_over and claimed.attempts > rule.max_attempts:
            await self._fail(attempt, f"no result within the timeout after {rule.max_attempts} attempt(s)")
            return
        if claimed.job_id is not None:
            await self._store.start_job(claimed.job_id)
        headers = dict(rule.headers)
        if rule.secret_ref is not None:
            secret = self._secrets.get(rule.secret_ref)
            if not secret:
                await self._fail(
                    attempt, f"the endpoint secret {rule.secret_ref} is not set in the connector"
                )
                return
            headers["Authorization"] = f"Bearer {secret}"
        token = self._settings.dicomweb_token
        request = await build_request(
            self._pool,
            claimed,
            dicomweb_url=self._settings.dicomweb_url,
            dicomweb_token=None if token is None else token.get_secret_value(),
            public_url=self._public_url(),
        )
        if not request.series:
            await self._fail(attempt, "the matched series are no longer in the index")
            return
        logger.info(
            "calling AI endpoint",
            extra={"rule": rule.name, "study": claimed.study_instance_uid, "attempt": claimed.attempts},
        )
        started = time.monotonic()
        outcome = await call_endpoint(
            self._http,
            rule.endpoint_url,
            request,
            headers=headers,
            timeout_seconds=rule.timeout_seconds,
            max_bytes=self._settings.max_result_bytes,
        )
        if outcome.kind is OutcomeKind.ACCEPTED:
            await self._store.extend_lease(
                claimed, rule.timeout_seconds + self._settings.lease_margin_seconds
            )
            self._metrics.jobs.labels(rule.name, "accepted").inc()
            logger.info(
                "AI endpoint accepted the request; waiting for the callback", extra={"rule": rule.name}
            )
            return
        await self.settle(attempt, outcome)
        self._metrics.duration.labels(rule.name).observe(time.monotonic() - started)

    async def settle(self, attempt: Attempt, outcome: Outcome) -> list[str]:
        """Record how ``attempt`` ended; the SOP Instance UIDs stored (results)."""
        if outcome.kind is OutcomeKind.RESULTS:
            try:
                results = check_results(outcome.contents, attempt.study_instance_uid)
            except InvalidResultError as exc:
                await self._fail(attempt, str(exc))
                raise
            source = IngestSource(protocol="import", peer=urlsplit(attempt.endpoint_url).netloc or None)
            try:
                await self._storer.store(results, source)
            except Exception as exc:
                logger.warning("storing AI results failed", exc_info=True)
                await self._retry_or_fail(attempt, f"storing the results failed: {exc}")
                return []
            uids = [r.sop_instance_uid for r in results]
            if await self._store.succeed(attempt.request_id, attempt.attempt, uids):
                self._metrics.jobs.labels(attempt.rule_name, "succeeded").inc()
                self._metrics.results.inc(len(uids))
                logger.info(
                    "AI results stored",
                    extra={
                        "rule": attempt.rule_name,
                        "study": attempt.study_instance_uid,
                        "objects": len(uids),
                    },
                )
            return uids
        if outcome.kind is OutcomeKind.RETRY:
            await self._retry_or_fail(attempt, outcome.reason)
        else:
            await self._fail(attempt, outcome.reason)
        return []

    async def _retry_or_fail(self, attempt: Attempt, reason: str) -> None:
        if attempt.attempt >= attempt.max_attempts:
            await self._fail(attempt, f"{reason} (after {attempt.attempt} attempt(s))")
            return
        settings = self._settings
        delay = min(settings.backoff_base_seconds * 2 ** (attempt.attempt - 1), settings.backoff_max_seconds)
        if await self._store.retry_later(attempt.request_id, attempt.attempt, reason, delay):
            self._metrics.jobs.labels(attempt.rule_name, "retried").inc()
            logger.warning(
                "AI request attempt failed; retrying in %.1fs: %s",
                delay,
                reason,
                extra={"rule": attempt.rule_name, "study": attempt.study_instance_uid},
            )

    async def _fail(self, attempt: Attempt, reason: str) -> None:
        if await self._store.fail(attempt.request_id, attempt.attempt, reason):
            self._metrics.jobs.labels(attempt.rule_name, "failed").inc()
            logger.warning(
                "AI request failed: %s",
                reason,
                extra={"rule": attempt.rule_name, "study": attempt.study_instance_uid},
            )


async def _acquire_unless_stopped(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """A free slot (True), or False once ``stop`` is set."""
    acquire = asyncio.create_task(slots.acquire())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not acquire.done():
        acquire.cancel()
        await asyncio.gather(acquire, return_exceptions=True)
    got = acquire.done() and not acquire.cancelled()
    if got and stop.is_set():
        slots.release()
        return False
    return got


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    tasks = [asyncio.create_task(first.wait()), asyncio.create_task(second.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
