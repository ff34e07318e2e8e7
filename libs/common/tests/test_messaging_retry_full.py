"""A retry whose delay expires while the ingest queue is full is not lost:
the broker holds it (at-least-once dead-lettering) and forwards it once there
is room."""

from __future__ import annotations

import asyncio
import time

from pacs_common.messaging import Broker, PublishError
from pacs_common.messaging.broker import build_message
from pacs_common.messaging.models import encode
from pacs_common.messaging.topology import retry_routing_key
from pacs_common.settings import BrokerSettings
from pacs_common.testing.broker import sample_ingest_message

# RabbitMQ holds a message whose dead-lettering target refused it and tries
# again after its dead-letter confirm timeout (3 minutes by default on 3.10).
RECOVERY_SECONDS = 240


async def _depth(broker: Broker, queue: str) -> int:
    return await broker.queue_depth(queue)


async def test_retry_waits_while_ingest_queue_is_full(broker_settings: BrokerSettings) -> None:
    settings = broker_settings.model_copy(update={"ingest_queue_max_length": 1, "retry_delays_ms": [100]})
    broker = await Broker.connect(settings)
    try:
        # fill the ingest queue until the broker refuses more
        for index in range(5):
            try:
                await broker.publish_ingest(sample_ingest_message(index))
            except PublishError:
                break
        else:
            raise AssertionError("the bounded ingest queue never refused a publish")

        retried = sample_ingest_message(99)
        await broker.publish_raw(
            broker.topology.ingest_exchange,
            retry_routing_key(0),
            build_message(encode(retried), message_id=str(retried.message_id), schema=retried.schema_),
        )
        await asyncio.sleep(1.0)  # ten times the retry delay

        # make room: the retried message moves on into the ingest queue
        channel = await broker.connection.channel()
        queue = await channel.get_queue(broker.topology.ingest_queue, ensure=False)
        received: list[str] = []
        deadline = time.monotonic() + RECOVERY_SECONDS
        while str(retried.message_id) not in received:
            assert time.monotonic() < deadline, "the retried message never reached the ingest queue"
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            received.append(str(message.message_id))
            await message.ack()
        await channel.close()
    finally:
        await broker.close()
