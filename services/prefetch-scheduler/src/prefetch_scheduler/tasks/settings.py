"""Settings of the task scheduler (``PACS_TASKS_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["TaskSchedulerSettings"]


class TaskSchedulerSettings(BaseSettings):
    """How often a replica looks for due tasks and how long its lease on a
    running task lasts (renewed every third of it while the task runs; a
    replica that dies releases its tasks when the lease expires)."""

    model_config = SettingsConfigDict(env_prefix="PACS_TASKS_", extra="ignore")

    enabled: bool = True
    poll_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    lease_seconds: float = Field(default=60.0, ge=1, le=86_400)
    # Who runs the tasks, in task_run.runner_id (default: host, pid and a random part).
    runner_id: str | None = Field(default=None, min_length=1, max_length=200)
