"""Prometheus metrics of the ai-connector."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["ConnectorMetrics"]


class ConnectorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "pacs_ai_jobs_total",
            "Attempts of AI requests by rule and outcome (succeeded, accepted, retried, failed)",
            ["rule", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "pacs_ai_job_duration_seconds",
            "Time of one call to an inference endpoint, results stored included",
            ["rule"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )
        self.requests = Counter(
            "pacs_ai_requests_created_total",
            "AI requests created from study.stable events, by rule",
            ["rule"],
            registry=registry,
        )
        self.results = Counter(
            "pacs_ai_results_stored_total", "DICOM objects stored from inference results", registry=registry
        )
        self.events = Counter(
            "pacs_ai_events_total", "study.stable events consumed, by outcome", ["outcome"], registry=registry
        )
