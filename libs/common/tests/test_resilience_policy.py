"""Retry policy, circuit breaker and guard logic, with a hand-driven clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from pacs_common.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Dependencies,
    DependencyGuard,
    ResilienceSettings,
    RetryPolicy,
    never_retry,
)


class FakeClock:
    """Time that moves only when told; ``sleep`` moves it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


class TransientError(Exception):
    """A failure worth another attempt."""


class AnswerError(Exception):
    """An error that proves the dependency answered (e.g. not found)."""


def transient(error: BaseException) -> bool:
    return isinstance(error, TransientError)


def flaky(failures: int, result: str = "ok") -> tuple[list[int], Callable[[], str]]:
    calls = [0]

    def operation() -> str:
        calls[0] += 1
        if calls[0] <= failures:
            raise TransientError(f"failure {calls[0]}")
        return result

    return calls, operation


def make_guard(
    clock: FakeClock, *, attempts: int = 3, threshold: int = 5, reset: float = 10.0, jitter: float = 1.0
) -> DependencyGuard:
    return DependencyGuard(
        "dep",
        policy=RetryPolicy(
            max_attempts=attempts, base_delay_seconds=0.1, max_delay_seconds=1.0, random=lambda: jitter
        ),
        breaker=CircuitBreaker("dep", failure_threshold=threshold, reset_timeout_seconds=reset, clock=clock),
        retryable=transient,
        sleep=clock.sleep,
        async_sleep=clock.async_sleep,
    )


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """Read anew each time (no narrowing across calls that change it)."""
    return breaker.state


# -- retry policy ------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_jitter_spans_zero_to_the_ceiling() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_seconds=0.1, max_delay_seconds=1.0, random=lambda: 1.0)
    assert [policy.ceiling(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.delay(3) == pytest.approx(0.4)
    assert RetryPolicy(base_delay_seconds=0.1, random=lambda: 0.0).delay(3) == 0.0
    assert RetryPolicy(base_delay_seconds=0.1, random=lambda: 0.5).delay(2) == pytest.approx(0.1)


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(base_delay_seconds=-1)


# -- guard: retries ------------------------------------------------------------


def test_transient_failures_are_retried_with_backoff_until_success() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    calls, operation = flaky(2)
    assert guard.call(operation) == "ok"
    assert calls[0] == 3
    assert clock.slept == pytest.approx([0.1, 0.2])
    assert guard.retries == 2
    assert guard.breaker.state is BreakerState.CLOSED


def test_attempts_are_bounded_and_the_last_error_propagates() -> None:
    clock = FakeClock()
    guard = make_guard(clock, attempts=3)
    calls, operation = flaky(10)
    with pytest.raises(TransientError, match="failure 3"):
        guard.call(operation)
    assert calls[0] == 3
    assert guard.retries == 2


def test_errors_that_are_answers_are_not_retried_and_do_not_trip_the_breaker() -> None:
    clock = FakeClock()
    guard = make_guard(clock, threshold=1)
    calls = [0]

    def not_found() -> None:
        calls[0] += 1
        raise AnswerError("no such key")

    for _ in range(3):
        with pytest.raises(AnswerError):
            guard.call(not_found)
    assert calls[0] == 3
    assert clock.slept == []
    assert guard.breaker.state is BreakerState.CLOSED


def test_a_call_marked_unsafe_to_repeat_is_tried_once_but_still_counted() -> None:
    clock = FakeClock()
    guard = make_guard(clock, threshold=1)
    calls, operation = flaky(5)
    with pytest.raises(TransientError):
        guard.call(operation, retryable=never_retry)
    assert calls[0] == 1
    assert guard.breaker.state is BreakerState.OPEN


def test_async_calls_retry_the_same_way() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    calls = [0]

    async def operation() -> str:
        calls[0] += 1
        if calls[0] < 3:
            raise TransientError("down")
        return "ok"

    assert asyncio.run(guard.acall(operation)) == "ok"
    assert calls[0] == 3
    assert clock.slept == pytest.approx([0.1, 0.2])


# -- breaker -------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_fails_fast() -> None:
    clock = FakeClock()
    guard = make_guard(clock, attempts=1, threshold=3)
    calls, operation = flaky(100)
    for _ in range(3):
        with pytest.raises(TransientError):
            guard.call(operation)
    assert guard.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as refused:
        guard.call(operation)
    assert calls[0] == 3  # not called while open
    assert refused.value.retry_in_seconds == pytest.approx(10.0)


def test_a_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker("dep", failure_threshold=3, clock=FakeClock())
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    breaker.before_call()
    breaker.record_success()
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def _state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # read anew (mypy would keep the state narrowed by an earlier assert)


def test_an_attempt_block_counts_its_failures_successes_and_cancellations() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("dep", failure_threshold=2, reset_timeout_seconds=10, clock=clock)
    with pytest.raises(ConnectionRefusedError), breaker.attempt(ConnectionRefusedError):
        raise ConnectionRefusedError
    with breaker.attempt(ConnectionRefusedError):
        pass  # a success resets the count
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError), breaker.attempt(ConnectionRefusedError):
            raise ConnectionRefusedError
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError), breaker.attempt(ConnectionRefusedError):
        raise AssertionError("an open breaker must not let the block run")
    clock.now += 10
    # The half-open trial is cancelled: nothing counted, the slot is free for the next.
    with pytest.raises(asyncio.CancelledError), breaker.attempt(ConnectionRefusedError):
        raise asyncio.CancelledError
    assert _state_of(breaker) is BreakerState.HALF_OPEN
    with breaker.attempt(ConnectionRefusedError):
        pass
    assert _state_of(breaker) is BreakerState.CLOSED


