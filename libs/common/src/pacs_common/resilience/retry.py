"""Retry with exponential backoff and full jitter.

The delay before attempt ``n + 1`` is drawn uniformly from
``[0, min(max_delay, base_delay * multiplier ** (n - 1))]`` ("full jitter"):
replicas that failed together do not come back together.  Only errors a
predicate calls transient are retried; everything else propagates at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RetryPolicy", "Retryable"]

#: Says whether an error is transient (worth another attempt).
Retryable = Callable[[BaseException], bool]


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts, and how long to wait between them."""

    max_attempts: int = 3
    base_delay_seconds: float = 0.1
    max_delay_seconds: float = 2.0
    multiplier: float = 2.0
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_seconds < 0 or self.max_delay_seconds < 0:
            raise ValueError("delays must not be negative")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay_seconds, self.base_delay_seconds * self.multiplier ** (attempt - 1))

    def delay(self, attempt: int) -> float:
        """A jittered wait after failed attempt number ``attempt``."""
        return self.random() * self.ceiling(attempt)

    def has_attempts_after(self, attempt: int) -> bool:
        return attempt < self.max_attempts
