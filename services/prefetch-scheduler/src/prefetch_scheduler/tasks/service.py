"""The entry point the prefetch-scheduler's ``main`` calls:
:func:`run_task_scheduler` runs this replica's share of the scheduled
maintenance tasks until ``stop`` is set."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

import asyncpg
from prometheus_client import CollectorRegistry

from pacs_common.audit import AuditLog, AuditSettings
from pacs_common.storage import StorageRegistry
from prefetch_scheduler.tasks.metrics import TaskMetrics
from prefetch_scheduler.tasks.scheduler import TaskScheduler
from prefetch_scheduler.tasks.settings import TaskSchedulerSettings

__all__ = ["default_runner_id", "run_task_scheduler"]

logger = logging.getLogger(__name__)


def default_runner_id() -> str:
    """Host, process and a random part: unique per replica, readable in the run history."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def run_task_scheduler(
    pool: asyncpg.Pool,
    storage: StorageRegistry,
    registry: CollectorRegistry,
    stop: asyncio.Event,
    *,
    settings: TaskSchedulerSettings | None = None,
    audit_settings: AuditSettings | None = None,
) -> None:
    """Run due tasks until ``stop`` is set (settings from ``PACS_TASKS_*`` and
    ``PACS_AUDIT_*`` unless given).  A task in progress when ``stop`` is set
    finishes its current batch and its run is recorded as interrupted."""
    settings = settings or TaskSchedulerSettings()
    if not settings.enabled:
        logger.info("scheduled tasks disabled (PACS_TASKS_ENABLED=false)")
        await stop.wait()
        return
    audit = AuditLog(pool, audit_settings or AuditSettings())
    scheduler = TaskScheduler(
        pool,
        storage,
        audit=audit,
        metrics=TaskMetrics(registry),
        settings=settings,
        runner_id=settings.runner_id or default_runner_id(),
    )
    try:
        await scheduler.run(stop)
    finally:
        await audit.aclose()
