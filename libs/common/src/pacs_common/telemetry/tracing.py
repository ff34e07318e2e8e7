"""OpenTelemetry tracing: a tracer provider per process, exported over OTLP
when an endpoint is configured.  Trace context crosses RabbitMQ in message
headers (pacs_common.messaging.tracecontext), so a C-STORE span and the
indexing span of the same instance share one trace.

Without an endpoint no SDK provider is installed: the API's no-op tracer
costs nothing per C-STORE, where recording spans nobody collects would cost
a few hundred microseconds of CPU each.
"""

from __future__ import annotations

import os
import socket

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from pacs_common.settings import TelemetrySettings


def configure_tracing(settings: TelemetrySettings, service: str) -> TracerProvider | None:
    """Install an exporting tracer provider, or none when tracing is off."""
    if not settings.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    instance = settings.service_instance or f"{socket.gethostname()}-{os.getpid()}"
    resource = Resource.create(
        {"service.name": service, "service.namespace": "pacs", "service.instance.id": instance}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider
