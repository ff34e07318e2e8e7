"""Consuming ``study.stable`` events from a queue of the connector's own.

The queue ``{namespace}ai`` (durable, quorum) is bound to the events
exchange with the ``study.stable`` routing key, so every replica shares one
stream of events and each event is handled by one replica (a redelivered
one is harmless: request creation is idempotent).  A delivery is acked only
after the handler committed; a handler failure (the database is down)
requeues it after a pause.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, ExchangeType
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from pacs_common.messaging.broker import Broker
from pacs_common.messaging.models import EVENT_ROUTING_KEYS, StudyStable
from pacs_common.messaging.tracecontext import extract_trace_context

__all__ = ["STUDY_STABLE_ROUTING_KEY", "StableEventConsumer", "ai_queue_name"]

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("ai_connector")

STUDY_STABLE_ROUTING_KEY: Final = EVENT_ROUTING_KEYS[StudyStable]
_REQUEUE_PAUSE_SECONDS: Final = 1.0

Handler = Callable[[StudyStable], Awaitable[None]]


def ai_queue_name(broker: Broker) -> str:
    return broker.topology.ai_queue


class StableEventConsumer:
    def __init__(
        self,
        broker: Broker,
        handler: Handler,
        *,
        prefetch: int,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self._broker = broker
        self._handler = handler
        self._prefetch = prefetch
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._channel: AbstractRobustChannel | None = None
        self._consumer_tag: str | None = None

    async def start(self) -> None:
        topology = self._broker.topology
        channel = await self._broker.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self._prefetch)
        exchange = await channel.declare_exchange(
            topology.events_exchange,
            ExchangeType.TOPIC,
            durable=True,
            arguments=topology.events_exchange_arguments,
        )
        queue = await channel.declare_queue(
            ai_queue_name(self._broker), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, STUDY_STABLE_ROUTING_KEY)
        self._channel = channel
        self._consumer_tag = await queue.consume(self._on_message)
        logger.info("consuming study.stable", extra={"queue": queue.name})

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = StudyStable.model_validate_json(message.body)
        except ValidationError as exc:
            logger.error("undecodable study.stable event dropped: %s", exc)
            self._on_outcome("invalid")
            await message.reject(requeue=False)
            return
        token = otel_context.attach(extract_trace_context(message.headers))
        try:
            with _tracer.start_as_current_span(
                f"{STUDY_STABLE_ROUTING_KEY} process",
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "pacs.study_instance_uid": event.study_instance_uid,
                },
            ):
                await self._handler(event)
        except Exception:
            logger.exception("handling study.stable of %s failed; requeued", event.study_instance_uid)
            self._on_outcome("requeued")
            await asyncio.sleep(_REQUEUE_PAUSE_SECONDS)
            await message.nack(requeue=True)
            return
        finally:
            otel_context.detach(token)
        self._on_outcome("handled")
        await message.ack()

    async def stop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await channel.close()
