"""Confirmed publishing against the real RabbitMQ: what is routed, what fails."""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import get_current_span

from pacs_common.messaging import (
    Broker,
    IngestConsumer,
    InstanceStored,
    PublishError,
    StudyStable,
    Topology,
    declare_topology,
)
from pacs_common.messaging.topology import INGEST_ROUTING_KEY
from pacs_common.settings import BrokerSettings
from pacs_common.testing.broker import sample_ingest_message


def _instance_stored(index: int = 0) -> InstanceStored:
    ingest = sample_ingest_message(index)
    return InstanceStored(
        sop_class_uid=ingest.sop_class_uid,
        sop_instance_uid=ingest.sop_instance_uid,
        study_instance_uid=ingest.study_instance_uid,
        series_instance_uid=ingest.series_instance_uid,
        patient_id="P1",
        modality="CT",
        outcome="created",
        location=ingest.location,
        source=ingest.source,
    )


async def _wait_for_depth(broker: Broker, queue: str, expected: int, within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    depth = await broker.queue_depth(queue)
    while depth != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        depth = await broker.queue_depth(queue)
    return depth


def test_topology_names_and_arguments() -> None:
    topology = Topology(namespace="ns.", retry_delays_ms=(100, 200), ingest_queue_max_length=5)
    assert topology.ingest_exchange == "ns.pacs.ingest"
    assert topology.ingest_queue == "ns.ingest"
    assert topology.retry_queues == ("ns.ingest.retry.0", "ns.ingest.retry.1")
    assert topology.dead_letter_queue == "ns.ingest.dead"
    assert topology.events_exchange == "ns.pacs.events"
    assert topology.ingest_queue_arguments["x-queue-type"] == "quorum"
    assert topology.ingest_queue_arguments["x-max-length"] == 5
    assert topology.ingest_queue_arguments["x-overflow"] == "reject-publish"
    assert topology.retry_queue_arguments(1)["x-message-ttl"] == 200
    assert topology.events_exchange_arguments == {"alternate-exchange": "ns.pacs.events.unrouted"}
    with pytest.raises(IndexError):
        topology.retry_queue(2)
    unbounded = Topology(namespace="", retry_delays_ms=(1,))
    assert "x-max-length" not in unbounded.ingest_queue_arguments


async def test_declare_topology_is_idempotent(broker: Broker) -> None:
    await declare_topology(broker.channel, broker.topology)
    await declare_topology(broker.channel, broker.topology)
    assert await broker.queue_depth(broker.topology.ingest_queue) == 0


async def test_roundtrip_decodes_and_propagates_trace_context(broker: Broker) -> None:
    tracer = TracerProvider().get_tracer("test")
    message = sample_ingest_message()
    with tracer.start_as_current_span("c-store"):
        trace_id = get_current_span().get_span_context().trace_id
        await broker.publish_ingest(message)

    consumer = IngestConsumer(broker, prefetch=10)
    batches = consumer.batches(max_size=10, max_wait_seconds=0.1)
    async with asyncio.timeout(10):
        batch = await anext(batches)
    assert [d.message for d in batch] == [message]
    delivery = batch[0]
    assert delivery.attempt == 0
    assert delivery.raw.content_type == "application/json"
    assert delivery.raw.message_id == str(message.message_id)
    assert delivery.raw.type == "ingest/1"
    assert delivery.raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert "traceparent" in (delivery.raw.headers or {})
    extracted = get_current_span(delivery.trace_context).get_span_context()
    assert extracted.trace_id == trace_id
    assert extracted.is_remote
    await consumer.ack(batch)
    await consumer.stop()
    await batches.aclose()
    assert await _wait_for_depth(broker, broker.topology.ingest_queue, 0) == 0


async def test_unroutable_ingest_publish_raises(broker: Broker) -> None:
    channel = await broker.connection.channel()
    underlay = await channel.get_underlay_channel()
    await underlay.queue_unbind(
        queue=broker.topology.ingest_queue,
        exchange=broker.topology.ingest_exchange,
        routing_key=INGEST_ROUTING_KEY,
    )
    await channel.close()
    with pytest.raises(PublishError, match="unroutable"):
        await broker.publish_ingest(sample_ingest_message())
    # The publishing channel survives a return.
    assert broker.is_healthy()


async def test_full_ingest_queue_nacks(broker_settings: BrokerSettings) -> None:
    settings = broker_settings.model_copy(update={"ingest_queue_max_length": 1})
    broker = await Broker.connect(settings)
    try:
        accepted = 0
        with pytest.raises(PublishError, match="nack"):
            # Quorum queues on RabbitMQ 3.10 enforce the limit after the
            # message that crosses it, so max_length + 1 may be accepted.
            for index in range(3):
                await broker.publish_ingest(sample_ingest_message(index))
                accepted += 1
        assert 1 <= accepted <= 2
        assert broker.is_healthy()
    finally:
        await broker.close()


async def test_publish_on_closed_connection_raises(broker_settings: BrokerSettings) -> None:
    broker = await Broker.connect(broker_settings)
    await broker.close()
    assert not broker.is_healthy()
    started = time.monotonic()
    with pytest.raises(PublishError, match="not connected"):
        await broker.publish_ingest(sample_ingest_message())
    assert time.monotonic() - started < 1


async def test_events_without_subscribers_are_routable(broker: Broker) -> None:
    await broker.publish_event(_instance_stored())
    assert await _wait_for_depth(broker, broker.topology.events_unrouted_queue, 1) == 1


async def test_publish_events_pipelined_reach_subscriber(broker: Broker) -> None:
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(broker.topology.events_exchange, "instance.stored")
    stable = StudyStable(
        study_instance_uid="1.2.3",
        patient_id=None,
        modalities_in_study=["CT"],
        number_of_series=1,
        number_of_instances=20,
        last_received_at=_instance_stored().created_at,
    )
    await broker.publish_events([*(_instance_stored(i) for i in range(20)), stable])
    received = []
    async with asyncio.timeout(10):
        async with queue.iterator() as iterator:
            async for raw in iterator:
                received.append(json.loads(raw.body)["sop_instance_uid"])
                await raw.ack()
                if len(received) == 20:
                    break
    assert received == [_instance_stored(i).sop_instance_uid for i in range(20)]
    # study.stable had no subscriber: it went to the unrouted sink.
    assert await _wait_for_depth(broker, broker.topology.events_unrouted_queue, 1) == 1
    await channel.close()


async def test_queue_depth_of_missing_queue(broker: Broker) -> None:
    with pytest.raises(LookupError):
        await broker.queue_depth(broker.topology.namespace + "no-such-queue")
    assert broker.is_healthy()
    assert await broker.queue_depth(broker.topology.dead_letter_queue) == 0
