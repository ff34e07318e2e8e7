"""The hsm-migrator: settings → pool → storage tiers → runner → loop.

``main()`` is the process entry point (``hsm-migrator`` / ``python -m
hsm_migrator``); :func:`run` is the same service as a coroutine, which the
tests start in-process.  SIGTERM or SIGINT stops it: the moves in hand are
finished (each is short), then connections close; a move interrupted
harder (SIGKILL) is finished by the next pass of any replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import asyncpg
from prometheus_client import CollectorRegistry

from hsm_migrator.metrics import HsmMetrics
from hsm_migrator.mover import FaultHook
from hsm_migrator.runner import Runner
from hsm_migrator.service import HsmService, RestoreRunner
from pacs_common.archive.restore import RestoreProcessor
from pacs_common.db.pool import create_pool
from pacs_common.hsm.settings import HsmSettings
from pacs_common.resilience import Dependencies
from pacs_common.settings import DatabaseSettings, StorageTiersSettings, TelemetrySettings
from pacs_common.shutdown import CLOSING_RESERVE_SECONDS, ShutdownSettings, finish_within_grace, stop_http
from pacs_common.startup import install_stop_signals, until_connected
from pacs_common.storage import StorageRegistry
from pacs_common.telemetry import (
    HttpTlsSettings,
    configure_logging,
    configure_tracing,
    create_observability_app,
    serve_http,
)

__all__ = ["SERVICE", "HsmServices", "main", "run"]

SERVICE: Final = "hsm-migrator"
_PROBE_PREFIX: Final = ".pacs-hsm-readiness-probe/"

logger = logging.getLogger(__name__)


@dataclass
class HsmServices:
    """What the running migrator holds (the readiness checks and tests look here)."""

    pool: asyncpg.Pool | None = None
    storage: StorageRegistry | None = None
    service: HsmService | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    http_port: int | None = None
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")


def _tier_check(storage: StorageRegistry | None, tier: str) -> bool:
    """A listing under a prefix nothing uses: one cheap request that fails
    when the bucket or container is gone or the credentials are refused; a
    directory must exist and be writable."""
    if storage is None:
        return False
    backend = storage.get(tier)
    root = getattr(backend, "root", None)
    if backend.kind == "filesystem" and isinstance(root, Path):
        # A root not made yet is made at the first write: its nearest existing
        # ancestor must then be writable.
        existing = next(p for p in (root, *root.parents) if p.exists())
        return existing.is_dir() and os.access(existing, os.W_OK)
    next(iter(backend.iter_keys(_PROBE_PREFIX)), None)
    return True


async def run(
    settings: HsmSettings,
    database_settings: DatabaseSettings,
    *,
    tiers: StorageTiersSettings | None = None,
    storage: StorageRegistry | None = None,
    stop: asyncio.Event | None = None,
    services: HsmServices | None = None,
    handle_signals: bool = False,
    restore: RestoreRunner | None = None,
    fault: FaultHook | None = None,
) -> None:
    """Run the migrator until ``stop`` is set (or, with ``handle_signals``,
    until SIGTERM/SIGINT).  ``storage``: the tiers (else built from
    ``tiers`` / ``PACS_STORAGE_*``); ``restore``: the restore processor
    (else one over the same pool and tiers)."""
    stop = stop or asyncio.Event()
    services = services or HsmServices()
    if handle_signals:
        install_stop_signals(stop)
    metrics = HsmMetrics(services.registry)
    owned_storage: StorageRegistry | None = None
    if storage is None:
        dependencies = Dependencies()  # retries and circuit breakers of the storage tiers
        services.registry.register(dependencies)
        tier_names = (tiers or StorageTiersSettings()).tiers
        owned_storage = StorageRegistry.from_settings(tier_names, dependencies=dependencies)
        storage = owned_storage
    services.storage = storage
    missing = settings.tiers_named() - set(storage.names)
    if missing:
        raise ValueError(f"PACS_HSM_RULES name tiers that are not configured: {', '.join(sorted(missing))}")

    async def database_ready() -> bool:
        if services.pool is None:
            return False
        async with services.pool.acquire(timeout=2.0) as connection:
            return bool(await connection.fetchval("SELECT true"))

    checks = {"database": database_ready}
    for tier in storage.names:

        async def tier_ready(tier: str = tier) -> bool:
            return await asyncio.to_thread(_tier_check, services.storage, tier)

        checks[f"storage:{tier}"] = tier_ready
    app = create_observability_app(SERVICE, checks, services.registry, stopping=stop)
    server = await serve_http(app, settings.http_host, settings.http_port, tls=HttpTlsSettings())
    services.http_port = int(server.servers[0].sockets[0].getsockname()[1])
    try:
        services.pool = await until_connected(
            "database", lambda: create_pool(database_settings, application_name=SERVICE), stop
        )
        if services.pool is None:
            return
        runner = Runner(services.pool, storage, settings, owner=services.owner, metrics=metrics, fault=fault)
        if restore is None and settings.restores_enabled:
            restore = RestoreProcessor(services.pool, storage, registry=services.registry)
        services.service = HsmService(settings, services.pool, storage, runner, metrics, restore=restore)
        logger.info(
            "hsm-migrator running",
            extra={
                "owner": services.owner,
                "tiers": list(storage.names),
                "rules": [rule.model_dump(mode="json") for rule in settings.rules],
                "interval_seconds": settings.interval_seconds,
            },
        )
        await services.service.refresh_statistics()
        # Moves in hand finish; one cut at the grace period is finished by a later pass.
        grace = ShutdownSettings().grace_seconds - CLOSING_RESERVE_SECONDS
        await finish_within_grace(services.service.run(stop), stop, grace, what="hsm-migrator")
    finally:
        await stop_http(server, 1.0)
        if services.pool is not None:
            await services.pool.close()
        if owned_storage is not None:
            owned_storage.close()
        logger.info("hsm-migrator stopped")


def main() -> None:
    settings = HsmSettings()
    database_settings = DatabaseSettings()
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    asyncio.run(run(settings, database_settings, handle_signals=True))
