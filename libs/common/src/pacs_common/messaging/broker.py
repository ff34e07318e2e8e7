"""A connection to RabbitMQ with confirmed, mandatory publishing.

The ingest contract says a receiver answers success only after the broker
has taken responsibility for the ingest message.  So every publish here waits
for the publisher confirm, is ``mandatory`` (an unroutable message comes back
instead of vanishing) and turns every way of not getting an ack — nack (full
queue), return (no queue bound), timeout, closed channel or connection — into
one exception, :class:`PublishError`, that the caller maps to a failure status.

The connection is robust: after a broker restart aio-pika reconnects and
re-declares what this process declared.  While it is down, publishing fails
fast instead of waiting for the reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelNotFoundEntity
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from pacs_common.messaging.models import (
    EVENT_ROUTING_KEYS,
    IngestMessage,
    InstanceStored,
    StudyStable,
    encode,
)
from pacs_common.messaging.topology import INGEST_ROUTING_KEY, Topology, declare_topology
from pacs_common.messaging.tracecontext import inject_trace_context
from pacs_common.settings import BrokerSettings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("pacs_common.messaging")

CONTENT_TYPE = "application/json"


class PublishError(Exception):
    """The broker did not confirm a message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def build_message(
    body: bytes,
    *,
    message_id: str | None,
    schema: str | None,
    headers: dict[str, Any] | None = None,
) -> aio_pika.Message:
    """A persistent JSON message carrying the current trace context."""
    all_headers: dict[str, Any] = dict(headers or {})
    inject_trace_context(all_headers)
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=schema,
        headers=all_headers,
    )


class Broker:
    """One robust connection and one confirmed publishing channel.

    Consumers open channels of their own on :attr:`connection`, so that
    publishing and consuming do not share flow control or prefetch.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
    ) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.connection = connection
        self.channel = channel
        self._timeout = settings.publish_timeout_seconds

    @classmethod
    async def connect(cls, settings: BrokerSettings, *, declare: bool = True) -> Broker:
        """Connect, open the publishing channel and declare the topology.

        Fails (with the aio-pika/OS error) when the first connection cannot
        be made within ``publish_timeout_seconds``; reconnection is automatic
        only after a first success, every ``reconnect_interval_seconds``.
        """
        connection = await aio_pika.connect_robust(
            settings.url.get_secret_value(),
            timeout=settings.publish_timeout_seconds,
            reconnect_interval=settings.reconnect_interval_seconds,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            broker = cls(settings, connection, channel)
            if declare:
                await declare_topology(channel, broker.topology)
        except BaseException:
            await connection.close()
            raise
        return broker

    # -- publishing --------------------------------------------------------

    async def publish_ingest(self, message: IngestMessage) -> None:
        """Publish an ingest message and wait for the broker's confirm."""
        await self.publish_raw(
            self.topology.ingest_exchange,
            INGEST_ROUTING_KEY,
            build_message(encode(message), message_id=str(message.message_id), schema=message.schema_),
        )

    async def publish_event(self, event: InstanceStored | StudyStable) -> None:
        await self.publish_raw(self.topology.events_exchange, *self._event_args(event))

    async def publish_events(self, events: Sequence[InstanceStored | StudyStable]) -> None:
        """Publish all, then wait for all confirms (one round trip, not one per
        event); raises :class:`PublishError` if any of them failed."""
        results = await asyncio.gather(
            *(self.publish_raw(self.topology.events_exchange, *self._event_args(event)) for event in events),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, PublishError):
                raise failure
        if failures:
            raise PublishError(f"{len(failures)} of {len(events)} events not confirmed; first: {failures[0]}")

    @staticmethod
    def _event_args(event: InstanceStored | StudyStable) -> tuple[str, aio_pika.Message]:
        routing_key = EVENT_ROUTING_KEYS[type(event)]
        body = encode(event)
        return routing_key, build_message(body, message_id=str(event.message_id), schema=event.schema_)

    async def publish_raw(self, exchange_name: str, routing_key: str, message: aio_pika.Message) -> None:
        """Publish an already built :class:`aio_pika.Message` with a confirm.

        Used by the consumer and the DLQ tools to republish a message with
        its body and headers; the trace context already in ``message`` stays.
        """
        with _tracer.start_as_current_span(
            f"{exchange_name} publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation": "publish",
                "messaging.destination.name": exchange_name,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": message.message_id or "",
            },
        ):
            exchange = await self.channel.get_exchange(exchange_name, ensure=False)
            await self._publish_confirmed(exchange, routing_key, message, exchange_name)

    async def _publish_confirmed(
        self,
        exchange: AbstractExchange,
        routing_key: str,
        message: aio_pika.Message,
        exchange_name: str,
    ) -> None:
        where = f"{exchange_name!r} / {routing_key!r}"
        if not self.connection.connected.is_set() or self.channel.is_closed:
            raise PublishError(f"not connected to the broker (publishing to {where})")
        try:
            async with asyncio.timeout(self._timeout):
                result = await exchange.publish(message, routing_key, mandatory=True)
        except TimeoutError:
            raise PublishError(f"no confirm within {self._timeout}s from {where}") from None
        except aiormq.exceptions.PublishError as exc:  # a Basic.Return
            frame = exc.frame
            reply = getattr(frame, "reply_text", "returned")
            raise PublishError(f"unroutable: {reply} ({where})") from exc
        except aiormq.exceptions.DeliveryError as exc:  # a Basic.Nack
            raise PublishError(
                f"rejected by the broker (nack) at {where}: queue full or unavailable"
            ) from exc
        except CONNECTION_EXCEPTIONS as exc:
            raise PublishError(f"channel or connection lost publishing to {where}: {exc!r}") from exc
        if not isinstance(result, aiormq.spec.Basic.Ack):
            raise PublishError(f"unexpected publish result {result!r} from {where}")

    # -- inspection --------------------------------------------------------

    async def queue_depth(self, queue_name: str) -> int:
        """Messages ready in ``queue_name`` (not those delivered and unacked).

        Uses a passive declare on a throwaway channel: a missing queue closes
        the channel it was asked on, and that must not be the publishing one.
        """
        channel = await self.connection.channel(publisher_confirms=False)
        try:
            underlay = await channel.get_underlay_channel()
            result = await underlay.queue_declare(queue_name, passive=True)
        except ChannelNotFoundEntity as exc:
            raise LookupError(f"queue {queue_name!r} does not exist") from exc
        finally:
            if not channel.is_closed:
                await channel.close()
        return int(result.message_count or 0)

    def is_healthy(self) -> bool:
        return self.connection.connected.is_set() and not self.channel.is_closed

    async def close(self) -> None:
        await self.connection.close()
