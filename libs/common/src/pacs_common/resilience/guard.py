"""One dependency's guard: retries with backoff inside a circuit breaker.

Each attempt asks the breaker first (an open breaker fails the call at once,
without waiting); a transient failure is counted by the breaker and retried
after a jittered delay while attempts remain; any other outcome — success,
or an error that proves the dependency answered (not found, refused as
invalid) — counts as the dependency working.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pacs_common.resilience.breaker import CircuitBreaker
from pacs_common.resilience.retry import Retryable, RetryPolicy

__all__ = ["DependencyGuard", "never_retry"]

T = TypeVar("T")


def never_retry(error: BaseException) -> bool:
    return False


class DependencyGuard:
    """Retry policy + breaker for one named dependency (thread-safe)."""

    def __init__(
        self,
        name: str,
        *,
        policy: RetryPolicy,
        breaker: CircuitBreaker,
        retryable: Retryable,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.policy = policy
        self.breaker = breaker
        self.retryable = retryable
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._lock = threading.Lock()
        self._retries = 0

    @property
    def retries(self) -> int:
        """Attempts repeated so far (the ``pacs_dependency_retries_total`` counter)."""
        with self._lock:
            return self._retries

    def call(self, operation: Callable[[], T], *, retryable: Retryable | None = None) -> T:
        """Run a blocking ``operation`` under the guard.  ``retryable``: a
        narrower predicate for this call (e.g. :func:`never_retry` for a
        request that must not be sent twice)."""
        attempt = 1
        while True:
            self.breaker.before_call()
            try:
                result = operation()
            except BaseException as error:
                if not self._failed(error, attempt, retryable):
                    raise
                self._sleep(self.policy.delay(attempt))
                attempt += 1
                continue
            self.breaker.record_success()
            return result

    async def acall(self, operation: Callable[[], Awaitable[T]], *, retryable: Retryable | None = None) -> T:
        """The same for a coroutine ``operation`` (called anew per attempt)."""
        attempt = 1
        while True:
            self.breaker.before_call()
            try:
                result = await operation()
            except BaseException as error:
                if not self._failed(error, attempt, retryable):
                    raise
                await self._async_sleep(self.policy.delay(attempt))
                attempt += 1
                continue
            self.breaker.record_success()
            return result

    def _failed(self, error: BaseException, attempt: int, retryable: Retryable | None) -> bool:
        """Book a failed attempt; True when another attempt should follow."""
        if not isinstance(error, Exception):  # cancelled, interrupted: no verdict
            self.breaker.abandon()
            return False
        if not self.retryable(error):
            self.breaker.record_success()  # it answered; the error is the caller's
            return False
        self.breaker.record_failure()
        if (retryable is not None and not retryable(error)) or not self.policy.has_attempts_after(attempt):
            return False
        with self._lock:
            self._retries += 1
        return True
