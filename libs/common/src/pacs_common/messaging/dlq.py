"""Looking at and replaying the ingest dead-letter queue.

Quorum queues cannot be browsed, so listing takes messages with
``basic.get`` and holds them unacked on a channel of its own, then closes that
channel: RabbitMQ puts them all back (on 3.10 ahead of the rest, in their
original order) and nothing is lost even if this process dies half-way.  Closing the channel, rather than nacking, matters on RabbitMQ 4.x,
where an explicit requeue counts toward a quorum queue's delivery limit.

Replaying republishes a copy to the ingest queue with a confirm, and only
then acks the dead letter, so a crash between the two duplicates a message
rather than dropping it.  A replay stops when it meets a message it has
already replayed in the same call (one that failed again at once and came
back), so it cannot loop.

Returned messages reach a quorum queue asynchronously: right after a listing
(or a consumer) put messages back, a new walk may briefly see fewer of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from pacs_common.messaging.broker import Broker
from pacs_common.messaging.consumer import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    ERROR_HEADER,
    FAILED_AT_HEADER,
    LAST_ERROR_HEADER,
    republished_copy,
)
from pacs_common.messaging.topology import INGEST_ROUTING_KEY

_FAILURE_HEADERS = (ATTEMPT_HEADER, ATTEMPTS_HEADER, ERROR_HEADER, FAILED_AT_HEADER, LAST_ERROR_HEADER)


@dataclass
class DeadLetter:
    """What an operator needs to decide about a dead letter."""

    message_id: str
    reason: str
    attempts: int
    failed_at: str | None
    sop_instance_uid: str | None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _x_death(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """The newest x-death entry: set when RabbitMQ itself dead-lettered the
    message (e.g. a delivery limit), not by our consumer."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}


def _sop_instance_uid(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    value = document.get("sop_instance_uid") if isinstance(document, dict) else None
    return value if isinstance(value, str) else None


def describe(raw: AbstractIncomingMessage) -> DeadLetter:
    headers: Mapping[str, Any] = raw.headers or {}
    death = _x_death(headers)
    reason = _text(headers.get(ERROR_HEADER)) or _text(death.get("reason")) or "unknown"
    try:
        attempts = int(headers.get(ATTEMPTS_HEADER, death.get("count", 0)))
    except (TypeError, ValueError):
        attempts = 0
    return DeadLetter(
        message_id=raw.message_id or "",
        reason=reason,
        attempts=attempts,
        failed_at=_text(headers.get(FAILED_AT_HEADER)) or _text(death.get("time")),
        sop_instance_uid=_sop_instance_uid(raw.body),
    )


async def _open_dead_letter_queue(broker: Broker) -> tuple[AbstractRobustChannel, AbstractQueue]:
    channel = await broker.connection.channel(publisher_confirms=False)
    topology = broker.topology
    queue = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments=topology.dead_letter_queue_arguments
    )
    return channel, queue


async def list_dead_letters(broker: Broker, limit: int = 100) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first; the queue is left as it was."""
    channel, queue = await _open_dead_letter_queue(broker)
    letters: list[DeadLetter] = []
    try:
        while len(letters) < limit:
            raw = await queue.get(no_ack=False, fail=False)
            if raw is None:
                break
            letters.append(describe(raw))
    finally:
        await channel.close()  # returns every message taken
    return letters


async def replay_dead_letters(
    broker: Broker, *, limit: int | None = None, message_id: str | None = None
) -> int:
    """Move dead letters (all, the first ``limit``, or those with
    ``message_id``) back to the ingest queue with a fresh attempt counter;
    returns how many were moved.  Raises PublishError if a republish fails
    (that message and the rest stay in the DLQ)."""
    channel, queue = await _open_dead_letter_queue(broker)
    replayed: set[str] = set()
    moved = 0
    try:
        while limit is None or moved < limit:
            raw = await queue.get(no_ack=False, fail=False)
            if raw is None:
                break
            if message_id is not None and raw.message_id != message_id:
                continue  # stays unacked until the channel closes
            if raw.message_id is not None and raw.message_id in replayed:
                break  # failed again and came back during this walk
            copy = republished_copy(raw, drop_headers=_FAILURE_HEADERS)
            await broker.publish_raw(broker.topology.ingest_exchange, INGEST_ROUTING_KEY, copy)
            await raw.ack()
            moved += 1
            if raw.message_id is not None:
                replayed.add(raw.message_id)
    finally:
        await channel.close()
    return moved
