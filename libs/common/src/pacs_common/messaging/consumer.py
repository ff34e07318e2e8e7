"""Consuming the ingest queue in batches, with retry and dead-lettering.

The worker indexes many instances per database transaction, so deliveries
are handed out in batches and acknowledged only after the commit.  A failed
delivery is republished (confirmed) to a retry queue whose TTL brings it back
later, and after the last retry to the dead-letter queue; the original is
acked only once its copy is safe, so a crash in between duplicates a message
(harmless: indexing is idempotent) but never loses one.

The attempt counter lives in our own header rather than in RabbitMQ's
``x-death``: the retry hops go through several queues, and a replayed dead
letter must be able to start again from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    DeliveryMode,
)
from aio_pika.exceptions import AMQPChannelError, AMQPConnectionError, ChannelInvalidStateError
from opentelemetry.context import Context

from pacs_common.messaging.broker import Broker, PublishError
from pacs_common.messaging.models import IngestMessage, decode_ingest
from pacs_common.messaging.topology import DEAD_ROUTING_KEY, declare_ingest_queue, retry_routing_key
from pacs_common.messaging.tracecontext import extract_trace_context

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-pacs-attempt"
LAST_ERROR_HEADER = "x-pacs-last-error"
ERROR_HEADER = "x-pacs-error"
FAILED_AT_HEADER = "x-pacs-failed-at"
ATTEMPTS_HEADER = "x-pacs-attempts"
#: Headers that describe one trip through the retry/dead-letter machinery;
#: dropped when a message is republished so they do not pile up.
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_MAX_REASON_LENGTH = 2000

# Acking or nacking on a channel that is gone: the broker has requeued the
# message already, so there is nothing left to do.
_CHANNEL_GONE = (ChannelInvalidStateError, AMQPChannelError, AMQPConnectionError)


def _channel_alive(raw: AbstractIncomingMessage) -> bool:
    try:
        return not raw.channel.is_closed
    except ChannelInvalidStateError:
        return False


class SettleOutcome(StrEnum):
    """What became of a delivery handed to retry_later / dead_letter."""

    RETRIED = "retried"
    DEAD_LETTERED = "dead-lettered"
    # The republish failed; the delivery went back to the ingest queue.
    REQUEUED = "requeued"


@dataclass
class Delivery:
    """One decoded ingest message and the AMQP delivery that carried it."""

    message: IngestMessage
    raw: AbstractIncomingMessage
    attempt: int  # 0 on the first delivery; from x-pacs-attempt after a retry
    trace_context: Context


def attempt_of(headers: Mapping[str, Any] | None) -> int:
    value = (headers or {}).get(ATTEMPT_HEADER, 0)
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def _truncate(reason: str) -> str:
    return reason if len(reason) <= _MAX_REASON_LENGTH else reason[:_MAX_REASON_LENGTH] + "…"


def republished_copy(
    raw: AbstractIncomingMessage,
    *,
    set_headers: Mapping[str, Any] | None = None,
    drop_headers: Sequence[str] = (),
) -> aio_pika.Message:
    """A persistent copy of ``raw`` (body, ids, trace context) for republishing.

    RabbitMQ's dead-lettering headers and ``drop_headers`` are left out so the
    copy starts a clean history; ``set_headers`` are added.
    """
    headers = {
        key: value
        for key, value in (raw.headers or {}).items()
        if not key.startswith(_BROKER_HEADERS) and key not in drop_headers
    }
    headers.update(set_headers or {})
    return aio_pika.Message(
        raw.body,
        headers=headers,
        content_type=raw.content_type,
        content_encoding=raw.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=raw.message_id,
        correlation_id=raw.correlation_id,
        timestamp=raw.timestamp,
        type=raw.type,
        app_id=raw.app_id,
    )


def dead_letter_headers(reason: str, attempts: int) -> dict[str, Any]:
    return {
        ERROR_HEADER: _truncate(reason),
        FAILED_AT_HEADER: datetime.now(UTC).isoformat(),
        ATTEMPTS_HEADER: attempts,
    }


class IngestConsumer:
    """Batches of ingest deliveries from a channel of its own.

    ``prefetch`` bounds the unacked deliveries held by this consumer (yielded
    and buffered); keep it at least ``max_size`` or batches never fill.
    """

    def __init__(self, broker: Broker, *, prefetch: int) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self._broker = broker
        self._topology = broker.topology
        self._prefetch = prefetch
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        # None is the wake-up sentinel put by stop().
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._assembling: list[Delivery] = []
        self._stopped = False

    async def _start(self) -> None:
        channel = await self._broker.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self._prefetch)
        self._channel = channel
        self._queue = await declare_ingest_queue(channel, self._topology)
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    # -- batches -----------------------------------------------------------

    async def batches(self, max_size: int, max_wait_seconds: float) -> AsyncGenerator[list[Delivery], None]:
        """Yield batches of up to ``max_size`` deliveries, each as soon as it
        is full or ``max_wait_seconds`` after its first delivery arrived.

        Undecodable messages go to the dead-letter queue and are never
        yielded.  The iteration ends when :meth:`stop` is called.
        """
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if self._stopped:
            return
        if self._channel is None:
            await self._start()
        loop = asyncio.get_running_loop()
        while not self._stopped:
            batch: list[Delivery] = []
            self._assembling = batch
            deadline: float | None = None
            while len(batch) < max_size:
                raw = await self._next(None if deadline is None else deadline - loop.time())
                if raw is None:
                    break
                delivery = await self._accept(raw)
                if delivery is None:
                    continue
                batch.append(delivery)
                if deadline is None:
                    deadline = loop.time() + max_wait_seconds
            self._assembling = []
            if self._stopped:
                await self._requeue(d.raw for d in batch)
                return
            if batch:
                yield batch

    async def _next(self, remaining: float | None) -> AbstractIncomingMessage | None:
        """The next buffered message; None on stop or once ``remaining`` is
        spent (what is already buffered is still taken after the deadline)."""
        if self._stopped:
            return None
        if remaining is not None and remaining <= 0:
            try:
                return self._buffer.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            async with asyncio.timeout(remaining):
                return await self._buffer.get()
        except TimeoutError:
            return None

    async def _accept(self, raw: AbstractIncomingMessage) -> Delivery | None:
        if not _channel_alive(raw):
            # Delivered before a reconnect: the broker requeued it already.
            return None
        attempt = attempt_of(raw.headers)
        try:
            message = decode_ingest(raw.body)
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            reason = f"undecodable ingest message: {exc}"
            log.warning("dead-lettering message %s: %s", raw.message_id, reason)
            await self._settle_by_republish(raw, DEAD_ROUTING_KEY, dead_letter_headers(reason, attempt + 1))
            return None
        return Delivery(message, raw, attempt, extract_trace_context(raw.headers))

    # -- settling ----------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Ack after the work is committed.  A delivery whose channel is gone
        cannot be acked; the broker redelivers it, which indexing tolerates."""
        for delivery in deliveries:
            try:
                await delivery.raw.ack()
            except _CHANNEL_GONE:
                log.info("ack of %s skipped: channel gone, it will be redelivered", delivery.raw.message_id)

    async def retry_later(self, delivery: Delivery, reason: str) -> SettleOutcome:
        """Send to retry queue ``attempt`` (or to the DLQ when the retries are
        used up), then ack; on a failed republish requeue instead."""
        attempt = delivery.attempt
        if attempt >= len(self._topology.retry_delays_ms):
            return await self.dead_letter(delivery, reason)
        headers = {ATTEMPT_HEADER: attempt + 1, LAST_ERROR_HEADER: _truncate(reason)}
        if await self._settle_by_republish(delivery.raw, retry_routing_key(attempt), headers):
            return SettleOutcome.RETRIED
        return SettleOutcome.REQUEUED

    async def dead_letter(self, delivery: Delivery, reason: str) -> SettleOutcome:
        """Send straight to the DLQ, then ack; on a failed republish requeue."""
        headers = dead_letter_headers(reason, delivery.attempt + 1)
        if await self._settle_by_republish(delivery.raw, DEAD_ROUTING_KEY, headers):
            return SettleOutcome.DEAD_LETTERED
        return SettleOutcome.REQUEUED

    async def _settle_by_republish(
        self, raw: AbstractIncomingMessage, routing_key: str, headers: Mapping[str, Any]
    ) -> bool:
        copy = republished_copy(raw, set_headers=headers, drop_headers=(ATTEMPT_HEADER,))
        try:
            await self._broker.publish_raw(self._topology.ingest_exchange, routing_key, copy)
        except PublishError as exc:
            log.warning(
                "republishing %s to %r failed (%s); requeueing it", raw.message_id, routing_key, exc.reason
            )
            await self._requeue([raw])
            return False
        try:
            await raw.ack()
        except _CHANNEL_GONE:
            log.info("ack of %s skipped after republish: channel gone (duplicate follows)", raw.message_id)
        return True

    async def _requeue(self, raws: Iterable[AbstractIncomingMessage]) -> None:
        for raw in raws:
            if raw.processed:
                continue
            with contextlib.suppress(*_CHANNEL_GONE):
                await raw.nack(requeue=True)

    # -- stopping ----------------------------------------------------------

    async def stop(self) -> None:
        """Stop consuming and close the channel.

        Buffered deliveries not yet yielded are nacked back to the queue;
        yielded ones that are still unacked return to the queue when the
        channel closes, so ack the batch in flight before calling this.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(*_CHANNEL_GONE):
                await self._queue.cancel(self._consumer_tag)
        buffered: list[AbstractIncomingMessage] = [d.raw for d in self._assembling]
        while not self._buffer.empty():
            raw = self._buffer.get_nowait()
            if raw is not None:
                buffered.append(raw)
        await self._requeue(buffered)
        self._buffer.put_nowait(None)
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
