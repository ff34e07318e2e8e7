"""The HTTP face every service has: /health/live, /health/ready, /metrics.

Liveness only says the process answers; readiness runs the service's own
checks (database reachable, broker connected, storage writable) so Kubernetes
stops routing to a pod that cannot do its work — and says "stopping" from
the moment a shutdown starts.  The server speaks HTTPS when
``PACS_HTTP_TLS_CERT_FILE`` / ``PACS_HTTP_TLS_KEY_FILE`` are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Generator, Mapping
from pathlib import Path
from typing import Protocol, Self

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ReadinessCheck = Callable[[], Awaitable[bool]]


class StopFlag(Protocol):
    """``asyncio.Event`` or ``threading.Event``: set once the service is stopping."""

    def is_set(self) -> bool: ...


class HttpTlsSettings(BaseSettings):
    """``PACS_HTTP_TLS_CERT_FILE`` / ``PACS_HTTP_TLS_KEY_FILE`` (PEM): serve
    /health, /metrics (and a service's API) over HTTPS.  Both or neither."""

    model_config = SettingsConfigDict(env_prefix="PACS_HTTP_TLS_", extra="ignore")

    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("PACS_HTTP_TLS_CERT_FILE and PACS_HTTP_TLS_KEY_FILE go together")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


logger = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 3.0
#: ``app.state`` attribute readiness also looks at (apps built elsewhere).
STOPPING_STATE = "stopping"


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
    stopping: StopFlag | None = None,
) -> FastAPI:
    """``docs``: serve the OpenAPI description (``/openapi.json``, ``/docs``);
    ``stopping``: once set, readiness answers 503 without running the checks
    (for an app built by someone else: :func:`report_stopping`)."""
    if docs:
        app = FastAPI(title=f"pacs {service}", redoc_url=None)
    else:
        app = FastAPI(title=f"pacs {service}", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        flag: StopFlag | None = stopping
        if flag is None:
            flag = getattr(request.app.state, STOPPING_STATE, None)
        if flag is not None and flag.is_set():
            return JSONResponse({"status": "stopping", "service": service, "checks": {}}, status_code=503)
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


def report_stopping(app: FastAPI, stopping: StopFlag) -> None:
    """Make readiness of an app from :func:`create_observability_app` say
    "stopping" once ``stopping`` is set."""
    setattr(app.state, STOPPING_STATE, stopping)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a service's loop: the service, not uvicorn, owns SIGTERM."""

    serving_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_http(
    app: FastAPI,
    host: str,
    port: int,
    *,
    tls: HttpTlsSettings | None = None,
    grace_seconds: float | None = None,
) -> uvicorn.Server:
    """Start uvicorn as a task of the running loop.  Stop it with
    :func:`pacs_common.shutdown.stop_http` (in-flight requests get up to the
    grace period; ``server.should_exit = True`` alone does not wait).
    ``tls``: serve HTTPS with that certificate and key."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=math.ceil(grace_seconds) if grace_seconds is not None else None,
        ssl_certfile=tls.cert_file if tls is not None else None,
        ssl_keyfile=tls.key_file if tls is not None else None,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(), name=f"http:{port}")
    server.serving_task = task
    while not server.started:
        if task.done():
            task.result()  # re-raise why it could not start (port in use…)
        await asyncio.sleep(0.01)
    return server
