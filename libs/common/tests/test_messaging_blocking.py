"""The thread-facing publisher: concurrency, failures that must not hang, and
recovery after the connection to the broker is lost (through a local TCP
proxy we can cut, since the shared broker must not be restarted)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import get_current_span
from pydantic import SecretStr
from yarl import URL

from pacs_common.messaging import BlockingPublisher, Broker, IngestConsumer, PublishError
from pacs_common.settings import BrokerSettings
from pacs_common.testing.broker import TcpProxy, free_port, sample_ingest_message, settings_via_proxy

_tracer = TracerProvider().get_tracer("test")


async def _depth(broker: Broker, expected: int, within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    depth = await broker.queue_depth(broker.topology.ingest_queue)
    while depth < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        depth = await broker.queue_depth(broker.topology.ingest_queue)
    return depth


async def test_publishes_from_many_threads(broker: Broker, broker_settings: BrokerSettings) -> None:
    publisher = BlockingPublisher(broker_settings)
    await asyncio.to_thread(publisher.start)
    assert publisher.is_healthy()
    trace_ids: dict[str, int] = {}

    def publish(index: int) -> None:
        message = sample_ingest_message(index)
        with _tracer.start_as_current_span("c-store"):
            trace_ids[message.sop_instance_uid] = get_current_span().get_span_context().trace_id
            publisher.publish_ingest(message)

    def publish_all() -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(publish, range(80)))

    try:
        await asyncio.to_thread(publish_all)
    finally:
        await asyncio.to_thread(publisher.stop)
    assert not publisher.is_healthy()

    consumer = IngestConsumer(broker, prefetch=100)
    batches = consumer.batches(max_size=80, max_wait_seconds=2.0)
    async with asyncio.timeout(10):
        batch = await anext(batches)
    assert len(batch) == 80
    # Each message continues the trace of the thread that published it.
    for delivery in batch:
        extracted = get_current_span(delivery.trace_context).get_span_context().trace_id
        assert extracted == trace_ids[delivery.message.sop_instance_uid]
    await consumer.ack(batch)
    await consumer.stop()
    await batches.aclose()


async def test_unreachable_broker_raises_quickly(broker_settings: BrokerSettings) -> None:
    settings = broker_settings.model_copy(
        update={"url": SecretStr(f"amqp://guest:guest@127.0.0.1:{free_port()}/")}
    )
    publisher = BlockingPublisher(settings)
    started = time.monotonic()
    with pytest.raises(PublishError, match="cannot connect"):
        await asyncio.to_thread(publisher.start)
    assert time.monotonic() - started < settings.publish_timeout_seconds
    with pytest.raises(PublishError, match="not started"):
        publisher.publish_ingest(sample_ingest_message())
    assert not publisher.is_healthy()
    publisher.stop()


async def test_wrong_credentials_raise(broker_settings: BrokerSettings) -> None:
    url = URL(broker_settings.url.get_secret_value()).with_user("nobody").with_password("wrong")
    publisher = BlockingPublisher(broker_settings.model_copy(update={"url": SecretStr(str(url))}))
    with pytest.raises(PublishError):
        await asyncio.to_thread(publisher.start)


async def test_recovers_after_losing_the_broker(
    broker: Broker, broker_settings: BrokerSettings, amqp_proxy: TcpProxy
) -> None:
    publisher = BlockingPublisher(settings_via_proxy(broker_settings, amqp_proxy))
    await asyncio.to_thread(publisher.start)
    try:
        await asyncio.to_thread(publisher.publish_ingest, sample_ingest_message(0))
        amqp_proxy.cut()
        started = time.monotonic()
        with pytest.raises(PublishError):
            await asyncio.to_thread(publisher.publish_ingest, sample_ingest_message(1))
        assert time.monotonic() - started < broker_settings.publish_timeout_seconds
        # While it is down, publishing fails at once instead of waiting.
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(PublishError):
            await asyncio.to_thread(publisher.publish_ingest, sample_ingest_message(2))
        assert time.monotonic() - started < 0.5
        assert not publisher.is_healthy()

        amqp_proxy.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                await asyncio.to_thread(publisher.publish_ingest, sample_ingest_message(3))
                break
            except PublishError:
                assert time.monotonic() < deadline, "no reconnect within 15 s"
                await asyncio.sleep(0.1)
        assert publisher.is_healthy()
    finally:
        await asyncio.to_thread(publisher.stop)
    # Messages 0 and 3 were confirmed (1 may or may not have made it).
    assert await _depth(broker, 2) >= 2


async def test_stalled_broker_times_out(broker_settings: BrokerSettings, amqp_proxy: TcpProxy) -> None:
    publisher = BlockingPublisher(settings_via_proxy(broker_settings, amqp_proxy))
    await asyncio.to_thread(publisher.start)
    try:
        amqp_proxy.stall()
        started = time.monotonic()
        with pytest.raises(PublishError, match="no confirm"):
            await asyncio.to_thread(publisher.publish_ingest, sample_ingest_message(), 0.5)
        assert time.monotonic() - started < 2.0
    finally:
        amqp_proxy.unstall()
        await asyncio.to_thread(publisher.stop)
