"""The HTTP API: ``POST /v1/query``, ``POST /v1/retrieve`` (and the worklist
router), beside /health and /metrics.

``create_app(pool, settings, registry)`` builds it from what ``main`` (or a
test) hands in; nothing is global.  Invalid requests are answered with 400
and ``{"detail": {"code", "reason"}}`` before any match is sent.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry

from pacs_common.query.client import QUERY_PATH, RETRIEVE_PATH
from pacs_common.query.models import QueryFailure, QueryRequest, RetrieveRequest, RetrieveResponse
from pacs_common.settings import QuerySettings
from pacs_common.telemetry import create_observability_app, log_fields
from query_service.engine import QueryOutcome, stream_matches
from query_service.matching import InvalidKeyError
from query_service.metrics import QueryMetrics
from query_service.plan import InvalidLevelError, plan_query
from query_service.retrieve import retrieve_instances
from query_service.streaming import ndjson_stream

__all__ = ["SERVICE", "create_app"]

SERVICE: Final = "query-service"
logger = logging.getLogger(__name__)


def _refusal(code: str, reason: str) -> HTTPException:
    return HTTPException(status_code=400, detail=QueryFailure(code=code, reason=reason).model_dump())


def _invalid(exc: Exception) -> HTTPException:
    if isinstance(exc, InvalidLevelError):
        return _refusal("invalid-level", str(exc))
    return _refusal("invalid-identifier", str(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A body that does not fit the models: 400 with the contract's error shape."""
    errors: list[Any] = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    code = "invalid-identifier"
    if any(tuple(error.get("loc", ()))[-1:] in {("level",), ("information_model",)} for error in errors):
        code = "invalid-level"
    reason = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    return JSONResponse(
        status_code=400, content={"detail": QueryFailure(code=code, reason=reason or str(exc)).model_dump()}
    )


def create_app(pool: asyncpg.Pool, settings: QuerySettings, registry: CollectorRegistry) -> FastAPI:
    async def database_ready() -> bool:
        async with pool.acquire(timeout=2.0) as connection:
            return bool(await connection.fetchval("SELECT true"))

    app = create_observability_app(SERVICE, {"database": database_ready}, registry)
    app.state.pool = pool
    app.state.settings = settings
    metrics = QueryMetrics.create(registry)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.post(QUERY_PATH)
    async def query(body: QueryRequest) -> StreamingResponse:
        level = str(body.level)
        try:
            plan = plan_query(body, settings)
        except (InvalidKeyError, InvalidLevelError) as exc:
            metrics.failures.labels("query", "invalid").inc()
            raise _invalid(exc) from exc
        started = time.perf_counter()
        outcome = QueryOutcome()

        def finished(completed: bool) -> None:
            elapsed = time.perf_counter() - started
            metrics.duration.labels("query", level).observe(elapsed)
            metrics.matches.labels("query", level).inc(outcome.count)
            logger.info(
                "query answered" if completed else "query ended early",
                extra=log_fields(
                    query_level=level,
                    matches=outcome.count,
                    truncated=outcome.truncated,
                    duration_ms=round(elapsed * 1000, 2),
                    completed=completed,
                ),
            )

        matches = stream_matches(pool, plan, outcome, fetch_size=settings.fetch_size)
        return ndjson_stream(matches, outcome.completion, finished)

    @app.post(RETRIEVE_PATH)
    async def retrieve(body: RetrieveRequest) -> RetrieveResponse:
        level = str(body.level)
        started = time.perf_counter()
        try:
            instances = await retrieve_instances(pool, body)
        except (InvalidKeyError, InvalidLevelError) as exc:
            metrics.failures.labels("retrieve", "invalid").inc()
            raise _invalid(exc) from exc
        metrics.duration.labels("retrieve", level).observe(time.perf_counter() - started)
        metrics.matches.labels("retrieve", level).inc(len(instances))
        return RetrieveResponse(instances=instances)

    _include_worklist(app)
    return app


def _include_worklist(app: FastAPI) -> None:
    """The Modality Worklist router (``query_service.worklist``), once it exists."""
    try:
        from query_service.worklist import create_worklist_router
    except ImportError:
        logger.warning("worklist router not available: /v1/worklist/query is not served")
        return
    app.include_router(create_worklist_router())
