"""Resilience for outgoing calls: retries with backoff and jitter, circuit
breakers, and their metrics — one implementation for object storage, the
query-service and remote AEs."""

from pacs_common.resilience.breaker import BreakerState, CircuitBreaker, CircuitOpenError, StateListener
from pacs_common.resilience.dependencies import Dependencies, remote_ae_dependency
from pacs_common.resilience.guard import DependencyGuard, never_retry
from pacs_common.resilience.retry import Retryable, RetryPolicy
from pacs_common.resilience.settings import ResilienceSettings

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "Dependencies",
    "DependencyGuard",
    "ResilienceSettings",
    "RetryPolicy",
    "Retryable",
    "StateListener",
    "never_retry",
    "remote_ae_dependency",
]