def test_half_open_lets_one_trial_through_which_closes_or_reopens() -> None:
    clock = FakeClock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(
        "dep",
        failure_threshold=1,
        reset_timeout_seconds=10.0,
        clock=clock,
        on_state_change=lambda name, state: changes.append(state),
    )
    breaker.before_call()
    breaker.record_failure()
    assert state_of(breaker) is BreakerState.OPEN
    clock.now += 9.9
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    clock.now += 0.1
    assert state_of(breaker) is BreakerState.HALF_OPEN
    breaker.before_call()  # the trial
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # a second caller while the trial runs
    breaker.record_failure()  # trial failed: open for another timeout
    assert state_of(breaker) is BreakerState.OPEN
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    clock.now += 10.0
    breaker.before_call()
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED
    breaker.before_call()  # closed: everyone passes
    breaker.before_call()
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_a_cancelled_trial_frees_the_half_open_slot() -> None:
    clock = FakeClock()
    guard = make_guard(clock, attempts=1, threshold=1, reset=5.0)
    _, failing = flaky(100)
    with pytest.raises(TransientError):
        guard.call(failing)
    clock.now += 5.0

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guard.call(interrupted)
    assert guard.call(lambda: "ok") == "ok"
    assert guard.breaker.state is BreakerState.CLOSED


def test_breaker_counts_exactly_under_concurrent_threads() -> None:
    breaker = CircuitBreaker("dep", failure_threshold=400, clock=FakeClock())
    barrier = threading.Barrier(8)

    def fail_many() -> None:
        barrier.wait()
        for _ in range(50):
            breaker.before_call()
            breaker.record_failure()

    threads = [threading.Thread(target=fail_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 8 x 50 = 400 failures: exactly the threshold, so open — 399 would not be.
    assert breaker.state is BreakerState.OPEN


# -- metrics -------------------------------------------------------------------


def test_dependencies_export_breaker_state_and_retry_counts() -> None:
    clock = FakeClock()
    settings = ResilienceSettings(
        retry_max_attempts=2,
        retry_base_delay_seconds=0.0,
        breaker_failure_threshold=2,
        breaker_reset_seconds=5,
    )
    dependencies = Dependencies(settings, clock=clock, sleep=clock.sleep)
    registry = CollectorRegistry()
    registry.register(dependencies)
    guard = dependencies.guard("query-service", transient)
    assert dependencies.guard("query-service", never_retry) is guard  # one guard per name
    _, failing = flaky(100)
    with pytest.raises(TransientError):
        guard.call(failing)
    dependencies.breaker("ae:ORTHANC@127.0.0.1:4242")

    def sample(name: str, dependency: str) -> float | None:
        return registry.get_sample_value(name, {"dependency": dependency})

    assert sample("pacs_circuit_breaker_state", "query-service") == float(BreakerState.OPEN)
    assert sample("pacs_dependency_retries_total", "query-service") == 1.0
    assert sample("pacs_circuit_breaker_state", "ae:ORTHANC@127.0.0.1:4242") == float(BreakerState.CLOSED)
    clock.now += 5.0
    assert sample("pacs_circuit_breaker_state", "query-service") == float(BreakerState.HALF_OPEN)
