"""Logs, traces, metrics and health endpoints shared by every service."""

from pacs_common.telemetry.http import (
    HttpTlsSettings,
    ReadinessCheck,
    StopFlag,
    create_observability_app,
    report_stopping,
    serve_http,
)
from pacs_common.telemetry.logging import configure_logging, log_fields
from pacs_common.telemetry.tracing import configure_tracing

__all__ = [
    "HttpTlsSettings",
    "ReadinessCheck",
    "StopFlag",
    "configure_logging",
    "configure_tracing",
    "create_observability_app",
    "log_fields",
    "report_stopping",
    "serve_http",
]
