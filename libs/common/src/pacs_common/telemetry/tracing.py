"""OpenTelemetry tracing: a tracer provider per process, exported over OTLP
when an endpoint is configured.  Trace context crosses RabbitMQ in message
headers (pacs_common.messaging.tracecontext), so a C-STORE span and the
indexing span of the same instance share one trace.

Without an endpoint no SDK provider is installed: the API's no-op tracer
costs nothing per C-STORE, where recording spans nobody collects would cost
a few hundred microseconds of CPU each.

HTTP requests need nothing here: FastAPI (>= 0.16x) traces every request
with the global provider, a server span continuing the caller's W3C context
(``traceparent``), and handlers run inside it — so a STOW-RS request, the
ingest message it publishes and the indexing share one trace too.
"""

from __future__ import annotations

import os
import socket

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from pacs_common.settings import TelemetrySettings

__all__ = ["configure_tracing"]


def configure_tracing(settings: TelemetrySettings, service: str) -> TracerProvider | None:
    """Install an exporting tracer provider, or none when tracing is off.

    Root spans are sampled at ``settings.trace_sample_ratio``; a span whose
    parent came from elsewhere (a message, a request) follows the parent's
    decision, so a trace is kept or dropped whole across services.
    """
    if not settings.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    instance = settings.service_instance or f"{socket.gethostname()}-{os.getpid()}"
    resource = Resource.create(
        {"service.name": service, "service.namespace": "pacs", "service.instance.id": instance}
    )
    sampler = ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider
