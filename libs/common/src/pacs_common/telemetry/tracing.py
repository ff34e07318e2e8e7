"""OpenTelemetry tracing: a tracer provider per process, exported over OTLP
when an endpoint is configured.  Trace context crosses RabbitMQ in message
headers (pacs_common.messaging.tracecontext), so a C-STORE span and the
indexing span of the same instance share one trace."""

from __future__ import annotations

import os
import socket

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from pacs_common.settings import TelemetrySettings


def configure_tracing(settings: TelemetrySettings, service: str) -> TracerProvider:
    resource = Resource.create(
        {
            "service.name": service,
            "service.namespace": "pacs",
            "service.instance.id": settings.service_instance or f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider
