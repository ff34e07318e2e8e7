"""What every async service does on the way up: wait for its dependencies,
and turn SIGTERM/SIGINT into a stop event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pacs_common.resilience import RetryPolicy

__all__ = ["install_stop_signals", "until_connected"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Doubling from 0.5 s to 10 s; jittered so replicas that start together spread out.
_CONNECT_BACKOFF = RetryPolicy(max_attempts=1_000_000, base_delay_seconds=0.5, max_delay_seconds=10.0)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def until_connected(what: str, connect: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T | None:
    """Connect, retrying with backoff: a service started before its database
    or broker waits for them (not ready meanwhile) instead of crash-looping.
    None when ``stop`` was set first."""
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            return await connect()
        except Exception as exc:
            # Half the ceiling for sure, the other half jittered: never a tight loop.
            ceiling = _CONNECT_BACKOFF.ceiling(attempt)
            delay = ceiling / 2 + _CONNECT_BACKOFF.delay(attempt) / 2
            logger.warning("%s unavailable, retrying in %.1fs: %s", what, delay, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return None


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM (how Kubernetes stops a pod) and SIGINT set ``stop``; only on
    the main thread, where signals can be handled."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in _SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
