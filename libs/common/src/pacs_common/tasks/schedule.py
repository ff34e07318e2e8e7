"""When a task runs next: a 5-field cron expression (evaluated in UTC, by
``croniter``) or a fixed interval in seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["ScheduleError", "next_run", "validate_cron"]


class ScheduleError(ValueError):
    """A cron expression or an interval that cannot be a schedule."""


def validate_cron(expression: str) -> str:
    """The expression, stripped, if it is a valid 5-field cron expression."""
    from croniter import croniter  # type: ignore[import-untyped]

    expression = " ".join(expression.split())
    if len(expression.split(" ")) != 5 or not croniter.is_valid(expression):
        raise ScheduleError(f"not a 5-field cron expression: {expression!r}")
    return expression


def next_run(cron: str | None, interval_seconds: int | None, after: datetime) -> datetime:
    """The first occurrence strictly after ``after`` (an aware datetime)."""
    if (cron is None) == (interval_seconds is None):
        raise ScheduleError("a schedule is a cron expression or an interval, exactly one of them")
    after = after.astimezone(UTC)
    if interval_seconds is not None:
        if interval_seconds <= 0:
            raise ScheduleError("an interval is a positive number of seconds")
        return after + timedelta(seconds=interval_seconds)
    from croniter import croniter

    assert cron is not None
    following: datetime = croniter(validate_cron(cron), after).get_next(datetime)
    return following.astimezone(UTC)
