"""Prometheus metrics of the prefetch (on the registry ``main`` passes in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["PrefetchMetrics"]

_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class PrefetchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pacs_prefetch_requests",
            "Prefetch jobs created from the worklist, by trigger (created, due)",
            ["trigger"],
            registry=registry,
        )
        self.jobs = Counter(
            "pacs_prefetch_jobs",
            "Prefetch job attempts by outcome (done, retried, failed, cancelled, interrupted)",
            ["outcome"],
            registry=registry,
        )
        self.studies = Counter(
            "pacs_prefetch_studies",
            "Prior studies by outcome (moved, skipped-local, failed)",
            ["outcome"],
            registry=registry,
        )
        self.operations = Counter(
            "pacs_prefetch_dimse_operations",
            "C-FIND / C-MOVE requests to remote PACS by outcome (ok, failed)",
            ["operation", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "pacs_prefetch_duration_seconds",
            "Duration of one prefetch job attempt (query, moves, wait for the index), by outcome",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
