"""One OpenTelemetry trace per instance, across the queue hop.

The whole PACS exports its spans over OTLP/HTTP to a receiver served by this
test.  An instance sent by C-STORE (DCMTK ``storescu``) and one sent by
STOW-RS each make one trace: the receiving span (the C-STORE, the HTTP
request) is an ancestor of the ingest worker's span, which is the parent of
the span of the index transaction (in between, only spans of the receiving
service: the message carries the context across RabbitMQ); and the worker's JSON log line for the
instance carries the same trace id.
"""

from __future__ import annotations

import gzip
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from pydicom import dcmread

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import storescu
from pacs_e2e.dicomweb import multipart_body
from pacs_e2e.index import IndexReader
from pacs_e2e.system import running_system

pytestmark = pytest.mark.e2e

GATEWAY = "dimse-gateway"
WORKER = "ingest-worker"
DICOMWEB = "dicomweb-api"
WORKER_SPAN = "ingest index"
COMMIT_SPAN = "index commit"
SPAN_WAIT_SECONDS = 30.0
BOUNDARY = "trace-e2e-boundary"
SERVER_KIND = Span.SpanKind.SPAN_KIND_SERVER


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _decode(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        kind=int(span.kind),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                    )
                )
    return spans


class OtlpReceiver:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) keeping every span."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(_decode(request))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for_trace_of(self, sop_instance_uid: str) -> list[ReceivedSpan]:
        """Every span of the trace in which the worker indexed the instance,
        once its receiving, worker and commit spans have all arrived."""
        deadline = time.monotonic() + SPAN_WAIT_SECONDS
        while True:
            spans = self.spans()
            worker = [
                s
                for s in spans
                if s.name == WORKER_SPAN and s.attributes.get("pacs.sop_instance_uid") == sop_instance_uid
            ]
            if worker:
                in_trace = [s for s in spans if s.trace_id == worker[0].trace_id]
                ids = {s.span_id for s in in_trace}
                commit = [s for s in in_trace if s.name == COMMIT_SPAN]
                if commit and worker[0].parent_span_id in ids:
                    return in_trace
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"no complete trace for {sop_instance_uid}; spans seen: {names}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[LocalSystem]:
    env = {
        "PACS_TELEMETRY_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
        "PACS_AUTH_ANONYMOUS_ROLE": "administrator",
    }
    with running_system(tmp_path_factory.mktemp("pacs-trace"), extra_env=env) as system:
        yield system


@pytest.fixture(scope="module")
def index(pacs: LocalSystem) -> IndexReader:
    return IndexReader(pacs.database_url)


def _one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, f"expected one {service} span {name!r}, got {found}"
    return found[0]


def _worker_log_trace_ids(pacs: LocalSystem, sop_instance_uid: str) -> set[str]:
    """trace_id of every JSON log line the workers wrote about the instance."""
    trace_ids: set[str] = set()
    for worker in pacs.workers:
        for line in worker.log_path.read_text(errors="replace").splitlines():
            if sop_instance_uid not in line or not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("sop_instance_uid") == sop_instance_uid:
                trace_ids.add(str(record.get("trace_id")))
    return trace_ids


def _ancestors(trace: list[ReceivedSpan], span: ReceivedSpan) -> list[ReceivedSpan]:
    """``span``'s parent, grandparent, ... as far as the trace has them."""
    by_id = {s.span_id: s for s in trace}
    chain: list[ReceivedSpan] = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain


def _assert_worker_under(trace: list[ReceivedSpan], receiving: ReceivedSpan) -> None:
    """The worker's span descends from ``receiving`` through spans of the
    receiving service only (the message hop), and the commit is its child."""
    worker = _one(trace, WORKER, WORKER_SPAN)
    commit = _one(trace, WORKER, COMMIT_SPAN)
    assert worker.trace_id == receiving.trace_id
    chain = _ancestors(trace, worker)
    shape = [(s.service, s.name) for s in chain]
    assert receiving in chain, f"the worker's span does not descend from {receiving.name!r}: {shape}"
    between = chain[: chain.index(receiving)]
    assert all(s.service == receiving.service for s in between), shape
    assert commit.parent_span_id == worker.span_id, "the index commit is not a child of the worker's span"
    assert worker.attributes.get("pacs.outcome") == "created"
    assert commit.attributes.get("db.system") == "postgresql"


def test_cstore_and_indexing_share_one_trace(
    pacs: LocalSystem, receiver: OtlpReceiver, index: IndexReader, tmp_path: Path
) -> None:
    (path,) = write_ct_series(tmp_path / "ct", 1, rows=32, columns=32, seed=61)
    sop_uid = str(dcmread(path).SOPInstanceUID)
    result = storescu(pacs.gateway_port, [path], called=pacs.ae_title)
    assert result.returncode == 0, result.output
    index.wait_for_instances([sop_uid], timeout=30)

    trace = receiver.wait_for_trace_of(sop_uid)
    store = _one(trace, GATEWAY, "C-STORE")
    assert store.attributes.get("dicom.sop_instance_uid") == sop_uid
    assert store.parent_span_id == "", "the C-STORE span starts the trace"
    _assert_worker_under(trace, store)
    assert _ancestors(trace, _one(trace, WORKER, WORKER_SPAN))[0] == store
    assert _worker_log_trace_ids(pacs, sop_uid) == {store.trace_id}


def test_stow_request_and_indexing_share_the_callers_trace(
    pacs: LocalSystem, receiver: OtlpReceiver, index: IndexReader, tmp_path: Path
) -> None:
    (path,) = write_ct_series(tmp_path / "stow", 1, rows=32, columns=32, seed=62)
    sop_uid = str(dcmread(path).SOPInstanceUID)
    # The client's own trace context: the server continues it.
    client_trace_id, client_span_id = secrets.token_hex(16), secrets.token_hex(8)
    (service,) = pacs.dicomweb_services
    response = requests.post(
        f"{service.base_url}/dicom-web/studies",
        data=multipart_body([("application/dicom", path.read_bytes())], BOUNDARY),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json",
            "traceparent": f"00-{client_trace_id}-{client_span_id}-01",
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    index.wait_for_instances([sop_uid], timeout=30)

    trace = receiver.wait_for_trace_of(sop_uid)
    # The request's server span continues the client's context.
    (request,) = [s for s in trace if s.service == DICOMWEB and s.parent_span_id == client_span_id]
    assert request.trace_id == client_trace_id
    assert request.kind == SERVER_KIND
    assert request.attributes.get("http.response.status_code") == 200
    _assert_worker_under(trace, request)
    assert _worker_log_trace_ids(pacs, sop_uid) == {client_trace_id}
