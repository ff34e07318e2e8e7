"""The dicomweb-api application: DICOMweb under ``/dicom-web``, the
management REST API under ``/api/v1`` (OpenAPI at ``/docs``), health and
metrics.

``create_app(context, authenticator, registry, audit, backpressure)`` builds
it from what ``main`` (or a test) hands in; nothing is global.  Every
response carries the security headers of :mod:`dicomweb_api.hardening`;
JSON bodies under ``/api/v1`` are limited in size; STOW-RS refuses new
instances (503) while ``backpressure`` says the archive is overloaded.
"""

from __future__ import annotations

import asyncio
from typing import Final

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from dicomweb_api import delete, qido, rendered, stow, wado
from dicomweb_api.api import routes as api_routes
from dicomweb_api.context import ApiContext
from dicomweb_api.hardening import JsonBodyLimit, SecurityHeaders
from dicomweb_api.metrics import DicomwebMetrics
from dicomweb_api.security import Authenticator
from dicomweb_api.security.audit import AuditAfterResponse
from dicomweb_api.security.routes import create_security_router
from pacs_common.audit import AuditLog
from pacs_common.backpressure import Backpressure
from pacs_common.telemetry import create_observability_app

__all__ = ["DICOMWEB_PREFIX", "SERVICE", "create_app"]

SERVICE: Final = "dicomweb-api"
DICOMWEB_PREFIX: Final = "/dicom-web"
API_PREFIX: Final = "/api/v1"


def create_app(
    context: ApiContext,
    authenticator: Authenticator,
    registry: CollectorRegistry,
    audit: AuditLog | None = None,
    backpressure: Backpressure | None = None,
) -> FastAPI:
    async def database_ready() -> bool:
        async with context.pool.acquire() as connection:
            await connection.fetchval("SELECT 1")
        return True

    async def storage_ready() -> bool:
        # The tier STOW-RS writes to answers (a missing probe key is fine).
        await asyncio.to_thread(context.storage.get("hot").stat, ".pacs-readiness-probe")
        return True

    app = create_observability_app(
        SERVICE, {"database": database_ready, "storage": storage_ready}, registry, docs=True
    )
    app.title = "PACS DICOMweb and management API"
    app.state.context = context
    app.state.authenticator = authenticator
    app.state.audit = audit
    app.state.backpressure = backpressure
    app.state.metrics = metrics = DicomwebMetrics(registry)
    if backpressure is not None:
        metrics.backpressure_refusing.set_function(lambda: float(backpressure.refusing))
    for module in (qido, wado, rendered, stow, delete):
        app.include_router(module.create_router(), prefix=DICOMWEB_PREFIX)
    app.include_router(api_routes.create_router(), prefix=API_PREFIX)
    app.include_router(create_security_router(), prefix=API_PREFIX)
    # Audit events are written after the response went out.
    app.add_middleware(AuditAfterResponse)
    settings = context.settings
    app.add_middleware(JsonBodyLimit, max_bytes=settings.max_api_json_bytes, path_prefixes=(API_PREFIX,))
    if settings.cors_allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allowed_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=settings.cors_exposed_headers,
        )
    # Outermost: also on CORS preflights and the body limit's 413.
    app.add_middleware(
        SecurityHeaders, hsts_max_age_seconds=settings.hsts_max_age_seconds, hsts_always=settings.hsts_always
    )
    return app
