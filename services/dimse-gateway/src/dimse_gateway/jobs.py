"""C-MOVE operations as jobs (table ``job``, kind ``move``), so operators see
them with their progress in the REST API and can cancel one there.

Tracking never fails a retrieve: when the database cannot be reached the
move goes on untracked (logged).  Progress is written at most once a
second; a job cancelled over REST is seen at the next write and stops the
sub-operations the way a C-CANCEL does.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from pacs_common.db.blocking import BlockingPool
from pacs_common.jobs import JobKind, JobRepository, JobState

__all__ = ["MoveJob", "MoveJobs"]

logger = logging.getLogger(__name__)

_PROGRESS_INTERVAL_SECONDS: Final = 1.0
_TIMEOUT_SECONDS: Final = 5.0


class MoveJob:
    """One tracked C-MOVE; every method is safe to call from the association thread."""

    def __init__(self, database: BlockingPool | None, job_id: int | None) -> None:
        self._database = database
        self._id = job_id
        self._last_write = 0.0
        self.cancelled = False

    @classmethod
    def untracked(cls) -> MoveJob:
        """A job that records nothing (no database wired)."""
        return cls(None, None)

    @property
    def id(self) -> int | None:
        return self._id

    def progress(self, done: int, total: int) -> None:
        if self._database is None or self._id is None or self.cancelled:
            return
        now = time.monotonic()
        if now - self._last_write < _PROGRESS_INTERVAL_SECONDS and done < total:
            return
        self._last_write = now
        job_id = self._id
        try:
            running = self._database.run(
                lambda pool: JobRepository(pool).report_progress(job_id, done, total),
                timeout=_TIMEOUT_SECONDS,
            )
        except Exception as exc:
            logger.warning("C-MOVE job %s: progress not recorded: %s", job_id, exc)
            return
        self.cancelled = not running

    def finish(self, outcome: JobState, error: str | None = None) -> None:
        """Done, failed (with ``error``) or cancelled (a C-CANCEL); nothing
        when it was cancelled over REST meanwhile."""
        if self._database is None or self._id is None or self.cancelled:
            return
        job_id = self._id

        async def close(pool: Any) -> None:
            jobs = JobRepository(pool)
            if outcome is JobState.DONE:
                await jobs.complete(job_id)
            elif outcome is JobState.CANCELLED:
                await jobs.cancel(job_id)
            else:
                await jobs.fail(job_id, error or "failed")

        try:
            self._database.run(close, timeout=_TIMEOUT_SECONDS)
        except Exception as exc:
            logger.warning("C-MOVE job %s: outcome not recorded: %s", job_id, exc)


class MoveJobs:
    """Starts :class:`MoveJob` records."""

    def __init__(self, database: BlockingPool) -> None:
        self._database = database

    def start(self, params: dict[str, Any], total: int, requested_by: str) -> MoveJob:
        try:
            job = self._database.run(
                lambda pool: JobRepository(pool).start(
                    JobKind.MOVE, params, total=total, created_by=requested_by
                ),
                timeout=_TIMEOUT_SECONDS,
            )
        except Exception as exc:
            logger.warning("C-MOVE not recorded as a job: %s", exc)
            return MoveJob(self._database, None)
        return MoveJob(self._database, job.id)
