"""The dicomweb-api process: settings → pool, storage, broker, query client →
app → serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import CollectorRegistry

from dicomweb_api.app import SERVICE, create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.security.authentication import build_authenticator
from dicomweb_api.security.settings import AuthSettings
from dicomweb_api.settings import DicomwebSettings
from pacs_common.archive.access import AsyncAccessRecorder
from pacs_common.archive.metrics import RestoreMetrics
from pacs_common.archive.requests import RestoreRequester
from pacs_common.archive.settings import AccessSettings, RestoreSettings
from pacs_common.audit import AuditLog, AuditSettings
from pacs_common.backpressure import Backpressure, BackpressureSettings, start_backlog_sampler
from pacs_common.db.pool import create_pool
from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.resilience import Dependencies
from pacs_common.settings import BrokerSettings, DatabaseSettings, StorageTiersSettings, TelemetrySettings
from pacs_common.shutdown import CLOSING_RESERVE_SECONDS, ShutdownSettings, stop_http
from pacs_common.startup import install_stop_signals, until_connected
from pacs_common.storage import StorageRegistry
from pacs_common.telemetry import (
    HttpTlsSettings,
    configure_logging,
    configure_tracing,
    report_stopping,
    serve_http,
)

__all__ = ["main", "run"]

HOT_TIER = "hot"
logger = logging.getLogger(__name__)


async def run(
    settings: DicomwebSettings, database_settings: DatabaseSettings, broker_settings: BrokerSettings
) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    pool: asyncpg.Pool | None = await until_connected(
        "database", lambda: create_pool(database_settings, application_name=SERVICE), stop
    )
    if pool is None:
        return
    # Every tier: the index may point an instance at any of them.
    # Retries and circuit breakers of the outgoing calls (storage, query-service).
    dependencies = Dependencies()
    storage = StorageRegistry.from_settings(StorageTiersSettings().tiers, dependencies=dependencies)
    access = AsyncAccessRecorder(pool, AccessSettings())
    publisher = BlockingPublisher(broker_settings)
    query = AsyncQueryClient(
        settings.query_url, timeout_seconds=settings.query_timeout_seconds, dependencies=dependencies
    )
    try:
        await asyncio.to_thread(publisher.start)
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        # STOW-RS answers 503 while the ingest backlog or storage latency is over its limit.
        backpressure = Backpressure(BackpressureSettings())
        receiver = InstanceReceiver(
            backpressure.timed(storage.get(HOT_TIER)), HOT_TIER, publisher.publish_ingest
        )
        registry = CollectorRegistry()
        registry.register(dependencies)
        context = ApiContext(
            settings=settings,
            pool=pool,
            query=query,
            storage=storage,
            receiver=receiver,
            access=access,
            restores=RestoreRequester(pool, requested_by=SERVICE, metrics=RestoreMetrics(registry)),
            retry_after_seconds=RestoreSettings().retry_after_seconds,
        )
        auth_settings = AuthSettings()
        audit = AuditLog(pool, AuditSettings())
        authenticator = await build_authenticator(pool, auth_settings, audit)
        app = create_app(context, authenticator, registry, audit, backpressure)
        access.start()
        backlog_sampler = start_backlog_sampler(backpressure, broker_settings)
        report_stopping(app, stop)  # readiness says "stopping" from the SIGTERM on
        shutdown = ShutdownSettings()
        server = await serve_http(app, settings.http_host, settings.http_port, tls=HttpTlsSettings())
        logger.info("dicomweb-api listening", extra={"port": settings.http_port})
        try:
            await stop.wait()
        finally:
            # In-flight requests (a STOW upload) finish, or are cut at the grace period.
            await stop_http(server, shutdown.grace_seconds - CLOSING_RESERVE_SECONDS)
            if backlog_sampler is not None:
                await asyncio.to_thread(backlog_sampler.stop)
            await asyncio.sleep(0)
            await audit.aclose()
    finally:
        await access.aclose()  # the last accesses are written
        await query.aclose()
        await asyncio.to_thread(publisher.stop)
        storage.close()
        await pool.close()
        logger.info("dicomweb-api stopped")


def main() -> None:
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    asyncio.run(run(DicomwebSettings(), DatabaseSettings(), BrokerSettings()))
