"""Prometheus metrics of sync (registered on the registry passed in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["SyncMetrics"]


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "pacs_sync_runs",
            "Sync runs by relation and outcome (succeeded, partial, failed)",
            ["relation", "outcome"],
            registry=registry,
        )
        self.instances = Counter(
            "pacs_sync_instances",
            "Instances a sync moved, by relation and direction (pull, push)",
            ["relation", "direction"],
            registry=registry,
        )
        self.conflicts = Counter(
            "pacs_sync_conflicts",
            "Same SOP Instance UID with different content on both sides, by relation",
            ["relation"],
            registry=registry,
        )
