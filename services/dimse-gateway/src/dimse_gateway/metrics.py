"""Prometheus metrics of the gateway, registered in a registry passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.associations = Counter(
            "pacs_dimse_associations",
            "Association requests by outcome (accepted, rejected, aborted, released).",
            ["outcome"],
            registry=registry,
        )
        self.active_associations = Gauge(
            "pacs_dimse_active_associations", "Associations open right now.", registry=registry
        )
        self.operations = Counter(
            "pacs_dimse_operations",
            "DIMSE operations answered, by operation and status.",
            ["operation", "status"],
            registry=registry,
        )
        self.store_bytes = Counter(
            "pacs_dimse_store_bytes", "Bytes of instances stored through C-STORE.", registry=registry
        )
        self.store_seconds = Histogram(
            "pacs_dimse_store_seconds",
            "Time from a complete C-STORE request to its response (validate, store, publish).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        # Query/retrieve.  Requests by final status are in `operations`
        # (operation C-FIND / C-MOVE / C-GET).
        self.find_matches = Counter(
            "pacs_dimse_find_matches",
            "C-FIND pending responses sent, by Q/R level.",
            ["level"],
            registry=registry,
        )
        self.suboperations = Counter(
            "pacs_dimse_suboperations",
            "C-STORE sub-operations of C-MOVE / C-GET, by operation and outcome (completed, warning, failed).",
            ["operation", "outcome"],
            registry=registry,
        )
        self.transcodes = Counter(
            "pacs_dimse_transcodes",
            "Instances converted to another transfer syntax for a peer, by outcome (converted, failed).",
            ["outcome"],
            registry=registry,
        )
        self.retrieve_seconds = Histogram(
            "pacs_dimse_retrieve_seconds",
            "Time from a C-FIND / C-MOVE / C-GET request to its final response.",
            ["operation"],
            buckets=(*_LATENCY_BUCKETS, 60, 300, 900),
            registry=registry,
        )
        self.audit_dropped = Counter(
            "pacs_dimse_audit_dropped",
            "Audit events not written, by reason (queue_full, database); the DICOM operations went on.",
            ["reason"],
            registry=registry,
        )
        # DICOM TLS and the AE-title policy (dimse_gateway.tls, dimse_gateway.policy).
        self.tls_handshake_failures = Counter(
            "pacs_dimse_tls_handshake_failures",
            "TLS connections refused before any PDU, by reason (certificate, protocol, timeout, closed).",
            ["reason"],
            registry=registry,
        )
        self.policy_refusals = Counter(
            "pacs_dimse_policy_refusals",
            "Refused by the AE-title policy: stage association (reason of the A-ASSOCIATE-RJ) "
            "or request (the operation answered 0x0124).",
            ["stage", "reason"],
            registry=registry,
        )
        # Backpressure (pacs_common.backpressure): C-STOREs refused with 0xA700.
        self.backpressure_refusing = Gauge(
            "pacs_dimse_backpressure_refusing",
            "1 while C-STOREs are refused because the archive is overloaded, else 0.",
            registry=registry,
        )
        self.backpressure_refusals = Counter(
            "pacs_dimse_backpressure_refusals",
            "C-STOREs refused for backpressure, by reason (ingest_backlog, storage_latency).",
            ["reason"],
            registry=registry,
        )
