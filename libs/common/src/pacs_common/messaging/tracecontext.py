"""W3C trace context in AMQP headers.

The trace context travels in the message headers (``traceparent``,
``tracestate``), not in the JSON body, so a message keeps its schema when
tracing is off and any AMQP tool sees the context.  The globally configured
OpenTelemetry propagator is used (W3C TraceContext + Baggage by default), so a
process that configures another propagator gets it here too.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter


class _HeadersGetter(Getter[Mapping[str, Any]]):
    """Reads AMQP header values, which arrive as ``str`` or ``bytes``."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes | bytearray):
            return [bytes(value).decode("utf-8", errors="replace")]
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_getter = _HeadersGetter()


def inject_trace_context(
    headers: MutableMapping[str, Any], context: Context | None = None
) -> MutableMapping[str, Any]:
    """Write the current (or given) trace context into ``headers``; returns them."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    headers.update(carrier)
    return headers


def extract_trace_context(headers: Mapping[str, Any] | None) -> Context:
    """Context carried by ``headers``; an empty context when there is none."""
    return propagate.extract(headers or {}, getter=_getter)
