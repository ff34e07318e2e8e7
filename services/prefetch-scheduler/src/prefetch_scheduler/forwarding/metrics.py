"""Prometheus metrics of the forwarder (registered on the registry passed in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["ForwardMetrics"]


class ForwardMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Counter(
            "pacs_forward_instances",
            "Instance send attempts by destination and outcome "
            "(sent, warning, retry: failed and queued again, failed: given up)",
            ["destination", "outcome"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "pacs_forward_queue_depth",
            "Instances queued or being sent, per destination",
            ["destination"],
            registry=registry,
        )
        self.association_failures = Counter(
            "pacs_forward_association_failures",
            "Associations to a destination that could not be established",
            ["destination"],
            registry=registry,
        )
        self.enqueued = Counter(
            "pacs_forward_enqueued",
            "Instances queued for a destination by a routing rule",
            ["destination"],
            registry=registry,
        )
        self.events = Counter(
            "pacs_forward_events",
            "Events handled by the forwarder, by trigger and outcome (matched, unmatched, ignored, dropped)",
            ["trigger", "outcome"],
            registry=registry,
        )
        self.transcodes = Counter(
            "pacs_forward_transcodes",
            "Instances converted because the destination refused the stored transfer syntax",
            ["outcome"],
            registry=registry,
        )
