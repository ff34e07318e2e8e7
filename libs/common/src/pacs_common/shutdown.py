"""Graceful shutdown, the same in every service.

Kubernetes stops a pod with SIGTERM, waits ``terminationGracePeriodSeconds``
(30 s by default), then SIGKILLs it.  On SIGTERM a service:

1. reports not-ready at once (``/health/ready`` → 503 "stopping"), so
   traffic stops being routed to it;
2. stops taking new work (listening sockets closed, consumers cancelled,
   no new claims);
3. finishes the work in hand, or hands it back (unacked messages return to
   the queue, claims and leases are released) — within
   ``PACS_SHUTDOWN_GRACE_SECONDS`` (default 25 s, below Kubernetes' 30 s);
4. exits 0.

:class:`GracePeriod` splits one budget between these phases;
:func:`stop_http` lets the embedded uvicorn server finish in-flight requests
within what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "CLOSING_RESERVE_SECONDS",
    "GracePeriod",
    "ShutdownSettings",
    "finish_within_grace",
    "stop_http",
]

logger = logging.getLogger(__name__)

#: What stopping the HTTP server may take at least, whatever the budget left
#: (closing sockets and answering the requests that are nearly done).
_HTTP_MIN_SECONDS = 1
#: Kept back from the work phase for stopping HTTP and closing connections.
CLOSING_RESERVE_SECONDS = 3.0


class ShutdownSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_SHUTDOWN_", extra="ignore")

    #: From SIGTERM to exit; keep it below the pod's terminationGracePeriodSeconds.
    grace_seconds: float = Field(default=25.0, gt=0, le=3600)


class GracePeriod:
    """A deadline, started when the stop was asked for."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._deadline = clock() + seconds

    def remaining(self, *, reserve: float = 0.0) -> float:
        """Seconds left, keeping ``reserve`` for what comes after (closing
        connections, flushing buffers)."""
        return max(0.0, self._deadline - reserve - self._clock())

    def expired(self) -> bool:
        return self.remaining() <= 0.0


async def stop_http(server: uvicorn.Server, grace_seconds: float) -> None:
    """Stop ``server`` (started by :func:`pacs_common.telemetry.serve_http`):
    close the listening socket, let in-flight requests complete for up to
    ``grace_seconds`` (uvicorn cancels what is left), return once it is down."""
    timeout = max(_HTTP_MIN_SECONDS, math.ceil(grace_seconds))  # uvicorn wants whole seconds
    server.config.timeout_graceful_shutdown = timeout
    server.should_exit = True
    task: asyncio.Task[None] | None = getattr(server, "serving_task", None)
    if task is None:
        await asyncio.sleep(0)
        return
    try:
        # uvicorn's own timeout cancels the requests; this bound is a backstop.
        await asyncio.wait_for(asyncio.shield(task), timeout + 2.0)
    except TimeoutError:
        logger.warning("HTTP server did not stop in time; cancelling it")
        server.force_exit = True
        task.cancel()
    except Exception:
        logger.exception("HTTP server failed while stopping")


async def finish_within_grace(
    work: Coroutine[Any, Any, None], stop: asyncio.Event, grace_seconds: float, *, what: str
) -> None:
    """Run ``work`` (which itself watches ``stop`` and winds down when it is
    set); once ``stop`` is set, give it ``grace_seconds`` to finish, then
    cancel it — no worse than the SIGKILL that would follow, which the
    leases and unacked messages are built to survive."""
    task = asyncio.create_task(work, name=what)
    stopped = asyncio.create_task(stop.wait(), name=f"{what}:stop")
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace_seconds)
        if task.done():
            task.result()  # its failure, if it failed
            return
        logger.warning("%s did not finish within %.0fs of the stop; cancelling it", what, grace_seconds)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
