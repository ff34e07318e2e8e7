"""The forwarder as one coroutine, started by the prefetch-scheduler's main.

:func:`run_forwarder` reads ``PACS_FORWARD_*`` (:class:`ForwardSettings`),
connects to the broker itself, and runs until ``stop``: the event consumer
(rules → ``forward_item`` rows) and the dispatcher (rows → C-STORE).  It
keeps no state that matters outside PostgreSQL, so any number of replicas
may run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Final

import asyncpg
from prometheus_client import CollectorRegistry
from pynetdicom import _config as pynetdicom_config

from pacs_common.messaging.broker import Broker
from pacs_common.nodes import tls_client_context
from pacs_common.resilience import Dependencies
from pacs_common.settings import BrokerSettings
from pacs_common.startup import until_connected
from pacs_common.storage import StorageRegistry
from prefetch_scheduler.forwarding.dispatcher import Dispatcher
from prefetch_scheduler.forwarding.events import EventConsumer
from prefetch_scheduler.forwarding.files import InstanceFiles
from prefetch_scheduler.forwarding.intake import Intake
from prefetch_scheduler.forwarding.metrics import ForwardMetrics
from prefetch_scheduler.forwarding.queue import ForwardQueue
from prefetch_scheduler.forwarding.sender import BatchSender
from prefetch_scheduler.forwarding.settings import ForwardSettings

__all__ = ["run_forwarder"]

logger = logging.getLogger(__name__)

_STOP_GRACE_SECONDS: Final = 60.0


def _ssl_context(settings: ForwardSettings) -> ssl.SSLContext | None:
    try:
        return tls_client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        logger.error("no TLS context for forwarding (nodes marked tls cannot be sent to): %s", exc)
        return None


async def run_forwarder(
    pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    storage: StorageRegistry,
    registry: CollectorRegistry,
    stop: asyncio.Event,
    *,
    settings: ForwardSettings | None = None,
    breakers: Dependencies | None = None,
) -> None:
    """Consume events and forward instances until ``stop`` is set.

    ``settings`` defaults to the environment (``PACS_FORWARD_*``); tests
    pass their own.
    """
    settings = settings or ForwardSettings()
    if not settings.enabled:
        logger.info("forwarding disabled (PACS_FORWARD_ENABLED=false)")
        await stop.wait()
        return
    # Send stored files as they are (byte-identical, streamed); process-wide.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    metrics = ForwardMetrics(registry)
    broker = await until_connected("broker", lambda: Broker.connect(broker_settings), stop)
    if broker is None:
        return
    try:
        queue = ForwardQueue(
            pool,
            lease_seconds=settings.lease_seconds,
            concurrency_per_destination=settings.concurrency_per_destination,
        )
        sender = BatchSender(
            settings, InstanceFiles(storage, settings.spool_dir), metrics, _ssl_context(settings)
        )
        consumer = EventConsumer(
            broker,
            Intake(pool, metrics),
            metrics,
            prefetch=settings.event_prefetch,
            max_deliveries=settings.max_event_deliveries,
            concurrency=settings.event_concurrency,
        )
        dispatcher = Dispatcher(pool, queue, sender, settings, metrics, breakers=breakers)
        tasks = [
            asyncio.create_task(consumer.run(stop), name="forward-events"),
            asyncio.create_task(dispatcher.run(stop), name="forward-dispatcher"),
        ]
        logger.info(
            "forwarder running",
            extra={"ae_title": settings.ae_title, "batch_size": settings.batch_size},
        )
        try:
            await _supervise(tasks, stop)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await broker.close()
        logger.info("forwarder stopped")


async def _supervise(tasks: list[asyncio.Task[None]], stop: asyncio.Event) -> None:
    """Wait for ``stop``; a part that ended by itself before is an error."""
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped and not stop.is_set():
                task.result()  # raise what ended it
                raise RuntimeError(f"{task.get_name()} ended before stop")
        # Let both parts finish what they hold.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), _STOP_GRACE_SECONDS)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                logger.error("%s failed while stopping", task.get_name(), exc_info=task.exception())
    finally:
        stopped.cancel()
