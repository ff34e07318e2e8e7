"""Prometheus metrics of the dicomweb-api, registered in a registry passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class DicomwebMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # Backpressure (pacs_common.backpressure): STOW-RS requests refused with 503.
        self.backpressure_refusing = Gauge(
            "pacs_dicomweb_backpressure_refusing",
            "1 while STOW-RS requests are refused because the archive is overloaded, else 0.",
            registry=registry,
        )
        self.backpressure_refusals = Counter(
            "pacs_dicomweb_backpressure_refusals",
            "STOW-RS requests refused for backpressure, by reason (ingest_backlog, storage_latency).",
            ["reason"],
            registry=registry,
        )
