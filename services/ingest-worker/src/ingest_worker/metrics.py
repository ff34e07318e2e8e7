"""Prometheus metrics of the ingest worker, registered in a registry the
caller owns (no global state: tests and several workers in one process each
get their own)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pacs_common.messaging.broker import Broker

logger = logging.getLogger(__name__)

_BATCH_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LAG_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Counter(
            "pacs_ingest_instances_total",
            "Instances handled by the index, by outcome (created, unchanged, replaced, kept-first)",
            ["outcome"],
            registry=registry,
        )
        self.bytes = Counter(
            "pacs_ingest_bytes_total",
            "Bytes of objects newly indexed (created or replaced)",
            registry=registry,
        )
        self.duplicates = Counter(
            "pacs_ingest_duplicates_total",
            "Duplicate decisions (kept-first, replaced, identical)",
            ["decision"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "pacs_ingest_batch_size", "Deliveries per batch", buckets=_BATCH_SIZES, registry=registry
        )
        self.batch_seconds = Histogram(
            "pacs_ingest_batch_duration_seconds",
            "Time to handle one batch, from delivery to ack",
            buckets=_SECONDS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "pacs_ingest_stage_duration_seconds",
            "Time per batch stage (read_parse, index, publish)",
            ["stage"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.lag_seconds = Histogram(
            "pacs_ingest_lag_seconds",
            "From reception by the gateway to the index commit",
            buckets=_LAG_SECONDS,
            registry=registry,
        )
        self.failures = Counter(
            "pacs_ingest_failures_total",
            "Failures, by stage (read, parse, index, publish) and kind",
            ["stage", "kind"],
            registry=registry,
        )
        self.retried = Counter(
            "pacs_ingest_retried_total", "Deliveries sent to the retry queue", ["kind"], registry=registry
        )
        self.dead_lettered = Counter(
            "pacs_ingest_dead_lettered_total",
            "Deliveries sent to the dead-letter queue",
            ["kind"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "pacs_ingest_queue_depth", "Messages ready in the ingest queue", registry=registry
        )
        self.dead_letter_depth = Gauge(
            "pacs_ingest_dead_letter_queue_depth", "Messages in the dead-letter queue", registry=registry
        )
        self.studies_stable = Counter(
            "pacs_ingest_studies_stable_total", "study.stable events published", registry=registry
        )


async def watch_queue_depth(
    broker: Broker, metrics: WorkerMetrics, stopping: asyncio.Event, interval_seconds: float = 5.0
) -> None:
    """Refresh the queue depth gauges (what queue-depth autoscaling reads)."""
    topology = broker.topology
    while not stopping.is_set():
        try:
            metrics.queue_depth.set(await broker.queue_depth(topology.ingest_queue))
            metrics.dead_letter_depth.set(await broker.queue_depth(topology.dead_letter_queue))
        except Exception as exc:  # broker down: the gauges keep their last value
            logger.debug("queue depth unavailable: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_seconds)
