"""The query-service clients' retries and circuit breaker, against a real
HTTP server that fails the way a restarting service or proxy does."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from pacs_common.query import (
    AsyncQueryClient,
    InvalidQueryError,
    QueryClient,
    QueryLevel,
    QueryUnavailableError,
)
from pacs_common.query.models import RetrieveRequest
from pacs_common.resilience import BreakerState, CircuitOpenError, Dependencies, ResilienceSettings
from pacs_common.shutdown import stop_http
from pacs_common.telemetry import serve_http

REQUEST = RetrieveRequest(level=QueryLevel.STUDY, identifier={"0020000D": {"vr": "UI", "Value": ["1.2.3"]}})


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dependencies(clock: Callable[[], float] = time.monotonic, threshold: int = 5) -> Dependencies:
    return Dependencies(
        ResilienceSettings(
            retry_max_attempts=3,
            retry_base_delay_seconds=0.0,
            breaker_failure_threshold=threshold,
            breaker_reset_seconds=30.0,
        ),
        clock=clock,
        sleep=lambda seconds: None,
    )


def scripted_app(statuses: list[int], calls: list[int]) -> FastAPI:
    """/v1/retrieve answers the next scripted status (then 200s)."""
    app = FastAPI()

    @app.post("/v1/retrieve")
    async def retrieve() -> JSONResponse:
        calls.append(1)
        status = statuses.pop(0) if statuses else 200
        if status == 200:
            return JSONResponse({"instances": []})
        detail = {"code": "test", "reason": f"scripted {status}"}
        return JSONResponse({"detail": detail}, status_code=status)

    return app


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_gateway_errors_are_retried_and_refusals_are_not() -> None:
    async def scenario() -> None:
        calls: list[int] = []
        statuses = [503, 502]
        server = await serve_http(scripted_app(statuses, calls), "127.0.0.1", 0)
        port = int(server.servers[0].sockets[0].getsockname()[1])
        deps = dependencies()
        client = AsyncQueryClient(f"http://127.0.0.1:{port}", dependencies=deps)
        try:
            assert await client.retrieve(REQUEST) == []  # 503, 502, then 200
            assert len(calls) == 3
            statuses.append(400)
            with pytest.raises(InvalidQueryError):
                await client.retrieve(REQUEST)  # the service answered: not repeated
            assert len(calls) == 4
            statuses.append(500)  # a failed query: not repeated (it may be the query), but counted
            with pytest.raises(QueryUnavailableError):
                await client.retrieve(REQUEST)
            assert len(calls) == 5
            registry = CollectorRegistry()
            registry.register(deps)
            labels = {"dependency": "query-service"}
            assert registry.get_sample_value("pacs_dependency_retries_total", labels) == 2.0
            assert registry.get_sample_value("pacs_circuit_breaker_state", labels) == 0.0
        finally:
            await client.aclose()
            await stop_http(server, 1)

    asyncio.run(scenario())


def test_breaker_fails_fast_while_the_service_is_down_and_recovers_when_it_is_back() -> None:
    clock = ManualClock()
    deps = dependencies(clock, threshold=3)
    port = closed_port()
    client = QueryClient(f"http://127.0.0.1:{port}", timeout_seconds=2, dependencies=deps)
    try:
        with pytest.raises(QueryUnavailableError) as down:
            client.retrieve(REQUEST)  # refused 3 times: the breaker opens
        assert not isinstance(down.value.__cause__, CircuitOpenError)
        assert client.guard.retries == 2
        assert client.guard.breaker.state is BreakerState.OPEN
        with pytest.raises(QueryUnavailableError) as refused:
            client.retrieve(REQUEST)  # no connection attempted
        assert isinstance(refused.value.__cause__, CircuitOpenError)
        assert refused.value.code == "unavailable"

        async def serve_once() -> None:
            calls: list[int] = []
            server = await serve_http(scripted_app([], calls), "127.0.0.1", port)
            try:
                clock.now += 30.0  # the reset timeout: one trial goes through
                assert await asyncio.to_thread(client.retrieve, REQUEST) == []
                assert calls == [1]
            finally:
                await stop_http(server, 1)

        asyncio.run(serve_once())
        assert client.guard.breaker.state.name == BreakerState.CLOSED.name
    finally:
        client.close()


def test_a_connection_closed_without_an_answer_is_repeated() -> None:
    """What a reused keep-alive connection meets when the server closed it for
    idleness at that moment ("Server disconnected without sending a
    response"): the query is sent again, the caller sees only the answer."""
    body = b'{"instances": []}'
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    connections: list[int] = []

    def serve(listener: socket.socket) -> None:
        for number in range(2):
            conn, _ = listener.accept()
            with conn:
                connections.append(number)
                conn.recv(65536)  # the whole (small) request
                if number == 1:
                    conn.sendall(answer)
                # the first: closed without a byte of response

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        deps = dependencies()
        client = QueryClient(f"http://127.0.0.1:{listener.getsockname()[1]}", dependencies=deps)
        try:
            assert client.retrieve(REQUEST) == []
        finally:
            client.close()
        thread.join(5)
    assert connections == [0, 1]
