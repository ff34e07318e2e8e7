"""Audit from plain threads (pynetdicom association handlers) without
waiting for the database: events go into a bounded queue that one daemon
thread drains into the :class:`~pacs_common.audit.log.AuditLog`, through the
:class:`~pacs_common.db.blocking.BlockingPool`.

A full queue or a database that refuses the event drops it: logged, and
counted through ``on_drop(reason)`` ("queue_full", "database").  The
audited operation never waits for, nor fails because of, the audit trail.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Final

from pacs_common.audit.log import AuditLog
from pacs_common.audit.models import AuditRecord
from pacs_common.audit.settings import AuditSettings
from pacs_common.db.blocking import BlockingPool

logger = logging.getLogger(__name__)

DROP_QUEUE_FULL: Final = "queue_full"
DROP_DATABASE: Final = "database"
_WRITE_TIMEOUT_SECONDS: Final = 10.0


class BackgroundAuditWriter:
    """A bounded queue of :class:`AuditRecord` and the thread writing them."""

    def __init__(
        self,
        database: BlockingPool,
        settings: AuditSettings,
        *,
        on_drop: Callable[[str], None] | None = None,
        write_timeout_seconds: float = _WRITE_TIMEOUT_SECONDS,
    ) -> None:
        self._database = database
        self._settings = settings
        self._on_drop = on_drop
        self._timeout = write_timeout_seconds
        self._queue: queue.Queue[AuditRecord | None] = queue.Queue(maxsize=settings.queue_size)
        self._thread: threading.Thread | None = None
        self._log: AuditLog | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("BackgroundAuditWriter already started")
        self._thread = threading.Thread(target=self._drain, name="pacs-audit", daemon=True)
        self._thread.start()

    def submit(self, record: AuditRecord) -> bool:
        """Queue ``record`` (never blocks); False when it was dropped."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            logger.error("audit queue full, event dropped", extra={"event_id": record.event.value})
            self._dropped(DROP_QUEUE_FULL)
            return False
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event was handled; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (within ``timeout``), then stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(deadline - time.monotonic(), 0.01))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    logger.error("audit writer stopped with events still queued")
                    return
        thread.join(timeout=max(deadline - time.monotonic(), 0.01))
        log, self._log = self._log, None
        if log is not None and self._database.is_running():
            try:
                self._database.run(lambda _pool: log.aclose(), timeout=self._timeout)
            except Exception:
                logger.warning("closing the audit log failed", exc_info=True)

    def _drain(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is None:
                    return
                self._write(record)
            finally:
                self._queue.task_done()

    def _write(self, record: AuditRecord) -> None:
        try:
            log = self._log
            if log is None:
                log = self._log = AuditLog(self._database.pool, self._settings)
            self._database.run(lambda _pool: log.write(record), timeout=self._timeout)
        except Exception as exc:
            logger.error(
                "audit event not written: %s",
                exc,
                extra={"event_id": record.event.value, "actor": record.actor.name},
            )
            self._dropped(DROP_DATABASE)

    def _dropped(self, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(reason)
