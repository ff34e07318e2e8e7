"""Listing and replaying the dead-letter queue against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import get_current_span

from pacs_common.messaging import (
    Broker,
    DeadLetter,
    IngestConsumer,
    list_dead_letters,
    replay_dead_letters,
)
from pacs_common.testing.broker import sample_ingest_message

_tracer = TracerProvider().get_tracer("test")


async def _list_when(broker: Broker, count: int, within: float = 5.0) -> list[DeadLetter]:
    """Messages a listing returned reach a quorum queue asynchronously."""
    deadline = time.monotonic() + within
    while True:
        letters = await list_dead_letters(broker)
        if len(letters) == count or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.05)


async def _dead_letter_all(broker: Broker, count: int) -> list[str]:
    """Publish ``count`` messages and dead-letter them; returns their ids."""
    messages = [sample_ingest_message(i) for i in range(count)]
    with _tracer.start_as_current_span("c-store"):
        for message in messages:
            await broker.publish_ingest(message)
    consumer = IngestConsumer(broker, prefetch=20)
    batches = consumer.batches(max_size=count, max_wait_seconds=1.0)
    async with asyncio.timeout(10):
        batch = await anext(batches)
    assert len(batch) == count
    for delivery in batch:
        await consumer.dead_letter(delivery, f"failed {delivery.message.sop_instance_uid}")
    await consumer.stop()
    await batches.aclose()
    return [str(m.message_id) for m in messages]


async def test_list_leaves_the_queue_as_it_was(broker: Broker) -> None:
    ids = await _dead_letter_all(broker, 3)
    first = await _list_when(broker, 3)
    assert [letter.message_id for letter in first] == ids
    assert all(letter.reason.startswith("failed ") for letter in first)
    assert all(letter.attempts == 1 for letter in first)
    second = await _list_when(broker, 3)
    assert second == first  # nothing lost, same order
    assert len(await list_dead_letters(broker, limit=2)) == 2


async def test_replay_moves_dead_letters_back_to_ingest(broker: Broker) -> None:
    ids = await _dead_letter_all(broker, 3)
    await _list_when(broker, 3)

    assert await replay_dead_letters(broker, message_id=ids[1]) == 1
    remaining = await _list_when(broker, 2)
    assert sorted(letter.message_id for letter in remaining) == sorted([ids[0], ids[2]])
    assert await replay_dead_letters(broker, limit=1) == 1
    await _list_when(broker, 1)
    assert await replay_dead_letters(broker) == 1
    assert await _list_when(broker, 0) == []

    consumer = IngestConsumer(broker, prefetch=20)
    batches = consumer.batches(max_size=3, max_wait_seconds=1.0)
    async with asyncio.timeout(10):
        batch = await anext(batches)
    assert sorted(str(d.message.message_id) for d in batch) == sorted(ids)
    # The attempt counter and failure headers were reset.
    assert all(d.attempt == 0 for d in batch)
    assert all("x-pacs-error" not in (d.raw.headers or {}) for d in batch)
    # ...but the trace context of the original publish travels on.
    trace_ids = {get_current_span(d.trace_context).get_span_context().trace_id for d in batch}
    assert len(trace_ids) == 1
    assert trace_ids != {0}
    await consumer.ack(batch)
    await consumer.stop()
    await batches.aclose()


async def test_replay_of_an_unknown_id_moves_nothing(broker: Broker) -> None:
    await _dead_letter_all(broker, 2)
    await _list_when(broker, 2)
    assert await replay_dead_letters(broker, message_id="no-such-id") == 0
    assert len(await _list_when(broker, 2)) == 2
