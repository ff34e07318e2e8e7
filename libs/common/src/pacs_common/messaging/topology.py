"""The RabbitMQ topology of the PACS: names, arguments, declaration.

Everything is declared from one place at start-up, by every process that
talks to the broker, because a robust (auto-reconnecting) aio-pika channel
re-declares after a reconnect only what it declared itself.  Declaring is
idempotent as long as the arguments do not change; changing an argument of
an existing queue makes RabbitMQ refuse the declaration (PRECONDITION_FAILED),
so a change here needs a new queue name or a migration that deletes the queue.

Ingest path (all on one direct exchange, so every hop is a routing key)::

    publisher --"ingest"--> ingest (quorum) --> worker
    worker --"retry.{i}"--> ingest.retry.{i} (quorum, TTL) --expired--> "ingest"
    worker --"dead"--> ingest.dead (quorum)

Events go to a topic exchange whose alternate exchange catches what no
subscriber is bound for yet, so ``mandatory`` publishing never fails just
because nobody listens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractQueue, ExchangeType

from pacs_common.settings import BrokerSettings

INGEST_ROUTING_KEY = "ingest"
DEAD_ROUTING_KEY = "dead"
UNROUTED_EVENTS_MAX_LENGTH = 10_000


def retry_routing_key(index: int) -> str:
    return f"retry.{index}"


@dataclass(frozen=True)
class Topology:
    """Names and arguments of every exchange and queue, under one namespace."""

    namespace: str
    retry_delays_ms: tuple[int, ...]
    ingest_queue_max_length: int | None = None

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> Topology:
        return cls(
            namespace=settings.namespace,
            retry_delays_ms=tuple(settings.retry_delays_ms),
            ingest_queue_max_length=settings.ingest_queue_max_length,
        )

    # -- names -------------------------------------------------------------

    @property
    def ingest_exchange(self) -> str:
        return f"{self.namespace}pacs.ingest"

    @property
    def ingest_queue(self) -> str:
        return f"{self.namespace}ingest"

    def retry_queue(self, index: int) -> str:
        if not 0 <= index < len(self.retry_delays_ms):
            raise IndexError(f"no retry queue {index}: {len(self.retry_delays_ms)} delays")
        return f"{self.namespace}ingest.retry.{index}"

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(self.retry_queue(i) for i in range(len(self.retry_delays_ms)))

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}ingest.dead"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}pacs.events"

    @property
    def events_unrouted_exchange(self) -> str:
        return f"{self.namespace}pacs.events.unrouted"

    @property
    def events_unrouted_queue(self) -> str:
        return f"{self.namespace}events.unrouted"

    # Subscribers of the events exchange: each background service declares
    # and binds its own queue when it starts; named here so that tearing a
    # namespace down removes them too.

    @property
    def forwarding_queue(self) -> str:
        """``instance.stored`` / ``study.stable`` for the routing forwarder."""
        return f"{self.namespace}forwarding"

    @property
    def ai_queue(self) -> str:
        """``study.stable`` for the ai-connector."""
        return f"{self.namespace}ai"

    @property
    def queues(self) -> tuple[str, ...]:
        return (
            self.ingest_queue,
            *self.retry_queues,
            self.dead_letter_queue,
            self.events_unrouted_queue,
            self.forwarding_queue,
            self.ai_queue,
        )

    @property
    def exchanges(self) -> tuple[str, ...]:
        return (self.ingest_exchange, self.events_exchange, self.events_unrouted_exchange)

    # -- arguments ---------------------------------------------------------

    @property
    def ingest_queue_arguments(self) -> dict[str, Any]:
        """Quorum (replicated, at-least-once) queue.

        With a max length, ``reject-publish`` makes a full queue nack new
        publishes, so the receiver answers failure instead of the broker
        dropping work.  The dead-letter exchange is a safety net: anything the
        broker itself dead-letters (e.g. the default delivery limit of
        RabbitMQ 4.x quorum queues) lands in the DLQ instead of vanishing.
        """
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.ingest_exchange,
            "x-dead-letter-routing-key": DEAD_ROUTING_KEY,
        }
        if self.ingest_queue_max_length is not None:
            arguments["x-max-length"] = self.ingest_queue_max_length
            arguments["x-overflow"] = "reject-publish"
        return arguments

    def retry_queue_arguments(self, index: int) -> dict[str, Any]:
        """A queue without consumers: a message waits for the TTL, then the
        broker dead-letters it back to the ingest queue.  One queue per delay
        because TTL expiry only happens at the head of a queue.

        Quorum with at-least-once dead-lettering (RabbitMQ >= 3.10): if the
        ingest queue is full when the TTL expires, the broker holds the message
        and forwards it again after its dead-letter confirm timeout (180 s on
        3.10), where a classic queue would drop it.  That strategy
        requires ``reject-publish`` overflow on this queue."""
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": self.retry_delays_ms[index],
            "x-dead-letter-exchange": self.ingest_exchange,
            "x-dead-letter-routing-key": INGEST_ROUTING_KEY,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    @property
    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"}

    @property
    def events_exchange_arguments(self) -> dict[str, Any]:
        return {"alternate-exchange": self.events_unrouted_exchange}

    @property
    def events_unrouted_queue_arguments(self) -> dict[str, Any]:
        """Bounded sink for events nobody subscribes to: keeps the newest."""
        return {
            "x-queue-type": "classic",
            "x-max-length": UNROUTED_EVENTS_MAX_LENGTH,
            "x-overflow": "drop-head",
        }


async def declare_ingest_queue(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """Declare (idempotently) the ingest queue on ``channel``; consumers use
    it on their own channel so a reconnect restores the queue before the
    consumer, whatever order the channels are restored in."""
    return await channel.declare_queue(
        topology.ingest_queue, durable=True, arguments=topology.ingest_queue_arguments
    )


async def declare_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Declare every exchange, queue and binding; safe to call repeatedly."""
    ingest = await channel.declare_exchange(topology.ingest_exchange, ExchangeType.DIRECT, durable=True)
    ingest_queue = await declare_ingest_queue(channel, topology)
    await ingest_queue.bind(ingest, INGEST_ROUTING_KEY)
    for index, name in enumerate(topology.retry_queues):
        queue = await channel.declare_queue(
            name, durable=True, arguments=topology.retry_queue_arguments(index)
        )
        await queue.bind(ingest, retry_routing_key(index))
    dead = await channel.declare_queue(
        topology.dead_letter_queue,
        durable=True,
        arguments=topology.dead_letter_queue_arguments,
    )
    await dead.bind(ingest, DEAD_ROUTING_KEY)

    unrouted = await channel.declare_exchange(
        topology.events_unrouted_exchange, ExchangeType.FANOUT, durable=True
    )
    unrouted_queue = await channel.declare_queue(
        topology.events_unrouted_queue,
        durable=True,
        arguments=topology.events_unrouted_queue_arguments,
    )
    await unrouted_queue.bind(unrouted, "")
    await channel.declare_exchange(
        topology.events_exchange,
        ExchangeType.TOPIC,
        durable=True,
        arguments=topology.events_exchange_arguments,
    )


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Delete every queue and exchange of ``topology`` (tests, teardown).

    Deleting what does not exist is not an error in RabbitMQ, so this also
    cleans up after a half-declared topology.
    """
    for queue in topology.queues:
        await channel.queue_delete(queue)
    for exchange in topology.exchanges:
        await channel.exchange_delete(exchange)
