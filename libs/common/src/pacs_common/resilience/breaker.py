"""A circuit breaker: stop calling a dependency that keeps failing.

CLOSED: calls pass; ``failure_threshold`` consecutive failures open it.
OPEN: calls fail at once with :class:`CircuitOpenError` until
``reset_timeout_seconds`` have passed; then HALF_OPEN: one trial call passes
(others still fail fast); its success closes the breaker, its failure opens
it again for another timeout.

Thread-safe (one lock around a few assignments, never held across a call),
so the same breaker serves association threads and event-loop code.  The
clock is injected: tests drive time by hand.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from enum import IntEnum

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpenError", "StateListener"]


class BreakerState(IntEnum):
    """Numeric values are what the ``pacs_circuit_breaker_state`` gauge shows."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


#: Called (outside the lock) with the breaker's name and its new state.
StateListener = Callable[[str, BreakerState], None]


class CircuitOpenError(Exception):
    """The breaker refused the call: the dependency failed too often lately."""

    def __init__(self, name: str, retry_in_seconds: float) -> None:
        super().__init__(f"{name} is unavailable (circuit open; next trial in {retry_in_seconds:.1f}s)")
        self.name = name
        self.retry_in_seconds = retry_in_seconds


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: StateListener | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.name = name
        self._threshold = failure_threshold
        self._reset_timeout = reset_timeout_seconds
        self._clock = clock
        self._listeners: list[StateListener] = [on_state_change] if on_state_change else []
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    def add_listener(self, listener: StateListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    @property
    def state(self) -> BreakerState:
        """The state now (an OPEN breaker whose timeout passed reads HALF_OPEN)."""
        with self._lock:
            if self._state is BreakerState.OPEN and self._timeout_passed():
                return BreakerState.HALF_OPEN
            return self._state

    def before_call(self) -> None:
        """Raise :class:`CircuitOpenError` unless a call may go ahead now."""
        changed: BreakerState | None = None
        with self._lock:
            if self._state is BreakerState.OPEN:
                if not self._timeout_passed():
                    raise CircuitOpenError(self.name, self._opened_at + self._reset_timeout - self._clock())
                self._state = changed = BreakerState.HALF_OPEN
                self._trial_in_flight = False
            if self._state is BreakerState.HALF_OPEN:
                if self._trial_in_flight:
                    raise CircuitOpenError(self.name, 0.0)
                self._trial_in_flight = True
        self._notify(changed)

    def record_success(self) -> None:
        changed: BreakerState | None = None
        with self._lock:
            self._failures = 0
            self._trial_in_flight = False
            if self._state is not BreakerState.CLOSED:
                self._state = changed = BreakerState.CLOSED
        self._notify(changed)

    def record_failure(self) -> None:
        changed: BreakerState | None = None
        with self._lock:
            self._failures += 1
            self._trial_in_flight = False
            reopen = self._state is BreakerState.HALF_OPEN
            if reopen or (self._state is BreakerState.CLOSED and self._failures >= self._threshold):
                self._state = changed = BreakerState.OPEN
                self._opened_at = self._clock()
        self._notify(changed)

    @contextlib.contextmanager
    def attempt(self, failure: type[BaseException] | tuple[type[BaseException], ...]) -> Iterator[None]:
        """One call through the breaker, for code that cannot be a callable
        (awaits, several statements): raises :class:`CircuitOpenError` when
        refused; a ``failure`` raised inside counts against the dependency,
        any other exception (a cancellation) counts nothing, a normal exit
        counts as success."""
        self.before_call()
        try:
            yield
        except failure:
            self.record_failure()
            raise
        except BaseException:
            self.abandon()
            raise
        self.record_success()

    def abandon(self) -> None:
        """A call that ended without saying whether the dependency works
        (cancelled): free the half-open trial slot, count nothing."""
        with self._lock:
            self._trial_in_flight = False

    def _timeout_passed(self) -> bool:
        return self._clock() - self._opened_at >= self._reset_timeout

    def _notify(self, state: BreakerState | None) -> None:
        if state is None:
            return
        for listener in list(self._listeners):
            listener(self.name, state)
