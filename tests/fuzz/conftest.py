"""Hypothesis budgets for the fuzz tests.

``make test`` runs the ``ci`` profile: a bounded number of cases per test, so
the suite's time stays predictable.  ``make fuzz`` sets
``HYPOTHESIS_PROFILE=long`` for a longer search.  No test here relies on a
deadline: a slow case is not a failure (timings belong to benchmarks).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_FIXTURES = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=_SLOW_FIXTURES, derandomize=False
)
settings.register_profile("long", max_examples=5_000, deadline=None, suppress_health_check=_SLOW_FIXTURES)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
