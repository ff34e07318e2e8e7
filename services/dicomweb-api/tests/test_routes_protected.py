"""Every route of the whole app declares the permission it needs.

Builds the app with ``create_app`` (plus the security router, as ``main``
mounts it) and walks ``app.routes``: each one but health, metrics and the
OpenAPI documents must depend, directly or through a sub-dependency, on a
:class:`~dicomweb_api.security.Require`.  A route added without one fails
here, whoever added it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from prometheus_client import CollectorRegistry
from starlette.routing import Route

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.security import AuthenticationError, Permission, Principal, Require, require
from dicomweb_api.security.routes import create_security_router
from dicomweb_api.settings import DicomwebSettings
from pacs_common.messaging.models import IngestMessage
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage

PUBLIC_EXACT = frozenset({"/metrics", "/docs", "/openapi.json"})
PUBLIC_PREFIXES = ("/health/", "/docs/")


class _Nobody:
    async def authenticate(self, request: object) -> Principal:
        raise AuthenticationError("no credentials")


def _refuse(message: IngestMessage) -> None:
    raise RuntimeError("no broker in this test")


def _is_public(path: str) -> bool:
    return path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)


def _requirements(dependant: Dependant) -> Iterator[Permission]:
    """The permissions a route's dependency tree requires."""
    if isinstance(dependant.call, Require):
        yield dependant.call.permission
    for sub in dependant.dependencies:
        yield from _requirements(sub)


def _routes(app: FastAPI) -> Iterator[tuple[str, RouteContext]]:
    """Every route as the OpenAPI generator sees it (included routers resolved)."""
    for context in iter_route_contexts(app.routes):
        yield context.path or "", context


def _unprotected(app: FastAPI) -> list[str]:
    """Routes that are neither public nor require a permission."""
    found: list[str] = []
    for path, context in _routes(app):
        if _is_public(path):
            continue
        dependant = getattr(context, "dependant", None)
        if isinstance(dependant, Dependant) and any(_requirements(dependant)):
            continue
        methods = sorted(context.methods or ["*"])
        found.append(f"{','.join(methods)} {path} ({type(context.original_route).__name__})")
    return found


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    context = ApiContext(
        settings=DicomwebSettings(query_url="http://127.0.0.1:9", spool_dir=tmp_path),
        # Never used: the routes are walked, not called.
        pool=None,  # type: ignore[arg-type]
        query=AsyncQueryClient("http://127.0.0.1:9", timeout_seconds=1),
        storage=StorageRegistry({}),
        receiver=InstanceReceiver(FilesystemStorage(tmp_path / "hot"), "hot", _refuse),
    )
    app = create_app(context, _Nobody(), CollectorRegistry())
    app.include_router(create_security_router(), prefix="/api/v1")
    return app


def test_every_route_requires_a_permission(app: FastAPI) -> None:
    assert _unprotected(app) == []


def test_the_walk_covers_the_whole_api(app: FastAPI) -> None:
    paths = {path for path, _ in _routes(app)}
    # A few routes of each part, so that an empty walk cannot pass.
    assert {"/dicom-web/studies", "/api/v1/users", "/api/v1/tokens", "/api/v1/audit"} <= paths
    assert {"/health/live", "/metrics", "/openapi.json"} <= paths
    api_routes = [c for _, c in _routes(app) if isinstance(c.original_route, APIRoute)]
    assert len(api_routes) > 20


def test_the_walk_finds_an_unprotected_route(app: FastAPI) -> None:
    @app.get("/api/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    @app.get("/api/v1/nested", dependencies=[Depends(require(Permission.READ))])
    async def nested() -> dict[str, str]:
        return {}

    async def plain(request: object) -> None:
        return None

    guarded = APIRouter(dependencies=[Depends(require(Permission.ADMIN))])
    unguarded = APIRouter()

    @guarded.get("/guarded")
    async def guarded_route() -> dict[str, str]:
        return {}

    @unguarded.get("/unguarded")
    async def unguarded_route() -> dict[str, str]:
        return {}

    app.include_router(guarded, prefix="/api/v1/extra")
    app.include_router(unguarded, prefix="/api/v1/extra")
    app.router.routes.append(Route("/starlette-only", plain))
    assert _unprotected(app) == [
        "GET /api/v1/forgotten (APIRoute)",
        "GET /api/v1/extra/unguarded (APIRoute)",
        "GET,HEAD /starlette-only (Route)",
    ]


def test_admin_routes_need_admin(app: FastAPI) -> None:
    security_paths = ("/api/v1/users", "/api/v1/roles", "/api/v1/tokens", "/api/v1/audit")
    checked = 0
    for path, context in _routes(app):
        if path.startswith(security_paths):
            assert set(_requirements(context.dependant)) == {Permission.ADMIN}, path
            checked += 1
    assert checked >= 10
