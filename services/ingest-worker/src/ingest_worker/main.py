"""The ingest worker: settings → pool → storage → broker → indexer.

``main()`` is the process entry point (``ingest-worker`` / ``python -m
ingest_worker``); :func:`run` is the same service as a coroutine, which the
tests start in-process.  SIGTERM or SIGINT stops it gracefully: no new
batch is taken, the batch in hand is committed, published and acked, then
connections close.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from dataclasses import dataclass, field
from typing import Final

import asyncpg
from prometheus_client import CollectorRegistry

from ingest_worker.indexer import BatchIndexer, IndexerConfig, StorageResolver
from ingest_worker.metrics import WorkerMetrics, watch_queue_depth
from ingest_worker.stable import StableAnnouncer
from pacs_common.db.index import InstanceIndex
from pacs_common.db.pool import create_pool
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.consumer import IngestConsumer
from pacs_common.resilience import Dependencies
from pacs_common.settings import (
    BrokerSettings,
    DatabaseSettings,
    StorageTiersSettings,
    TelemetrySettings,
    WorkerSettings,
)
from pacs_common.shutdown import CLOSING_RESERVE_SECONDS, GracePeriod, ShutdownSettings, stop_http
from pacs_common.startup import install_stop_signals, until_connected
from pacs_common.storage import StorageRegistry
from pacs_common.telemetry import (
    HttpTlsSettings,
    configure_logging,
    configure_tracing,
    create_observability_app,
    report_stopping,
    serve_http,
)

__all__ = ["SERVICE", "WorkerServices", "main", "run"]

SERVICE: Final = "ingest-worker"

logger = logging.getLogger(__name__)


@dataclass
class WorkerServices:
    """What the running worker holds; filled in as connections come up (the
    readiness checks look here)."""

    pool: asyncpg.Pool | None = None
    broker: Broker | None = None
    storage: StorageResolver | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # The port the HTTP endpoints listen on (the one asked for, or the one
    # the system chose for port 0).
    http_port: int | None = None


async def run(
    worker_settings: WorkerSettings,
    database_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    *,
    storage: StorageResolver | None = None,
    stop: asyncio.Event | None = None,
    services: WorkerServices | None = None,
    handle_signals: bool = False,
) -> None:
    """Run the worker until ``stop`` is set (or, with ``handle_signals``,
    until SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    services = services or WorkerServices()
    if handle_signals:
        install_stop_signals(stop)
    metrics = WorkerMetrics(services.registry)

    async def database_ready() -> bool:
        if services.pool is None:
            return False
        async with services.pool.acquire(timeout=2.0) as connection:
            return bool(await connection.fetchval("SELECT true"))

    async def broker_ready() -> bool:
        return services.broker is not None and services.broker.is_healthy()

    async def storage_ready() -> bool:
        # The tier ingest reads from answers (a missing probe key is fine).
        if services.storage is None:
            return False
        await asyncio.to_thread(services.storage.get("hot").stat, ".pacs-readiness-probe")
        return True

    app = create_observability_app(
        SERVICE,
        {"database": database_ready, "broker": broker_ready, "storage": storage_ready},
        services.registry,
    )
    report_stopping(app, stop)  # readiness says "stopping" from the SIGTERM on
    server = await serve_http(
        app, worker_settings.http_host, worker_settings.http_port, tls=HttpTlsSettings()
    )
    services.http_port = int(server.servers[0].sockets[0].getsockname()[1])
    owned_storage: StorageRegistry | None = None
    try:
        services.pool = await until_connected(
            "database", lambda: create_pool(database_settings, application_name=SERVICE), stop
        )
        services.broker = await until_connected("broker", lambda: Broker.connect(broker_settings), stop)
        if services.pool is None or services.broker is None:
            return
        if storage is None:
            # Every configured tier (PACS_STORAGE_TIERS): ingest writes to hot,
            # but a message may name any tier the index knows.
            dependencies = Dependencies()  # retries and circuit breakers of the storage tiers
            services.registry.register(dependencies)
            owned_storage = StorageRegistry.from_settings(
                StorageTiersSettings().tiers, dependencies=dependencies
            )
            storage = owned_storage
        services.storage = storage
        await _serve(worker_settings, services.pool, services.broker, storage, metrics, stop)
    finally:
        await stop_http(server, 1.0)
        if services.broker is not None:
            await services.broker.close()
        if services.pool is not None:
            await services.pool.close()
        if owned_storage is not None:
            owned_storage.close()
        logger.info("ingest worker stopped")


async def _serve(  # noqa: PLR0917 - the wiring, in one place
    settings: WorkerSettings,
    pool: asyncpg.Pool,
    broker: Broker,
    storage: StorageResolver,
    metrics: WorkerMetrics,
    stop: asyncio.Event,
) -> None:
    index = InstanceIndex(pool)
    indexer = BatchIndexer(
        index=index,
        storage=storage,
        broker=broker,
        consumer=IngestConsumer(broker, prefetch=max(settings.prefetch, settings.batch_size)),
        config=IndexerConfig(
            batch_size=settings.batch_size,
            batch_wait_seconds=settings.batch_wait_ms / 1000,
            duplicate_policy=settings.duplicate_policy,
            bulk_data_threshold=settings.bulk_data_threshold_bytes,
        ),
        metrics=metrics,
    )
    announcer = StableAnnouncer(
        index,
        broker,
        metrics,
        quiet_seconds=settings.study_stable_seconds,
        interval_seconds=settings.stable_check_interval_seconds,
    )
    background_stop = asyncio.Event()
    indexing = asyncio.create_task(indexer.run(), name="indexer")
    background = [
        asyncio.create_task(announcer.run(background_stop), name="stable-announcer"),
        asyncio.create_task(watch_queue_depth(broker, metrics, background_stop), name="queue-depth"),
    ]
    logger.info(
        "ingest worker consuming",
        extra={
            "queue": broker.topology.ingest_queue,
            "batch_size": settings.batch_size,
            "duplicate_policy": str(settings.duplicate_policy),
        },
    )
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({indexing, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if indexing.done():
            indexing.result()  # the consumer loop ended by itself: surface why
        logger.info("stopping: finishing the batch in hand")
        grace = GracePeriod(ShutdownSettings().grace_seconds)
        try:
            await asyncio.wait_for(indexer.stop(), grace.remaining(reserve=CLOSING_RESERVE_SECONDS))
            await asyncio.wait_for(indexing, grace.remaining(reserve=CLOSING_RESERVE_SECONDS))
        except TimeoutError:
            # Never acked: the batch returns to the queue when the channel closes.
            logger.warning("grace period over: the batch in hand is left to be redelivered")
    finally:
        stopped.cancel()
        background_stop.set()
        for task in (indexing, *background):
            if not task.done():
                task.cancel()
        await asyncio.gather(indexing, *background, return_exceptions=True)


def main() -> None:
    worker_settings = WorkerSettings()
    database_settings = DatabaseSettings()
    broker_settings = BrokerSettings()
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    # pydicom warns (and logs) about every odd value it reads; the parser
    # reports what it could not keep, per instance, in one log line.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    asyncio.run(run(worker_settings, database_settings, broker_settings, handle_signals=True))
