"""The migrator's Prometheus metrics (on a registry handed in, not the global one)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pacs_common.hsm.tiers import TierStatistics

__all__ = ["HsmMetrics"]

_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class HsmMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tier_instances = Gauge(
            "pacs_hsm_tier_instances",
            "Instances the index keeps in each storage tier",
            ["tier"],
            registry=registry,
        )
        self.tier_bytes = Gauge(
            "pacs_hsm_tier_bytes", "Bytes the index keeps in each storage tier", ["tier"], registry=registry
        )
        self.migrated_instances = Counter(
            "pacs_hsm_migrated_instances",
            "Instances moved between storage tiers",
            ["source", "target"],
            registry=registry,
        )
        self.migrated_bytes = Counter(
            "pacs_hsm_migrated_bytes",
            "Bytes moved between storage tiers",
            ["source", "target"],
            registry=registry,
        )
        self.failures = Counter(
            "pacs_hsm_migration_failures",
            "Failed attempts to move an instance, by reason",
            ["source", "target", "reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "pacs_hsm_migration_duration_seconds",
            "Time to move one instance (copy, verify, switch, delete)",
            ["source", "target"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.abandoned = Counter(
            "pacs_hsm_moves_abandoned",
            "Moves dropped because the index moved on (instance deleted or replaced)",
            ["source", "target"],
            registry=registry,
        )
        self.runs = Counter(
            "pacs_hsm_runs", "Migration passes run, by trigger (policy, job)", ["trigger"], registry=registry
        )
        self.restores = Counter(
            "pacs_hsm_restore_passes_processed",
            "Restore requests the migrator's restore passes processed",
            registry=registry,
        )

    def record_tiers(self, statistics: Sequence[TierStatistics]) -> None:
        for entry in statistics:
            self.tier_instances.labels(tier=entry.tier).set(entry.instances)
            self.tier_bytes.labels(tier=entry.tier).set(entry.bytes)
