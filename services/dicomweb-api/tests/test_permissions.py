"""The permission dependency every route declares: who gets 401, 403, through."""

from __future__ import annotations

from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from dicomweb_api.security import AuthenticationError, Permission, Principal, Role, require


class _HeaderAuthenticator:
    """Roles named in a test header; no header means no credentials."""

    async def authenticate(self, request: Request) -> Principal:
        roles = request.headers.get("x-test-roles")
        if roles is None:
            raise AuthenticationError("no credentials")
        return Principal(
            subject="tester", roles=frozenset(Role(r) for r in roles.split(",") if r), method="token"
        )


def _app() -> FastAPI:
    app = FastAPI()
    app.state.authenticator = _HeaderAuthenticator()

    @app.delete("/thing")
    async def delete_thing(
        principal: Annotated[Principal, Depends(require(Permission.DELETE))],
    ) -> dict[str, str]:
        return {"deleted_by": principal.subject}

    return app


@pytest.mark.parametrize(
    ("roles", "status"),
    [(None, 401), ("viewer", 403), ("technologist,radiologist", 403), ("administrator", 200)],
)
async def test_delete_needs_the_delete_permission(roles: str | None, status: int) -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        headers = {"x-test-roles": roles} if roles is not None else {}
        response = await client.delete("/thing", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_permission_is_visible_on_the_dependency() -> None:
    assert require(Permission.READ).permission is Permission.READ
