"""Scheduled maintenance tasks (retention, integrity, orphans): their
models, schedules and the repository the CLI, the REST API and the
prefetch-scheduler share (``scheduled_task`` / ``task_run``, migration 0010)."""

from pacs_common.tasks.models import (
    IntegrityParams,
    OrphansParams,
    RetentionHold,
    RetentionParams,
    RetentionRule,
    RunStatus,
    RunTrigger,
    ScheduledTask,
    TaskKind,
    TaskRun,
    TaskUpdate,
    validate_params,
)
from pacs_common.tasks.repository import Claim, TaskExistsError, TaskNotFoundError, TaskRepository
from pacs_common.tasks.schedule import ScheduleError, next_run, validate_cron

__all__ = [
    "Claim",
    "IntegrityParams",
    "OrphansParams",
    "RetentionHold",
    "RetentionParams",
    "RetentionRule",
    "RunStatus",
    "RunTrigger",
    "ScheduleError",
    "ScheduledTask",
    "TaskExistsError",
    "TaskKind",
    "TaskNotFoundError",
    "TaskRepository",
    "TaskRun",
    "TaskUpdate",
    "next_run",
    "validate_cron",
    "validate_params",
]
