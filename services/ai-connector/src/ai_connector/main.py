"""The ai-connector: settings → pool → broker → storage → intake, worker, callback.

``main()`` is the process entry point (``ai-connector`` / ``python -m
ai_connector``); :func:`run` is the same service as a coroutine, which the
tests start in-process.  Stateless: any number of replicas share the work
through PostgreSQL (requests) and RabbitMQ (events).  SIGTERM or SIGINT
stops consuming and claiming; attempts in hand finish first.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import asyncpg
import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from ai_connector.consumer import StableEventConsumer
from ai_connector.http import add_callback_route
from ai_connector.intake import StudyIntake
from ai_connector.metrics import ConnectorMetrics
from ai_connector.request_store import RequestStore
from ai_connector.results import ResultStorer
from ai_connector.settings import ConnectorSettings
from ai_connector.worker import AiWorker
from pacs_common.db.pool import create_pool
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.models import IngestMessage, StudyStable
from pacs_common.receiving import InstanceReceiver
from pacs_common.resilience import Dependencies
from pacs_common.settings import BrokerSettings, DatabaseSettings, TelemetrySettings
from pacs_common.shutdown import CLOSING_RESERVE_SECONDS, ShutdownSettings, finish_within_grace, stop_http
from pacs_common.startup import install_stop_signals, until_connected
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.telemetry import (
    HttpTlsSettings,
    configure_logging,
    configure_tracing,
    create_observability_app,
    serve_http,
)

__all__ = ["SERVICE", "ConnectorServices", "main", "run"]

SERVICE: Final = "ai-connector"
HOT: Final = "hot"
_PUBLISH_SLACK_SECONDS: Final = 5.0
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})

logger = logging.getLogger(__name__)


@dataclass
class ConnectorServices:
    """What the running connector holds (the readiness checks look here)."""

    pool: asyncpg.Pool | None = None
    broker: Broker | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    http_port: int | None = None
    worker: AiWorker | None = None
    intake: StudyIntake | None = None


def _public_url(settings: ConnectorSettings, port: int) -> str:
    if settings.public_url is not None:
        return settings.public_url.rstrip("/")
    host = "127.0.0.1" if settings.http_host in _WILDCARD_HOSTS else settings.http_host
    scheme = "https" if HttpTlsSettings().enabled else "http"
    return f"{scheme}://{host}:{port}"


async def run(
    settings: ConnectorSettings,
    database_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    *,
    storage: ObjectStorage | None = None,
    stop: asyncio.Event | None = None,
    services: ConnectorServices | None = None,
    handle_signals: bool = False,
    secrets: Mapping[str, str] | None = None,
) -> None:
    """Run the connector until ``stop`` is set (or, with ``handle_signals``,
    until SIGTERM/SIGINT).  ``secrets``: where rules' ``secret_ref`` names
    are looked up (default: the environment)."""
    stop = stop or asyncio.Event()
    services = services or ConnectorServices()
    if handle_signals:
        install_stop_signals(stop)
    metrics = ConnectorMetrics(services.registry)

    async def database_ready() -> bool:
        if services.pool is None:
            return False
        async with services.pool.acquire(timeout=2.0) as connection:
            return bool(await connection.fetchval("SELECT true"))

    async def broker_ready() -> bool:
        # Connected, and consuming study.stable events.
        return services.broker is not None and services.broker.is_healthy() and services.intake is not None

    app = create_observability_app(
        SERVICE, {"database": database_ready, "broker": broker_ready}, services.registry, stopping=stop
    )
    server = await serve_http(app, settings.http_host, settings.http_port, tls=HttpTlsSettings())
    port = int(server.servers[0].sockets[0].getsockname()[1])
    services.http_port = port
    owned_storage: StorageRegistry | None = None
    try:
        services.pool = await until_connected(
            "database", lambda: create_pool(database_settings, application_name=SERVICE), stop
        )
        services.broker = await until_connected("broker", lambda: Broker.connect(broker_settings), stop)
        if services.pool is None or services.broker is None:
            return
        if storage is None:
            dependencies = Dependencies()  # retries and circuit breaker of the hot tier
            services.registry.register(dependencies)
            owned_storage = StorageRegistry.from_settings((HOT,), dependencies=dependencies)
            storage = owned_storage.get(HOT)
        # Attempts in hand finish; one cut at the grace period is retried later.
        grace = ShutdownSettings().grace_seconds - CLOSING_RESERVE_SECONDS
        serving = _serve(
            settings,
            services,
            services.pool,
            services.broker,
            storage,
            metrics,
            app=app,
            public_url=_public_url(settings, port),
            secrets=os.environ if secrets is None else secrets,
            stop=stop,
        )
        await finish_within_grace(serving, stop, grace, what="ai-connector")
    finally:
        # Inference callbacks in flight are answered before the port closes.
        await stop_http(server, 2.0)
        if services.broker is not None:
            await services.broker.close()
        if services.pool is not None:
            await services.pool.close()
        if owned_storage is not None:
            owned_storage.close()
        logger.info("ai-connector stopped")


async def _serve(  # noqa: PLR0917 - the wiring, in one place
    settings: ConnectorSettings,
    services: ConnectorServices,
    pool: asyncpg.Pool,
    broker: Broker,
    storage: ObjectStorage,
    metrics: ConnectorMetrics,
    *,
    app: FastAPI,
    public_url: str,
    secrets: Mapping[str, str],
    stop: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
    publish_wait = broker.settings.publish_timeout_seconds + _PUBLISH_SLACK_SECONDS

    def publish(message: IngestMessage) -> None:
        # Called from the storing thread; the broker lives on this loop.
        asyncio.run_coroutine_threadsafe(broker.publish_ingest(message), loop).result(timeout=publish_wait)

    store = RequestStore(pool)
    storer = ResultStorer(InstanceReceiver(storage, HOT, publish), settings.spool_dir)
    async with httpx.AsyncClient(follow_redirects=False) as http:
        worker = AiWorker(
            pool, store, storer, http, settings, metrics, public_url=lambda: public_url, secrets=secrets
        )
        intake = StudyIntake(pool, store, metrics, on_created=worker.wake)
        add_callback_route(app, store, worker, settings.max_result_bytes)

        async def on_event(event: StudyStable) -> None:
            await intake.handle(event)

        consumer = StableEventConsumer(
            broker, on_event, prefetch=settings.prefetch, on_outcome=lambda o: metrics.events.labels(o).inc()
        )
        await consumer.start()
        # Ready (and visible to tests) once events reach us.
        services.worker, services.intake = worker, intake
        logger.info("ai-connector running", extra={"callback_base": public_url})
        try:
            await worker.run(stop)
        finally:
            await consumer.stop()


def main() -> None:
    settings = ConnectorSettings()
    database_settings = DatabaseSettings()
    broker_settings = BrokerSettings()
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    asyncio.run(run(settings, database_settings, broker_settings, handle_signals=True))
