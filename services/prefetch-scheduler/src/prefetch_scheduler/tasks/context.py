"""What a task runner gets (:class:`RunContext`) and gives back (:class:`RunResult`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from pacs_common.audit import AuditActor, AuditLog
from pacs_common.storage import StorageRegistry
from pacs_common.tasks import ScheduledTask
from prefetch_scheduler.tasks.metrics import TaskMetrics

__all__ = ["RunContext", "RunResult", "Runner", "task_actor"]


def task_actor(task: ScheduledTask) -> AuditActor:
    """Who the audit trail names for what a task did."""
    return AuditActor(name=f"prefetch-scheduler/{task.name}", method="scheduled-task")


@dataclass(frozen=True, slots=True)
class RunContext:
    pool: asyncpg.Pool
    storage: StorageRegistry
    audit: AuditLog
    metrics: TaskMetrics
    task: ScheduledTask
    # The task's state as the last run left it (e.g. a cursor).
    state: dict[str, Any]
    # True once the runner must stop after its current batch (the service
    # stops, or this replica lost its lease).
    should_stop: Callable[[], bool]
    # Keep the task's state now (a resumable cursor).
    save_state: Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RunResult:
    summary: dict[str, Any]
    # False: stopped early (should_stop); the run is recorded as interrupted.
    completed: bool = True


Runner = Callable[[RunContext], Awaitable[RunResult]]
