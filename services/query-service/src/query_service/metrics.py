"""Prometheus metrics of the query-service (registered on the registry given)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["QueryMetrics"]

# Queries are expected in milliseconds; the long tail is a full scan or a slow client.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class QueryMetrics:
    duration: Histogram
    matches: Counter
    failures: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> QueryMetrics:
        return cls(
            duration=Histogram(
                "pacs_query_duration_seconds",
                "Time to answer a query or retrieve, until its last match was sent",
                ["endpoint", "level"],
                buckets=_BUCKETS,
                registry=registry,
            ),
            matches=Counter(
                "pacs_query_matches",
                "Matches (query) or instances (retrieve) returned",
                ["endpoint", "level"],
                registry=registry,
            ),
            failures=Counter(
                "pacs_query_failures",
                "Requests refused as invalid or failed",
                ["endpoint", "code"],
                registry=registry,
            ),
        )
