"""How many messages wait in a queue, read with a passive declare.

A connection of its own (not the publishing one): a passive declare of a
queue that does not exist closes the channel it was asked on, and a sampler
must never disturb the channel that carries publisher confirms.  The
connection is opened on first use and again after any failure.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from pacs_common.messaging.topology import Topology
from pacs_common.settings import BrokerSettings

__all__ = ["QueueDepthProbe"]

log = logging.getLogger(__name__)


class QueueDepthProbe:
    """Awaitable: the number of messages ready (not delivered) in one queue.

    ``queue_name`` defaults to the ingest queue of the settings' namespace.
    Raises :class:`LookupError` when the queue does not exist and the
    aio-pika / OS error when the broker cannot be reached.
    """

    def __init__(self, settings: BrokerSettings, queue_name: str | None = None) -> None:
        self._settings = settings
        self.queue_name = queue_name or Topology.from_settings(settings).ingest_queue
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def __call__(self) -> int:
        channel = await self._open_channel()
        try:
            queue = await channel.declare_queue(self.queue_name, passive=True)
        except ChannelNotFoundEntity as exc:
            self._channel = None  # the broker closed it
            raise LookupError(f"queue {self.queue_name!r} does not exist") from exc
        except BaseException:
            await self.close()
            raise
        result = queue.declaration_result
        return int(result.message_count or 0)

    async def _open_channel(self) -> AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            self._channel = None
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                self._connection = await aio_pika.connect(self._settings.url.get_secret_value())
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=False)
        return self._channel

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception:
                log.debug("closing the queue depth connection failed", exc_info=True)
