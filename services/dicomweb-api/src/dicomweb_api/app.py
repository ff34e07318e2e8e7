"""The dicomweb-api application: DICOMweb under ``/dicom-web``, the
management REST API under ``/api/v1`` (OpenAPI at ``/docs``), health and
metrics.

``create_app(context, authenticator, registry, audit)`` builds it from what
``main`` (or a test) hands in; nothing is global.
"""

from __future__ import annotations

from typing import Final

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from dicomweb_api import delete, qido, rendered, stow, wado
from dicomweb_api.api import routes as api_routes
from dicomweb_api.context import ApiContext
from dicomweb_api.security import Authenticator
from dicomweb_api.security.audit import AuditAfterResponse
from dicomweb_api.security.routes import create_security_router
from pacs_common.audit import AuditLog
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
) -> FastAPI:
    async def database_ready() -> bool:
        async with context.pool.acquire() as connection:
            await connection.fetchval("SELECT 1")
        return True

    app = create_observability_app(SERVICE, {"database": database_ready}, registry, docs=True)
    app.title = "PACS DICOMweb and management API"
    app.state.context = context
    app.state.authenticator = authenticator
    app.state.audit = audit
    for module in (qido, wado, rendered, stow, delete):
        app.include_router(module.create_router(), prefix=DICOMWEB_PREFIX)
    app.include_router(api_routes.create_router(), prefix=API_PREFIX)
    app.include_router(create_security_router(), prefix=API_PREFIX)
    # Audit events are written after the response went out.
    app.add_middleware(AuditAfterResponse)
    settings = context.settings
    if settings.cors_allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allowed_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=settings.cors_exposed_headers,
        )
    return app
