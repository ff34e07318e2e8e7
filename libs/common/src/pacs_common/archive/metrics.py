"""Restore counters, registered on the registry of the service that counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["RestoreMetrics"]


class RestoreMetrics:
    """``pacs_restore_{requests,completed,failed}_total{tier}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requested = Counter(
            "pacs_restore_requests_total",
            "Restores of archived instances requested (one per new restore job)",
            ["tier"],
            registry=registry,
        )
        self.completed = Counter(
            "pacs_restore_completed_total",
            "Restores whose instance became readable (ONLINE) again",
            ["tier"],
            registry=registry,
        )
        self.failed = Counter(
            "pacs_restore_failed_total",
            "Restores given up (timed out, object or tier missing)",
            ["tier"],
            registry=registry,
        )
