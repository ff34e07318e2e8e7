"""PostgreSQL from plain threads (pynetdicom association threads).

pynetdicom runs each association's handlers in a thread of its own; asyncpg
needs an event loop.  One daemon thread runs a loop that owns the pool, and
threads hand it work with ``run_coroutine_threadsafe``, waiting for the
result with a timeout.  The same bridge as
:class:`pacs_common.messaging.blocking.BlockingPublisher`, for the database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from pacs_common.db.pool import create_pool
from pacs_common.settings import DatabaseSettings

T = TypeVar("T")

# Slack for the loop thread to pick the work up, on top of the caller's timeout.
_HANDOFF_SECONDS = 1.0


class BlockingPool:
    """A thread-safe, blocking front to an asyncpg pool on its own loop."""

    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        application_name: str | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._settings = settings
        self._application_name = application_name
        self._timeout = timeout_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: asyncpg.Pool | None = None

    def start(self) -> None:
        """Start the loop thread and open the pool (raises when the database
        cannot be reached within the timeout)."""
        if self._thread is not None:
            raise RuntimeError("BlockingPool already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run, args=(loop,), name="pacs-db", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        future = asyncio.run_coroutine_threadsafe(
            create_pool(self._settings, application_name=self._application_name), loop
        )
        try:
            self._pool = future.result(timeout=self._timeout + _HANDOFF_SECONDS)
        except BaseException:
            future.cancel()
            self._stop_loop()
            raise

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("BlockingPool not started")
        return self._pool

    def run(self, work: Callable[[asyncpg.Pool], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Run ``work(pool)`` on the loop thread and return its result; its
        exception is raised here.  ``TimeoutError`` when it takes longer
        than ``timeout`` (default: the pool's)."""
        loop, pool = self._loop, self._pool
        if loop is None or pool is None or not loop.is_running():
            raise RuntimeError("BlockingPool not started")
        wait = self._timeout if timeout is None else timeout

        async def bounded() -> T:
            async with asyncio.timeout(wait):
                return await work(pool)

        future = asyncio.run_coroutine_threadsafe(bounded(), loop)
        try:
            return future.result(timeout=wait + _HANDOFF_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"database work took longer than {wait}s") from None

    def is_running(self) -> bool:
        return self._loop is not None and self._loop.is_running() and self._pool is not None

    def stop(self) -> None:
        """Close the pool, stop the loop and join its thread; idempotent."""
        loop, pool = self._loop, self._pool
        self._pool = None
        if pool is not None and loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(pool.close(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=self._timeout)
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
