"""The forwarder's subscription to the events exchange.

A durable quorum queue ``{namespace}forwarding`` bound with the routing keys
``instance.stored`` and ``study.stable``: every replica consumes it (each
event reaches one of them), and an event is acked only after its items are
committed.  A delivery that fails for a passing reason (the database) goes
back to the queue after a pause; one that keeps failing is dropped after
``max_event_deliveries`` (logged and counted), as is one that is not an
event at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPChannelError, AMQPConnectionError, ChannelInvalidStateError
from pydantic import TypeAdapter, ValidationError

from pacs_common.db.pool import is_connection_error
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.models import EVENT_ROUTING_KEYS, Event, InstanceStored, StudyStable
from pacs_common.messaging.topology import Topology
from prefetch_scheduler.forwarding.intake import Intake
from prefetch_scheduler.forwarding.metrics import ForwardMetrics

__all__ = ["EventConsumer", "declare_forwarding_queue", "forwarding_queue_name"]

logger = logging.getLogger(__name__)

ROUTING_KEYS: Final = (EVENT_ROUTING_KEYS[InstanceStored], EVENT_ROUTING_KEYS[StudyStable])
_RETRY_PAUSE_SECONDS: Final = 1.0
_CHANNEL_GONE: Final = (ChannelInvalidStateError, AMQPChannelError, AMQPConnectionError)
_events: TypeAdapter[InstanceStored | StudyStable] = TypeAdapter(Event)


def forwarding_queue_name(topology: Topology) -> str:
    return topology.forwarding_queue


async def declare_forwarding_queue(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """Declare (idempotently) the forwarding queue and its bindings."""
    queue = await channel.declare_queue(
        forwarding_queue_name(topology), durable=True, arguments={"x-queue-type": "quorum"}
    )
    for key in ROUTING_KEYS:
        await queue.bind(topology.events_exchange, key)
    return queue


def _delivery_count(message: AbstractIncomingMessage) -> int:
    value: Any = (message.headers or {}).get("x-delivery-count", 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class EventConsumer:
    """Consumes the forwarding queue on a channel of its own, handling up to
    ``concurrency`` events at once (each in its own transaction, acked after
    its commit; events of one study serialize on their job's lock)."""

    def __init__(
        self,
        broker: Broker,
        intake: Intake,
        metrics: ForwardMetrics,
        *,
        prefetch: int,
        max_deliveries: int,
        concurrency: int,
    ) -> None:
        self._broker = broker
        self._intake = intake
        self._metrics = metrics
        self._prefetch = prefetch
        self._max_deliveries = max_deliveries
        self._concurrency = concurrency
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def run(self, stop: asyncio.Event) -> None:
        channel = await self._broker.connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await declare_forwarding_queue(channel, self._broker.topology)
            tag = await queue.consume(self._on_message)
            logger.info("consuming events", extra={"queue": queue.name})
            try:
                await self._loop(stop)
            finally:
                with contextlib.suppress(*_CHANNEL_GONE):
                    await queue.cancel(tag)
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*_CHANNEL_GONE):
                    await channel.close()  # unacked deliveries go back to the queue

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    async def _loop(self, stop: asyncio.Event) -> None:
        stopped = asyncio.create_task(stop.wait())
        slots = asyncio.Semaphore(self._concurrency)
        handling: set[asyncio.Task[None]] = set()

        async def handle(message: AbstractIncomingMessage) -> None:
            try:
                await self._handle(message)
            finally:
                slots.release()

        try:
            while not stop.is_set():
                taken = asyncio.create_task(self._buffer.get())
                await asyncio.wait({taken, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not taken.done():
                    taken.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await taken
                    return
                await slots.acquire()
                task = asyncio.create_task(handle(taken.result()))
                handling.add(task)
                task.add_done_callback(handling.discard)
        finally:
            stopped.cancel()
            if handling:  # finish (and ack) what is in hand
                await asyncio.gather(*handling, return_exceptions=True)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            event = _events.validate_json(message.body)
        except ValidationError as exc:
            logger.error("dropping an undecodable event %s: %s", message.message_id, exc)
            self._metrics.events.labels(message.routing_key or "unknown", "dropped").inc()
            await self._settle(message, ack=True)
            return
        try:
            await self._intake.handle(event)
        except Exception as exc:
            deliveries = _delivery_count(message) + 1
            if not is_connection_error(exc) and deliveries >= self._max_deliveries:
                logger.exception("dropping event %s after %d deliveries", message.message_id, deliveries)
                self._metrics.events.labels(message.routing_key or "unknown", "dropped").inc()
                await self._settle(message, ack=True)
                return
            logger.warning(
                "event %s not handled, it goes back to the queue: %r", message.message_id, exc, exc_info=True
            )
            await asyncio.sleep(_RETRY_PAUSE_SECONDS)
            await self._settle(message, ack=False)
            return
        await self._settle(message, ack=True)

    @staticmethod
    async def _settle(message: AbstractIncomingMessage, *, ack: bool) -> None:
        try:
            if ack:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except _CHANNEL_GONE:
            logger.info("event %s not settled: channel gone, it will be redelivered", message.message_id)
