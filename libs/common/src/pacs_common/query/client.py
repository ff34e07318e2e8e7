"""Clients of the query-service: blocking (pynetdicom association threads)
and async (FastAPI services).

A query streams its matches; iterate a :class:`QueryStream` and read
:attr:`QueryStream.completion` afterwards.  Closing the stream early closes
the HTTP response, which cancels the query on the server (C-CANCEL).

Errors: :class:`InvalidQueryError` when the service refused the request
(HTTP 4xx: malformed identifier, unknown level; the caller answers the peer
with a failure status), :class:`QueryUnavailableError` when the service could
not be reached or failed (the caller answers "unable to process").

Resilience: a request that could not connect, or got a 502/503/504, is sent
again (the query requests are read-only, so repeating one is safe) a
bounded number of times with jittered backoff; consecutive failures open the
``query-service`` circuit breaker, and while it is open calls fail at once
with :class:`QueryUnavailableError` instead of piling up waiting threads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from pacs_common.query.models import (
    NDJSON,
    QueryCompletion,
    QueryFailure,
    QueryLine,
    QueryRequest,
    RetrievableInstance,
    RetrieveRequest,
    RetrieveResponse,
    WorklistQueryRequest,
)
from pacs_common.resilience import CircuitOpenError, Dependencies, DependencyGuard

T = TypeVar("T")

QUERY_PATH = "/v1/query"
WORKLIST_PATH = "/v1/worklist/query"
RETRIEVE_PATH = "/v1/retrieve"
#: The dependency name in metrics (``pacs_circuit_breaker_state{dependency}``).
DEPENDENCY = "query-service"
#: Statuses of a proxy or server that is (re)starting or overloaded: worth another try.
_TRANSIENT_STATUSES = frozenset({502, 503, 504})


class QueryServiceError(Exception):
    """A query did not complete; ``reason`` fits a DIMSE Error Comment first."""

    def __init__(self, reason: str, *, code: str = "internal") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class InvalidQueryError(QueryServiceError):
    """The query-service refused the request as invalid (HTTP 4xx)."""


class QueryUnavailableError(QueryServiceError):
    """The query-service could not be reached, timed out or failed (5xx).
    ``retry_safe``: the request surely was not processed, or repeating it is
    harmless and quick (no connection, gateway errors) — not a timeout."""

    def __init__(self, reason: str, *, code: str = "internal", retry_safe: bool = False) -> None:
        super().__init__(reason, code=code)
        self.retry_safe = retry_safe


def _counts_against_service(error: BaseException) -> bool:
    """For the breaker: the service did not answer properly."""
    return isinstance(error, QueryUnavailableError)


def _retry_safe(error: BaseException) -> bool:
    return isinstance(error, QueryUnavailableError) and error.retry_safe


def _guard(dependencies: Dependencies | None) -> DependencyGuard:
    return (dependencies or Dependencies()).guard(DEPENDENCY, _counts_against_service)


def _unreachable(exc: httpx.HTTPError) -> QueryUnavailableError:
    """A request that got no response.  Repeating it is safe when no
    connection was made, or when the server closed the connection before
    answering: most often a pooled keep-alive connection the server closed
    for idleness just as it was reused ("Server disconnected without sending
    a response").  Queries only read, so even one the service had started
    costs nothing to repeat; a timeout is not repeated (it would double the
    wait)."""
    no_response = isinstance(
        exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.RemoteProtocolError
    )
    return QueryUnavailableError(f"query-service unreachable: {exc!r}", retry_safe=no_response)


def _circuit_open(exc: CircuitOpenError) -> QueryUnavailableError:
    return QueryUnavailableError(str(exc), code="unavailable")


def _failure(response_body: bytes, status_code: int) -> QueryServiceError:
    reason = f"query-service answered HTTP {status_code}"
    code = "internal"
    try:
        detail = json.loads(response_body).get("detail")
        failure = QueryFailure.model_validate(detail)
        reason, code = failure.reason, failure.code
    except (ValueError, AttributeError, ValidationError):
        pass
    if 400 <= status_code < 500:
        return InvalidQueryError(reason, code=code)
    return QueryUnavailableError(reason, code=code, retry_safe=status_code in _TRANSIENT_STATUSES)


def _parse_line(raw: str | bytes) -> QueryLine:
    try:
        return QueryLine.model_validate_json(raw)
    except ValidationError as exc:
        raise QueryUnavailableError(f"query-service sent a malformed line: {exc}") from exc


def _body(request: BaseModel) -> dict[str, Any]:
    return request.model_dump(mode="json", exclude_defaults=True)


class QueryStream:
    """The matches of one query, as they arrive (blocking)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.completion: QueryCompletion | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for raw in self._response.iter_lines():
                if not raw:
                    continue
                line = _parse_line(raw)
                if line.match is not None:
                    yield line.match
                elif line.done is not None:
                    # Not returning yet: reading to the end of the body lets
                    # the connection go back to the pool instead of closing.
                    self.completion = line.done
                elif line.error is not None:
                    raise QueryUnavailableError(line.error.reason, code=line.error.code)
        except httpx.HTTPError as exc:
            raise QueryUnavailableError(f"query-service connection failed: {exc!r}") from exc
        finally:
            self.close()
        if self.completion is None:
            raise QueryUnavailableError("query-service ended the stream without completing")

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> QueryStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class QueryClient:
    """Blocking, thread-safe client (one connection pool for all threads)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_seconds: float = 30.0,
        max_connections: int = 100,
        dependencies: Dependencies | None = None,
    ) -> None:
        self.guard = _guard(dependencies)
        self._client = httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def find(self, request: QueryRequest) -> QueryStream:
        return self._stream(QUERY_PATH, request)

    def worklist(self, request: WorklistQueryRequest) -> QueryStream:
        return self._stream(WORKLIST_PATH, request)

    def retrieve(self, request: RetrieveRequest) -> list[RetrievableInstance]:
        return self._guarded(lambda: self._retrieve_once(request))

    def _retrieve_once(self, request: RetrieveRequest) -> list[RetrievableInstance]:
        try:
            response = self._client.post(RETRIEVE_PATH, json=_body(request))
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code != 200:
            raise _failure(response.content, response.status_code)
        return RetrieveResponse.model_validate_json(response.content).instances

    def _stream(self, path: str, request: BaseModel) -> QueryStream:
        return self._guarded(lambda: self._open_stream(path, request))

    def _open_stream(self, path: str, request: BaseModel) -> QueryStream:
        http_request = self._client.build_request(
            "POST", path, json=_body(request), headers={"accept": NDJSON}
        )
        try:
            response = self._client.send(http_request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code != 200:
            try:
                body = response.read()
            finally:
                response.close()
            raise _failure(body, response.status_code)
        return QueryStream(response)

    def _guarded(self, attempt: Callable[[], T]) -> T:
        try:
            return self.guard.call(attempt, retryable=_retry_safe)
        except CircuitOpenError as exc:
            raise _circuit_open(exc) from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncQueryStream:
    """The matches of one query, as they arrive (async)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.completion: QueryCompletion | None = None

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for raw in self._response.aiter_lines():
                if not raw:
                    continue
                line = _parse_line(raw)
                if line.match is not None:
                    yield line.match
                elif line.done is not None:
                    self.completion = line.done  # read on to the end: keeps the connection
                elif line.error is not None:
                    raise QueryUnavailableError(line.error.reason, code=line.error.code)
        except httpx.HTTPError as exc:
            raise QueryUnavailableError(f"query-service connection failed: {exc!r}") from exc
        finally:
            await self.aclose()
        if self.completion is None:
            raise QueryUnavailableError("query-service ended the stream without completing")

    async def aclose(self) -> None:
        await self._response.aclose()


class AsyncQueryClient:
    """Async client for FastAPI services (dicomweb-api)."""

    def __init__(
        self, base_url: str, *, timeout_seconds: float = 30.0, dependencies: Dependencies | None = None
    ) -> None:
        self.guard = _guard(dependencies)
        self._client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_seconds))

    async def find(self, request: QueryRequest) -> AsyncQueryStream:
        return await self._stream(QUERY_PATH, request)

    async def worklist(self, request: WorklistQueryRequest) -> AsyncQueryStream:
        return await self._stream(WORKLIST_PATH, request)

    async def retrieve(self, request: RetrieveRequest) -> list[RetrievableInstance]:
        return await self._guarded(lambda: self._retrieve_once(request))

    async def _retrieve_once(self, request: RetrieveRequest) -> list[RetrievableInstance]:
        try:
            response = await self._client.post(RETRIEVE_PATH, json=_body(request))
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code != 200:
            raise _failure(response.content, response.status_code)
        return RetrieveResponse.model_validate_json(response.content).instances

    async def _stream(self, path: str, request: BaseModel) -> AsyncQueryStream:
        return await self._guarded(lambda: self._open_stream(path, request))

    async def _guarded(self, attempt: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self.guard.acall(attempt, retryable=_retry_safe)
        except CircuitOpenError as exc:
            raise _circuit_open(exc) from exc

    async def _open_stream(self, path: str, request: BaseModel) -> AsyncQueryStream:
        http_request = self._client.build_request(
            "POST", path, json=_body(request), headers={"accept": NDJSON}
        )
        try:
            response = await self._client.send(http_request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code != 200:
            try:
                body = await response.aread()
            finally:
                await response.aclose()
            raise _failure(body, response.status_code)
        return AsyncQueryStream(response)

    async def aclose(self) -> None:
        await self._client.aclose()
