"""The ingest consumer against the real RabbitMQ: batching, redelivery,
retries through the delay queues, dead-lettering and poison messages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aio_pika

from pacs_common.messaging import (
    Broker,
    Delivery,
    IngestConsumer,
    SettleOutcome,
    list_dead_letters,
)
from pacs_common.messaging.broker import build_message
from pacs_common.messaging.topology import INGEST_ROUTING_KEY
from pacs_common.settings import BrokerSettings
from pacs_common.testing.broker import TcpProxy, sample_ingest_message, settings_via_proxy


async def _next(batches: AsyncIterator[list[Delivery]], within: float = 10.0) -> list[Delivery]:
    async with asyncio.timeout(within):
        return await anext(batches)


async def _dead_letters_when(broker: Broker, count: int, within: float = 5.0) -> list[str]:
    """Reasons in the DLQ once it holds ``count`` messages."""
    deadline = time.monotonic() + within
    while True:
        letters = await list_dead_letters(broker)
        if len(letters) >= count or time.monotonic() > deadline:
            return [letter.reason for letter in letters]
        await asyncio.sleep(0.05)


async def test_batches_fill_up_to_max_size(broker: Broker) -> None:
    messages = [sample_ingest_message(i) for i in range(7)]
    for message in messages:
        await broker.publish_ingest(message)
    consumer = IngestConsumer(broker, prefetch=50)
    batches = consumer.batches(max_size=5, max_wait_seconds=2.0)
    first = await _next(batches)
    second = await _next(batches)
    assert len(first) == 5
    assert len(second) == 2  # the rest, after max_wait
    assert [d.message for d in first + second] == messages
    await consumer.ack(first + second)
    await consumer.stop()
    await batches.aclose()


async def test_batch_is_yielded_after_max_wait(broker: Broker) -> None:
    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=100, max_wait_seconds=0.2)
    waiting = asyncio.ensure_future(_next(batches))
    await asyncio.sleep(0.1)
    published = time.monotonic()
    await broker.publish_ingest(sample_ingest_message())
    batch = await waiting
    elapsed = time.monotonic() - published
    assert len(batch) == 1
    assert 0.15 < elapsed < 2.0
    await consumer.ack(batch)
    await consumer.stop()
    await batches.aclose()


async def test_unacked_delivery_comes_back_redelivered(broker: Broker) -> None:
    message = sample_ingest_message()
    await broker.publish_ingest(message)
    first = IngestConsumer(broker, prefetch=10)
    first_batches = first.batches(max_size=10, max_wait_seconds=0.05)
    [delivery] = await _next(first_batches)
    assert not delivery.raw.redelivered
    await first.stop()  # closes its channel without an ack
    await first_batches.aclose()

    second = IngestConsumer(broker, prefetch=10)
    second_batches = second.batches(max_size=10, max_wait_seconds=0.05)
    [again] = await _next(second_batches)
    assert again.message == message
    assert again.raw.redelivered
    assert again.attempt == 0
    await second.ack([again])
    await second.stop()
    await second_batches.aclose()


async def test_stop_requeues_buffered_deliveries(broker: Broker) -> None:
    for index in range(4):
        await broker.publish_ingest(sample_ingest_message(index))
    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=1, max_wait_seconds=0.05)
    [first] = await _next(batches)
    await consumer.ack([first])
    await asyncio.sleep(0.2)  # the other three arrive in the buffer
    await consumer.stop()
    await batches.aclose()

    again = IngestConsumer(broker, prefetch=10)
    again_batches = again.batches(max_size=10, max_wait_seconds=0.3)
    rest = await _next(again_batches)
    assert sorted(d.message.sop_instance_uid for d in rest) == sorted(
        sample_ingest_message(i).sop_instance_uid for i in range(1, 4)
    )
    await again.ack(rest)
    await again.stop()
    await again_batches.aclose()


async def test_retry_walks_the_delay_queues_then_dead_letters(broker: Broker) -> None:
    delays = broker.topology.retry_delays_ms
    assert delays == (100, 200)
    message = sample_ingest_message()
    await broker.publish_ingest(message)
    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=10, max_wait_seconds=0.01)

    seen: list[tuple[int, float]] = []
    outcomes: list[SettleOutcome] = []
    for _ in range(len(delays) + 1):
        [delivery] = await _next(batches)
        assert delivery.message == message
        seen.append((delivery.attempt, time.monotonic()))
        outcomes.append(await consumer.retry_later(delivery, f"boom {delivery.attempt}"))
        if delivery.attempt:
            headers = delivery.raw.headers or {}
            assert headers["x-pacs-last-error"] == f"boom {delivery.attempt - 1}"

    assert [attempt for attempt, _ in seen] == [0, 1, 2]
    # Each retry waited at least its queue's TTL.
    for (_, before), (_, after), delay in zip(seen, seen[1:], delays, strict=False):
        assert after - before >= delay / 1000 * 0.9
    assert outcomes == [SettleOutcome.RETRIED, SettleOutcome.RETRIED, SettleOutcome.DEAD_LETTERED]

    letters = await list_dead_letters(broker)
    assert len(letters) == 1
    assert letters[0].reason == "boom 2"
    assert letters[0].attempts == 3
    assert letters[0].message_id == str(message.message_id)
    assert letters[0].sop_instance_uid == message.sop_instance_uid
    assert letters[0].failed_at is not None
    await consumer.stop()
    await batches.aclose()
    for queue in (broker.topology.ingest_queue, *broker.topology.retry_queues):
        assert await broker.queue_depth(queue) == 0


async def test_dead_letter_goes_straight_to_the_dlq(broker: Broker) -> None:
    await broker.publish_ingest(sample_ingest_message())
    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=10, max_wait_seconds=0.01)
    [delivery] = await _next(batches)
    assert await consumer.dead_letter(delivery, "not a DICOM file") == SettleOutcome.DEAD_LETTERED
    assert await _dead_letters_when(broker, 1) == ["not a DICOM file"]
    await consumer.stop()
    await batches.aclose()


async def test_poison_messages_go_to_the_dlq_and_are_not_yielded(broker: Broker) -> None:
    exchange = broker.topology.ingest_exchange
    await broker.publish_raw(
        exchange, INGEST_ROUTING_KEY, build_message(b"{not json", message_id="bad-json", schema=None)
    )
    unknown = json.loads(sample_ingest_message(1).model_dump_json(by_alias=True))
    unknown["schema"] = "ingest/99"
    await broker.publish_raw(
        exchange,
        INGEST_ROUTING_KEY,
        build_message(json.dumps(unknown).encode(), message_id="unknown-schema", schema="ingest/99"),
    )
    good = sample_ingest_message(2)
    await broker.publish_ingest(good)

    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=10, max_wait_seconds=0.2)
    batch = await _next(batches)
    assert [d.message for d in batch] == [good]
    await consumer.ack(batch)

    letters = {letter.message_id: letter for letter in await list_dead_letters(broker)}
    assert set(letters) == {"bad-json", "unknown-schema"}
    assert all("undecodable" in letter.reason for letter in letters.values())
    assert letters["unknown-schema"].sop_instance_uid == sample_ingest_message(1).sop_instance_uid
    assert letters["bad-json"].sop_instance_uid is None
    await consumer.stop()
    await batches.aclose()


async def test_failed_republish_requeues_instead_of_losing(broker: Broker) -> None:
    message = sample_ingest_message()
    await broker.publish_ingest(message)
    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=10, max_wait_seconds=0.01)
    [delivery] = await _next(batches)
    # Make the retry queue unroutable: the republish is returned.
    channel = await broker.connection.channel()
    underlay = await channel.get_underlay_channel()
    await underlay.queue_unbind(
        queue=broker.topology.retry_queue(0),
        exchange=broker.topology.ingest_exchange,
        routing_key="retry.0",
    )
    await channel.close()
    assert await consumer.retry_later(delivery, "db down") == SettleOutcome.REQUEUED
    [again] = await _next(batches)
    assert again.message == message
    assert again.raw.redelivered
    assert again.attempt == 0
    await consumer.ack([again])
    await consumer.stop()
    await batches.aclose()


async def test_ack_on_a_closed_channel_is_tolerated(broker: Broker) -> None:
    await broker.publish_ingest(sample_ingest_message())
    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=10, max_wait_seconds=0.01)
    batch = await _next(batches)
    await consumer.stop()
    await consumer.ack(batch)  # nothing to do: the broker requeued it
    await batches.aclose()
    assert isinstance(batch[0].raw, aio_pika.abc.AbstractIncomingMessage)


async def test_consumer_resumes_after_connection_loss(
    broker_settings: BrokerSettings, amqp_proxy: TcpProxy
) -> None:
    broker = await Broker.connect(settings_via_proxy(broker_settings, amqp_proxy))
    try:
        first = sample_ingest_message(0)
        await broker.publish_ingest(first)
        consumer = IngestConsumer(broker, prefetch=10)
        batches = consumer.batches(max_size=10, max_wait_seconds=0.05)
        [delivery] = await _next(batches)

        amqp_proxy.cut()
        await asyncio.sleep(0.3)
        await consumer.ack([delivery])  # too late: the channel is gone
        amqp_proxy.start()

        # The unacked delivery comes back on the restored consumer...
        [again] = await _next(batches, within=15)
        assert again.message == first
        assert again.raw.redelivered
        await consumer.ack([again])
        # ...and new messages keep flowing.
        second = sample_ingest_message(1)
        await broker.publish_ingest(second)
        [fresh] = await _next(batches)
        assert fresh.message == second
        await consumer.ack([fresh])
        await consumer.stop()
        await batches.aclose()
        assert await broker.queue_depth(broker.topology.ingest_queue) == 0
    finally:
        await broker.close()
