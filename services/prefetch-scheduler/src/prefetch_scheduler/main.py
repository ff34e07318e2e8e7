"""The prefetch-scheduler process: settings → pool → storage → its parts.

One process hosts four parts that share the pool, the storage tiers and
one metrics registry, and run side by side until SIGTERM/SIGINT:

* the prior-study prefetch (:mod:`prefetch_scheduler.prefetch`);
* the scheduled maintenance tasks (:mod:`prefetch_scheduler.tasks`);
* the routing auto-forwarder (:mod:`prefetch_scheduler.forwarding`);
* PACS-to-PACS sync relations (:mod:`prefetch_scheduler.sync`).

Every part is stateless and coordinates with other replicas through
PostgreSQL, so any number of these processes may run.  A part that ends or
fails before the process is asked to stop takes the process down (logged,
non-zero exit): a half-alive scheduler that reports ready but no longer
forwards or prefetches is worse than a restart.

``main()`` is the entry point (``prefetch-scheduler`` / ``python -m
prefetch_scheduler``); :func:`run` is the same as a coroutine for tests.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
from prometheus_client import CollectorRegistry

from pacs_common.db.pool import create_pool
from pacs_common.resilience import Dependencies
from pacs_common.settings import BrokerSettings, DatabaseSettings, StorageTiersSettings, TelemetrySettings
from pacs_common.shutdown import CLOSING_RESERVE_SECONDS, ShutdownSettings, stop_http
from pacs_common.startup import install_stop_signals, until_connected
from pacs_common.storage import StorageRegistry
from pacs_common.telemetry import (
    HttpTlsSettings,
    configure_logging,
    configure_tracing,
    create_observability_app,
    serve_http,
)
from prefetch_scheduler.forwarding.service import run_forwarder
from prefetch_scheduler.prefetch.service import run_prefetch
from prefetch_scheduler.prefetch.settings import PrefetchSettings
from prefetch_scheduler.sync.service import run_sync
from prefetch_scheduler.tasks.service import run_task_scheduler

__all__ = ["ALL_PARTS", "SERVICE", "PartCrashedError", "SchedulerServices", "main", "run", "run_parts"]

SERVICE: Final = "prefetch-scheduler"
PREFETCH: Final = "prefetch"
TASKS: Final = "tasks"
FORWARDING: Final = "forwarding"
SYNC: Final = "sync"
ALL_PARTS: Final = (PREFETCH, TASKS, FORWARDING, SYNC)

logger = logging.getLogger(__name__)


class PartCrashedError(RuntimeError):
    """A part ended before the process was asked to stop."""


@dataclass
class SchedulerServices:
    """What the running process holds (the readiness check looks here)."""

    pool: asyncpg.Pool | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    http_port: int | None = None
    # The parts that run.
    parts: list[str] = field(default_factory=list)


def _parts(  # noqa: PLR0917 - the wiring, in one place
    wanted: Collection[str],
    pool: asyncpg.Pool,
    prefetch_settings: PrefetchSettings,
    broker_settings: BrokerSettings,
    storage: StorageRegistry,
    registry: CollectorRegistry,
    dependencies: Dependencies,
) -> dict[str, Callable[[asyncio.Event], Awaitable[None]]]:
    """The coroutine factory of each part to run, given its stop event."""
    parts: dict[str, Callable[[asyncio.Event], Awaitable[None]]] = {}
    if PREFETCH in wanted:
        parts[PREFETCH] = lambda stop: run_prefetch(
            pool, prefetch_settings, registry, stop, breakers=dependencies
        )
    if TASKS in wanted:
        parts[TASKS] = lambda stop: run_task_scheduler(pool, storage, registry, stop)
    if FORWARDING in wanted:
        parts[FORWARDING] = lambda stop: run_forwarder(
            pool, broker_settings, storage, registry, stop, breakers=dependencies
        )
    if SYNC in wanted:
        parts[SYNC] = lambda stop: run_sync(pool, storage, registry, stop)
    return parts


async def run_parts(
    parts: dict[str, Callable[[asyncio.Event], Awaitable[None]]], stop: asyncio.Event
) -> None:
    """Run every part until ``stop``; the first part to end early stops the
    others and raises :class:`PartCrashedError`."""
    parts_stop = asyncio.Event()
    tasks: dict[asyncio.Task[Any], str] = {
        asyncio.create_task(_as_coroutine(start(parts_stop)), name=name): name
        for name, start in parts.items()
    }
    stopped: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="stop")
    # Once one part has stopped (or failed), the others get this long to finish.
    grace = ShutdownSettings().grace_seconds - CLOSING_RESERVE_SECONDS
    crashed: tuple[str, BaseException | None] | None = None
    try:
        done, _ = await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is stopped or stop.is_set():
                continue
            error = task.exception()
            crashed = (tasks[task], error)
            if error is not None:
                logger.error("%s failed; stopping the process", tasks[task], exc_info=error)
            else:
                logger.error("%s ended on its own; stopping the process", tasks[task])
            break
        parts_stop.set()
        pending = [t for t in tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                logger.warning("%s did not stop within %.0fs; cancelling it", tasks[task], grace)
    finally:
        parts_stop.set()
        stopped.cancel()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, Exception) and (crashed is None or tasks[task] != crashed[0]):
            logger.error("%s failed while stopping", tasks[task], exc_info=result)
    if crashed is not None:
        name, error = crashed
        raise PartCrashedError(f"{name} {'failed' if error is not None else 'ended'} unexpectedly") from error


async def _as_coroutine(awaitable: Awaitable[None]) -> None:
    await awaitable


async def run(
    prefetch_settings: PrefetchSettings,
    database_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    tiers_settings: StorageTiersSettings,
    *,
    storage: StorageRegistry | None = None,
    stop: asyncio.Event | None = None,
    services: SchedulerServices | None = None,
    parts: Collection[str] = ALL_PARTS,
    handle_signals: bool = False,
) -> None:
    """Run the scheduler until ``stop`` is set (or, with ``handle_signals``,
    SIGTERM/SIGINT).  ``parts``: which of :data:`ALL_PARTS` to run (tests
    run one).  Raises :class:`PartCrashedError` when a part ends early."""
    stop = stop or asyncio.Event()
    services = services or SchedulerServices()
    if handle_signals:
        install_stop_signals(stop)

    async def database_ready() -> bool:
        if services.pool is None:
            return False
        async with services.pool.acquire(timeout=2.0) as connection:
            return bool(await connection.fetchval("SELECT true"))

    app = create_observability_app(SERVICE, {"database": database_ready}, services.registry, stopping=stop)
    server = await serve_http(
        app, prefetch_settings.http_host, prefetch_settings.http_port, tls=HttpTlsSettings()
    )
    services.http_port = int(server.servers[0].sockets[0].getsockname()[1])
    owned_storage: StorageRegistry | None = None
    try:
        services.pool = await until_connected(
            "database", lambda: create_pool(database_settings, application_name=SERVICE), stop
        )
        if services.pool is None:
            return
        # Retries and circuit breakers: storage tiers, remote AEs (forwarding, prefetch).
        dependencies = Dependencies()
        services.registry.register(dependencies)
        if storage is None:
            owned_storage = StorageRegistry.from_settings(tiers_settings.tiers, dependencies=dependencies)
            storage = owned_storage
        running = _parts(
            parts, services.pool, prefetch_settings, broker_settings, storage, services.registry, dependencies
        )
        services.parts = list(running)
        logger.info("%s running: %s", SERVICE, ", ".join(running) or "nothing")
        await run_parts(running, stop)
    finally:
        await stop_http(server, 1.0)
        if services.pool is not None:
            await services.pool.close()
        if owned_storage is not None:
            owned_storage.close()
        logger.info("%s stopped", SERVICE)


#: Four parts share the pool: prefetch jobs, the task scheduler, sync and the
#: forwarder (which holds up to PACS_FORWARD_EVENT_CONCURRENCY connections
#: while it handles events); the library default of 10 is too tight.
_POOL_MAX_SIZE: Final = 24


def _database_settings() -> DatabaseSettings:
    """``PACS_DB_*``, with a larger pool unless PACS_DB_POOL_MAX_SIZE says otherwise."""
    settings = DatabaseSettings()
    if "pool_max_size" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"pool_max_size": _POOL_MAX_SIZE})


def main() -> None:
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    settings: dict[str, Any] = {
        "prefetch_settings": PrefetchSettings(),
        "database_settings": _database_settings(),
        "broker_settings": BrokerSettings(),
        "tiers_settings": StorageTiersSettings(),
    }
    try:
        asyncio.run(run(**settings, handle_signals=True))
    except PartCrashedError as exc:
        logger.critical("%s: %s", SERVICE, exc)
        sys.exit(1)
