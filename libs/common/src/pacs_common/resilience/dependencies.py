"""The guards of one process, by dependency name, and their metrics.

A service builds one :class:`Dependencies`, hands it to the clients it wires
(storage tiers, query-service client, remote AEs) and registers it in its
Prometheus registry: at scrape time it reports

* ``pacs_circuit_breaker_state{dependency}`` — 0 closed, 1 open, 2 half-open;
* ``pacs_dependency_retries_total{dependency}`` — attempts repeated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pacs_common.resilience.breaker import BreakerState, CircuitBreaker
from pacs_common.resilience.guard import DependencyGuard
from pacs_common.resilience.retry import Retryable, RetryPolicy
from pacs_common.resilience.settings import ResilienceSettings

__all__ = ["Dependencies", "remote_ae_dependency"]

logger = logging.getLogger(__name__)


def remote_ae_dependency(ae_title: str, host: str, port: int) -> str:
    """The dependency name of a remote AE: ``ae:TITLE@host:port``."""
    return f"ae:{ae_title.strip()}@{host}:{port}"


def _every_error(error: BaseException) -> bool:
    return True


def _log_transition(name: str, state: BreakerState) -> None:
    log = logger.warning if state is BreakerState.OPEN else logger.info
    log("circuit breaker %s is now %s", name, state.name.lower(), extra={"dependency": name})


class Dependencies(Collector):
    """Creates (once per name) and remembers the guards of a process."""

    def __init__(
        self,
        settings: ResilienceSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings or ResilienceSettings()
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._guards: dict[str, DependencyGuard] = {}

    def guard(self, name: str, retryable: Retryable, *, max_attempts: int | None = None) -> DependencyGuard:
        """The guard of ``name``; the first caller's predicate and attempts stick."""
        with self._lock:
            existing = self._guards.get(name)
            if existing is not None:
                return existing
            settings = self.settings
            breaker = CircuitBreaker(
                name,
                failure_threshold=settings.breaker_failure_threshold,
                reset_timeout_seconds=settings.breaker_reset_seconds,
                clock=self._clock,
                on_state_change=_log_transition,
            )
            policy = RetryPolicy(
                max_attempts=max_attempts or settings.retry_max_attempts,
                base_delay_seconds=settings.retry_base_delay_seconds,
                max_delay_seconds=settings.retry_max_delay_seconds,
            )
            guard = DependencyGuard(
                name, policy=policy, breaker=breaker, retryable=retryable, sleep=self._sleep
            )
            self._guards[name] = guard
            return guard

    def breaker(self, name: str) -> CircuitBreaker:
        """Only the breaker of ``name``, for callers with retries of their own
        (remote AEs: the forward queue and prefetch jobs retry later)."""
        return self.guard(name, _every_error, max_attempts=1).breaker

    def guards(self) -> list[DependencyGuard]:
        with self._lock:
            return list(self._guards.values())

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "pacs_circuit_breaker_state",
            "Circuit breaker of a dependency: 0 closed, 1 open, 2 half-open",
            labels=["dependency"],
        )
        retries = CounterMetricFamily(
            "pacs_dependency_retries",
            "Calls to a dependency repeated after a transient failure",
            labels=["dependency"],
        )
        for guard in self.guards():
            state.add_metric([guard.name], float(guard.breaker.state))
            retries.add_metric([guard.name], float(guard.retries))
        yield state
        yield retries
