"""The HTTP face every service has: /health/live, /health/ready, /metrics.

Liveness only says the process answers; readiness runs the service's own
checks (database reachable, broker connected, storage writable) so Kubernetes
stops routing to a pod that cannot do its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Generator, Mapping

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Awaitable[bool]]

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 3.0


async def _run_check(check: ReadinessCheck) -> bool:
    try:
        return await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except Exception:  # a failing check means "not ready", whatever the cause
        logger.debug("readiness check failed", exc_info=True)
        return False


def create_observability_app(
    service: str,
    readiness: Mapping[str, ReadinessCheck],
    registry: CollectorRegistry,
    *,
    docs: bool = False,
) -> FastAPI:
    """``docs``: serve the OpenAPI description (``/openapi.json``, ``/docs``)."""
    if docs:
        app = FastAPI(title=f"pacs {service}", redoc_url=None)
    else:
        app = FastAPI(title=f"pacs {service}", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        names = list(readiness)
        results = await asyncio.gather(*(_run_check(readiness[name]) for name in names))
        checks = {name: ("ok" if ok else "failing") for name, ok in zip(names, results, strict=True)}
        healthy = all(results)
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", "service": service, "checks": checks},
            status_code=200 if healthy else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a service's loop: the service, not uvicorn, owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_http(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """Start uvicorn as a task of the running loop; ``server.should_exit = True`` stops it."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off")
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(), name=f"http:{port}")
    while not server.started:
        if task.done():
            task.result()  # re-raise why it could not start (port in use…)
        await asyncio.sleep(0.01)
    return server
