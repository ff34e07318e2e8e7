"""One batch of ingest deliveries: read, parse, index, announce, ack.

The order is the ingest contract's: the index transaction commits before
any event is published and before any delivery is acked, so a crash at any
point leaves messages to be redelivered, and redelivery is harmless (the
index is idempotent).

Failures are sorted per delivery:

* a delivery that cannot be read or parsed does not fail its batch: it goes
  to the retry queue when the cause may pass (storage unreachable, object
  not there yet) and to the dead-letter queue, with the reason, when it
  cannot (not DICOM, UIDs that contradict the message, unknown tier);
* the database being down fails the whole batch: nothing is acked, the
  batch is retried with backoff until the database is back;
* the database refusing the batch for another reason is narrowed down to
  the instance(s) at fault, which are dead-lettered; the rest is indexed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ingest_worker.metrics import WorkerMetrics
from ingest_worker.objects import BLOCK_BYTES, ObjectReader, read_head
from pacs_common.db.index import IndexItem, IndexResult, InstanceIndex
from pacs_common.db.pool import is_connection_error
from pacs_common.dicom.metadata import NotDicomError, parse_for_index
from pacs_common.messaging.broker import Broker, PublishError
from pacs_common.messaging.consumer import Delivery, IngestConsumer, SettleOutcome
from pacs_common.messaging.models import IngestMessage, InstanceStored
from pacs_common.settings import DuplicatePolicy
from pacs_common.storage.base import (
    ObjectArchivedError,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
)

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("ingest_worker")

_DB_BACKOFF_START = 0.5
_DB_BACKOFF_MAX = 15.0
_PUBLISH_ATTEMPTS = 5


class StorageResolver(Protocol):
    """Where a tier's objects are (``StorageRegistry`` is one)."""

    def get(self, tier: str) -> ObjectStorage: ...


class Permanent(Exception):  # noqa: N818 - a verdict, not an error type
    """Retrying will not help: dead-letter with this reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Transient(Exception):  # noqa: N818
    """May pass: retry later with this reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Abandoned(Exception):  # noqa: N818
    """Stopping while the batch could not be committed: leave it unacked."""


class Unpublished(Exception):  # noqa: N818
    """Committed, but the events could not be published: requeue the batch."""


@dataclass(frozen=True, slots=True)
class IndexerConfig:
    batch_size: int
    batch_wait_seconds: float
    duplicate_policy: DuplicatePolicy
    bulk_data_threshold: int


@contextlib.contextmanager
def _storage_errors(tier: str, key: str) -> Iterator[None]:
    """Storage failures as retry / dead-letter verdicts."""
    try:
        yield
    except ObjectNotFoundError as exc:
        # Written before the message was published, so it should be there;
        # retried a few times (an eventually consistent store), then dead.
        raise Transient("object-missing", f"object {key!r} not found in tier {tier!r}") from exc
    except ObjectArchivedError as exc:
        raise Permanent("object-archived", f"object {key!r} is archived: {exc}") from exc
    except (StorageError, OSError) as exc:
        raise Transient("storage-unavailable", f"reading {key!r} failed: {exc}") from exc


@contextlib.contextmanager
def _commit_spans(parents: list[Span]) -> Iterator[list[Span]]:
    """One "index commit" span per instance, child of its delivery's span,
    around the batch's index transaction (shared by the batch)."""
    spans = [
        tracer.start_span(
            "index commit",
            context=trace.set_span_in_context(parent),
            attributes={"db.system": "postgresql", "db.operation": "COMMIT", "pacs.batch_size": len(parents)},
        )
        for parent in parents
    ]
    try:
        yield spans
    finally:
        for span in spans:
            span.end()


