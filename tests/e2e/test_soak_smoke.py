"""A short run of the soak (``make soak``): mixed DIMSE/DICOMweb clients while
a worker and RabbitMQ restart, then the consistency check.  Every failure a
client saw must be retryable, and every acknowledged instance must be indexed
once, byte-identical, with no orphan object or dangling index row."""

from __future__ import annotations

import pytest

from pacs_e2e.soak import SoakConfig, run_soak

pytestmark = pytest.mark.fault


def test_short_soak_with_worker_and_broker_restarts() -> None:
    config = SoakConfig(
        minutes=0.3,
        clients=3,
        seed=7,
        faults=["worker", "rabbitmq"],
        fault_interval_seconds=2.0,
        drain_timeout_seconds=120.0,
    )
    report = run_soak(config, out=None)
    rendered = report.render()
    print(rendered)

    assert report.violations() == [], rendered
    restarted = {r.what.split("-")[0] for r in report.restarts}
    assert {"worker", "rabbitmq"} <= restarted, rendered
    consistency = report.consistency
    assert consistency.acknowledged > 0
    assert consistency.byte_identical == consistency.acknowledged, rendered
    # The broker was down for seconds: stores failed (retryably) and the
    # clients' later retries were acknowledged and indexed.
    retried = [uid for uid in report.ledger.failed_attempts if uid in report.ledger.acknowledged]
    assert retried, rendered
