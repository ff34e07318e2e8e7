"""Prometheus metrics of the scheduled tasks (on the registry the service gives)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["TaskMetrics"]


class TaskMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "pacs_task_runs",
            "Runs of scheduled tasks by how they ended",
            ["task", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "pacs_task_duration_seconds",
            "How long runs of scheduled tasks took",
            ["task"],
            buckets=(1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
            registry=registry,
        )
        self.last_success = Gauge(
            "pacs_task_last_success_timestamp_seconds",
            "When a run of the task last succeeded (Unix time)",
            ["task"],
            registry=registry,
        )
        self.integrity_mismatches = Counter(
            "pacs_integrity_mismatches",
            "Stored objects that do not match the index (missing, or other size or sha256)",
            ["tier", "kind"],
            registry=registry,
        )
        self.integrity_last_run_problems = Gauge(
            "pacs_integrity_last_run_problems",
            "Problems the last integrity run found, by kind",
            ["kind"],
            registry=registry,
        )
        self.integrity_checked = Counter(
            "pacs_integrity_objects_checked",
            "Objects re-hashed by integrity runs",
            ["tier"],
            registry=registry,
        )
        self.retention_deleted = Counter(
            "pacs_retention_deleted_studies", "Studies deleted by retention", registry=registry
        )
        self.orphans_deleted = Counter(
            "pacs_orphans_deleted", "Unreferenced objects deleted", ["tier"], registry=registry
        )