def _reconcile(message: IngestMessage, item: IndexItem) -> None:
    """The UIDs in the message are the ones the receiver checked and stored
    under; an object that says otherwise must not be indexed as them."""
    parsed = item.parsed
    pairs = (
        ("SOP Instance UID", message.sop_instance_uid, parsed.instance.sop_instance_uid),
        ("SOP Class UID", message.sop_class_uid, parsed.instance.sop_class_uid),
        ("Study Instance UID", message.study_instance_uid, parsed.study.study_instance_uid),
        ("Series Instance UID", message.series_instance_uid, parsed.series.series_instance_uid),
    )
    for name, expected, found in pairs:
        if found is not None and found != expected:
            raise Permanent(
                "uid-mismatch", f"{name} in the object is {found!r}, the message says {expected!r}"
            )


class BatchIndexer:
    """Consumes ingest batches until stopped."""

    def __init__(
        self,
        *,
        index: InstanceIndex,
        storage: StorageResolver,
        broker: Broker,
        consumer: IngestConsumer,
        config: IndexerConfig,
        metrics: WorkerMetrics,
    ) -> None:
        self._index = index
        self._storage = storage
        self._broker = broker
        self._consumer = consumer
        self._config = config
        self._metrics = metrics
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        """Take batches until stopped, one at a time.

        (Overlapping two batches was measured slower: the parse thread and
        the event loop then fight over the GIL.  Scale with processes.)
        """
        batches = self._consumer.batches(self._config.batch_size, self._config.batch_wait_seconds)
        try:
            async for batch in batches:
                self._idle.clear()
                try:
                    await self.process(batch)
                except Abandoned:
                    logger.warning("stopping with an uncommitted batch; it will be redelivered")
                except Exception:
                    # Its unacked deliveries come back when the channel closes.
                    logger.exception("batch failed unexpectedly; its deliveries will be redelivered")
                finally:
                    self._idle.set()
                if self._stopping:
                    break
        finally:
            await batches.aclose()

    async def stop(self) -> None:
        """Finish the batch in hand (commit, publish, ack), then stop consuming."""
        self._stopping = True
        await self._idle.wait()
        await self._consumer.stop()

    # -- one batch -----------------------------------------------------------

    async def process(self, deliveries: Sequence[Delivery]) -> None:
        started = time.perf_counter()
        self._metrics.batch_size.observe(len(deliveries))
        spans = [
            tracer.start_span(
                "ingest index",
                context=d.trace_context,
                kind=SpanKind.CONSUMER,
                attributes={"pacs.sop_instance_uid": d.message.sop_instance_uid, "pacs.attempt": d.attempt},
            )
            for d in deliveries
        ]
        try:
            await self._process(deliveries, spans)
        finally:
            for span in spans:
                span.end()
        self._metrics.batch_seconds.observe(time.perf_counter() - started)

    async def _process(self, deliveries: Sequence[Delivery], spans: list[Span]) -> None:
        stage = time.perf_counter()
        loaded = await self._load_all(deliveries)
        self._metrics.stage_seconds.labels("read_parse").observe(time.perf_counter() - stage)

        ready: list[tuple[Delivery, IndexItem, Span]] = []
        for delivery, outcome, span in zip(deliveries, loaded, spans, strict=True):
            if isinstance(outcome, IndexItem):
                ready.append((delivery, outcome, span))
            else:
                await self._settle_failure(delivery, outcome, span)
        if not ready:
            return

        stage = time.perf_counter()
        with _commit_spans([span for _, _, span in ready]) as commit_spans:
            results = await self._index_resilient(ready)
            for commit_span, result in zip(commit_spans, results, strict=True):
                if isinstance(result, Permanent):
                    commit_span.set_status(Status(StatusCode.ERROR, result.reason))
        self._metrics.stage_seconds.labels("index").observe(time.perf_counter() - stage)

        committed: list[tuple[Delivery, IndexResult, Span]] = []
        now = datetime.now(UTC)
        for (delivery, item, span), result in zip(ready, results, strict=True):
            if isinstance(result, Permanent):
                await self._settle_failure(delivery, result, span)
                continue
            committed.append((delivery, result, span))
            self._account(delivery, item, result, span, now)

        stage = time.perf_counter()
        try:
            await self._publish(committed)
        except Unpublished as exc:
            logger.warning("requeueing a committed batch whose events were not published: %s", exc)
            for delivery, _, _ in committed:
                with contextlib.suppress(Exception):  # channel gone: requeued by the broker already
                    await delivery.raw.nack(requeue=True)
            return
        self._metrics.stage_seconds.labels("publish").observe(time.perf_counter() - stage)
        await self._consumer.ack([d for d, _, _ in committed])

    # -- read and parse ------------------------------------------------------

    async def _load_all(self, deliveries: Sequence[Delivery]) -> list[IndexItem | BaseException]:
        """Fetch the heads concurrently (I/O, in threads), then parse them one
        by one on the event loop (CPU).

        Parsing on the loop, yielding between instances, is deliberate:
        parsing on threads was measured to cost up to twice the CPU, the
        parse threads and the loop handing the GIL back and forth.  One
        instance blocks the loop for a few milliseconds at most (longer only
        for a header beyond the prefetched head on remote storage).
        """
        heads = await asyncio.gather(
            *(asyncio.to_thread(self._fetch_head, d.message) for d in deliveries), return_exceptions=True
        )
        out: list[IndexItem | BaseException] = []
        for delivery, head in zip(deliveries, heads, strict=True):
            if isinstance(head, BaseException):
                out.append(head)
                continue
            try:
                out.append(self._parse(delivery.message, *head))
            except Exception as exc:
                out.append(exc)
            await asyncio.sleep(0)
        return out

    def _fetch_head(self, message: IngestMessage) -> tuple[ObjectStorage, bytes]:
        location = message.location
        try:
            storage = self._storage.get(location.tier)
        except KeyError as exc:
            raise Permanent("unknown-tier", str(exc.args[0] if exc.args else exc)) from exc
        with _storage_errors(location.tier, location.key):
            return storage, read_head(storage, location.key, location.size)

    def _parse(self, message: IngestMessage, storage: ObjectStorage, head: bytes) -> IndexItem:
        location = message.location
        reader = ObjectReader(storage, location.key, location.size, head)
        with _storage_errors(location.tier, location.key):
            try:
                parsed = parse_for_index(
                    # C-level buffering: pydicom reads a few bytes at a time.
                    io.BufferedReader(reader, buffer_size=BLOCK_BYTES),
                    bulk_data_threshold=self._config.bulk_data_threshold,
                    locate_fragments=storage.kind == "filesystem",
                )
            except NotDicomError as exc:
                if reader.failure is not None:
                    raise reader.failure from exc  # not bad data: a read that failed
                raise Permanent("not-dicom", f"object {location.key!r}: {exc}") from exc
            if reader.failure is not None:  # caught by the parser, but the result is incomplete
                raise reader.failure
        # Objects without file meta: the receiver knew the transfer syntax.
        if not parsed.has_file_meta:
            parsed.transfer_syntax_uid = message.transfer_syntax_uid
        # Fill what the object lacks from the message (checked equal otherwise).
        parsed.instance.sop_instance_uid = parsed.instance.sop_instance_uid or message.sop_instance_uid
        parsed.instance.sop_class_uid = parsed.instance.sop_class_uid or message.sop_class_uid
        parsed.study.study_instance_uid = parsed.study.study_instance_uid or message.study_instance_uid
        parsed.series.series_instance_uid = parsed.series.series_instance_uid or message.series_instance_uid
        received_at = message.received_at
        if received_at.tzinfo is None:  # a publisher that left the zone out means UTC
            received_at = received_at.replace(tzinfo=UTC)
        try:
            item = IndexItem.build(parsed, location, received_at, message.source.calling_ae_title)
        except (ValueError, TypeError) as exc:  # what the object holds, not a passing failure
            raise Permanent("not-indexable", str(exc)) from exc
        _reconcile(message, item)
        if parsed.warnings:
            logger.warning(
                "instance has elements that could not be read as they are",
                extra={
                    "sop_instance_uid": message.sop_instance_uid,
                    "key": location.key,
                    "problems": parsed.warnings[:20],
                    "problem_count": len(parsed.warnings),
                },
            )
        return item

    # -- index ---------------------------------------------------------------

    async def _index_resilient(
        self, ready: list[tuple[Delivery, IndexItem, Span]]
    ) -> list[IndexResult | Permanent]:
        """Index the batch; wait out a database outage; isolate poison."""
        items = [item for _, item, _ in ready]
        try:
            return list(await self._index_until_committed(items))
        except Abandoned:
            raise
        except Exception as exc:
            logger.warning(
                "batch refused by the database, indexing its instances one by one",
                extra={"error": f"{type(exc).__name__}: {exc}", "batch_size": len(items)},
            )
        results: list[IndexResult | Permanent] = []
        for item in items:
            try:
                [result] = await self._index_until_committed([item])
            except Abandoned:
                raise
            except Exception as exc:
                self._metrics.failures.labels("index", "refused").inc()
                results.append(
                    Permanent("index-refused", f"the index refused the instance: {type(exc).__name__}: {exc}")
                )
            else:
                results.append(result)
        return results

    async def _index_until_committed(self, items: list[IndexItem]) -> list[IndexResult]:
        delay = _DB_BACKOFF_START
        while True:
            try:
                return await self._index.index_batch(items, duplicate_policy=self._config.duplicate_policy)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._metrics.failures.labels("index", "database-unavailable").inc()
                if self._stopping:
                    raise Abandoned() from exc
                logger.warning(
                    "database unavailable, retrying the batch",
                    extra={"error": f"{type(exc).__name__}: {exc}", "retry_in_seconds": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _DB_BACKOFF_MAX)

    def _account(
        self, delivery: Delivery, item: IndexItem, result: IndexResult, span: Span, now: datetime
    ) -> None:
        self._metrics.instances.labels(result.outcome).inc()
        span.set_attribute("pacs.outcome", result.outcome)
        if result.outcome in ("created", "replaced"):
            self._metrics.bytes.inc(item.location.size)
            self._metrics.lag_seconds.observe(max(0.0, (now - delivery.message.received_at).total_seconds()))
        if result.duplicate is not None:
            self._metrics.duplicates.labels(result.duplicate.decision).inc()
        with trace.use_span(span):  # the log lines carry the instance's trace id
            self._log_indexed(delivery, item, result)

    def _log_indexed(self, delivery: Delivery, item: IndexItem, result: IndexResult) -> None:
        logger.info(
            "instance indexed",
            extra={
                "sop_instance_uid": result.sop_instance_uid,
                "study_instance_uid": result.study_instance_uid,
                "outcome": result.outcome,
                "key": item.location.key,
                "message_id": str(delivery.message.message_id),
            },
        )
        duplicate = result.duplicate
        if duplicate is not None:
            logger.info(
                "duplicate instance",
                extra={
                    "sop_instance_uid": result.sop_instance_uid,
                    "decision": duplicate.decision,
                    "outcome": result.outcome,
                    "policy": str(self._config.duplicate_policy),
                    "kept_tier": duplicate.kept.tier,
                    "kept_key": duplicate.kept.key,
                    "kept_sha256": duplicate.kept.sha256,
                    "other_tier": duplicate.set_aside.tier,
                    "other_key": duplicate.set_aside.key,
                    "other_sha256": duplicate.set_aside.sha256,
                    "message_id": str(delivery.message.message_id),
                },
            )

    # -- events --------------------------------------------------------------

    async def _publish_one(self, event: InstanceStored, span: Span) -> None:
        # The event carries the instance's trace (gateway → worker → consumers).
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self._broker.publish_event(event)
        finally:
            otel_context.detach(token)

    async def _publish(self, committed: list[tuple[Delivery, IndexResult, Span]]) -> None:
        """instance.stored for every committed delivery, confirmed.

        If the broker cannot take them, the deliveries are requeued, not
        acked: they come back, are found "unchanged", and their events go out
        then (events are at-least-once; consumers key on SOP Instance UID and
        sha256).
        """
        pending = [
            (
                InstanceStored(
                    sop_class_uid=result.sop_class_uid,
                    sop_instance_uid=result.sop_instance_uid,
                    study_instance_uid=result.study_instance_uid,
                    series_instance_uid=result.series_instance_uid,
                    patient_id=result.patient_id,
                    modality=result.modality,
                    outcome=result.outcome,
                    location=result.location,
                    source=delivery.message.source,
                ),
                span,
            )
            for delivery, result, span in committed
        ]
        delay = 0.2
        for attempt in range(1, _PUBLISH_ATTEMPTS + 1):
            outcomes = await asyncio.gather(
                *(self._publish_one(event, span) for event, span in pending), return_exceptions=True
            )
            failed = [(p, o) for p, o in zip(pending, outcomes, strict=True) if isinstance(o, BaseException)]
            for _, error in failed:
                if not isinstance(error, PublishError):
                    raise error
            if not failed:
                return
            self._metrics.failures.labels("publish", "broker-unavailable").inc(len(failed))
            pending = [p for p, _ in failed]
            logger.warning(
                "instance.stored not confirmed, retrying",
                extra={"attempt": attempt, "failed": len(failed), "error": str(failed[0][1])},
            )
            if attempt < _PUBLISH_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        raise Abandoned("events not published")

    # -- settling failures ---------------------------------------------------

    async def _settle_failure(self, delivery: Delivery, error: BaseException, span: Span) -> None:
        span.set_status(Status(StatusCode.ERROR, str(error)))
        with trace.use_span(span):  # the log lines carry the instance's trace id
            await self._settle_failure_in_span(delivery, error)

    async def _settle_failure_in_span(self, delivery: Delivery, error: BaseException) -> None:
        message = delivery.message
        if isinstance(error, Permanent):
            self._metrics.failures.labels(
                "parse" if error.kind != "index-refused" else "index", error.kind
            ).inc()
            self._metrics.dead_lettered.labels(error.kind).inc()
            logger.error(
                "dead-lettering ingest message",
                extra={
                    "sop_instance_uid": message.sop_instance_uid,
                    "key": message.location.key,
                    "kind": error.kind,
                    "reason": error.reason,
                    "message_id": str(message.message_id),
                },
            )
            await self._consumer.dead_letter(delivery, f"{error.kind}: {error.reason}")
            return
        if isinstance(error, Transient):
            kind, reason = error.kind, error.reason
        elif isinstance(error, Exception):
            kind, reason = "unexpected", f"{type(error).__name__}: {error}"
            logger.exception("unexpected error reading an instance", exc_info=error)
        else:  # CancelledError and friends: not ours to swallow
            raise error
        self._metrics.failures.labels("read", kind).inc()
        self._metrics.retried.labels(kind).inc()
        logger.warning(
            "ingest message to be retried",
            extra={
                "sop_instance_uid": message.sop_instance_uid,
                "key": message.location.key,
                "kind": kind,
                "reason": reason,
                "attempt": delivery.attempt,
            },
        )
        try:
            outcome = await self._consumer.retry_later(delivery, f"{kind}: {reason}")
        except Exception as exc:  # left unacked: it comes back when the channel does
            logger.warning("could not send a delivery to retry: %s", exc)
            return
        if outcome is SettleOutcome.DEAD_LETTERED:  # its retries were used up
            self._metrics.dead_lettered.labels(kind).inc()
