"""The query-service process: settings → pool → app → serve until SIGTERM.

``main()`` is the entry point (``query-service`` / ``python -m
query_service``); :func:`run` is the same service as a coroutine.  The
database is connected with retries (a service started before PostgreSQL
waits for it); the HTTP server starts once the pool exists.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import CollectorRegistry

from pacs_common.db.pool import create_pool
from pacs_common.settings import DatabaseSettings, QuerySettings, TelemetrySettings
from pacs_common.shutdown import CLOSING_RESERVE_SECONDS, ShutdownSettings, stop_http
from pacs_common.startup import install_stop_signals, until_connected
from pacs_common.telemetry import (
    HttpTlsSettings,
    configure_logging,
    configure_tracing,
    report_stopping,
    serve_http,
)
from query_service.app import SERVICE, create_app

__all__ = ["main", "run"]

logger = logging.getLogger(__name__)


async def run(
    settings: QuerySettings,
    database_settings: DatabaseSettings,
    *,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
    handle_signals: bool = False,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT with ``handle_signals``)."""
    stop = stop or asyncio.Event()
    if handle_signals:
        install_stop_signals(stop)
    pool: asyncpg.Pool | None = await until_connected(
        "database", lambda: create_pool(database_settings, application_name=SERVICE), stop
    )
    if pool is None:
        return
    try:
        app = create_app(pool, settings, registry or CollectorRegistry())
        report_stopping(app, stop)  # readiness says "stopping" from the SIGTERM on
        shutdown = ShutdownSettings()
        server = await serve_http(app, settings.http_host, settings.http_port, tls=HttpTlsSettings())
        logger.info("query-service listening", extra={"port": settings.http_port})
        try:
            await stop.wait()
        finally:
            # Queries in flight finish, or are cut at the grace period.
            await stop_http(server, shutdown.grace_seconds - CLOSING_RESERVE_SECONDS)
    finally:
        await pool.close()
        logger.info("query-service stopped")


def main() -> None:
    settings = QuerySettings()
    database_settings = DatabaseSettings()
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    asyncio.run(run(settings, database_settings, handle_signals=True))
