"""``/api/v1`` users, roles, tokens and audit, end to end with the real
authenticator: an administrator's API token creates a user and a token for
them, the new token works until revoked, and all of it is in the audit log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from dicomweb_api.context import ApiContext
from dicomweb_api.security import Role
from dicomweb_api.security.authentication import build_authenticator
from dicomweb_api.security.cli import run as run_cli
from dicomweb_api.security.routes import create_security_router
from dicomweb_api.security.settings import AuthSettings
from dicomweb_api.security.tokens import TokenStore
from dicomweb_api.security.users import UserCreate, UserStore
from dicomweb_api.settings import DicomwebSettings
from pacs_common.audit import AuditLog, AuditSettings
from pacs_common.messaging.models import IngestMessage
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage


def _refuse(message: IngestMessage) -> None:
    raise RuntimeError("no broker in these tests")


@pytest.fixture
async def app(db_pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[FastAPI]:
    query = AsyncQueryClient("http://127.0.0.1:9", timeout_seconds=2)
    app = FastAPI()
    app.state.context = ApiContext(
        settings=DicomwebSettings(query_url="http://127.0.0.1:9", spool_dir=tmp_path),
        pool=db_pool,
        query=query,
        storage=StorageRegistry({}),
        receiver=InstanceReceiver(FilesystemStorage(tmp_path / "hot"), "hot", _refuse),
    )
    settings = AuthSettings()
    app.state.authenticator = await build_authenticator(db_pool, settings)
    app.state.audit = AuditLog(db_pool, AuditSettings(source_id="pacs-test"))
    app.include_router(create_security_router(), prefix="/api/v1")
    try:
        yield app
    finally:
        await app.state.audit.aclose()
        await query.aclose()


async def _token(pool: asyncpg.Pool, username: str, roles: list[Role]) -> str:
    await UserStore(pool).create(UserCreate(username=username, roles=roles))
    _, secret = await TokenStore(pool).create(username, "bootstrap", None, None)
    return secret


@pytest.fixture
async def admin(app: FastAPI, db_pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    secret = await _token(db_pool, "root", [Role.ADMINISTRATOR])
    transport = httpx.ASGITransport(app=app, client=("10.9.8.7", 4000))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://testserver/api/v1",
        headers={"Authorization": f"Bearer {secret}"},
    ) as client:
        yield client


def _client(app: FastAPI, secret: str | None) -> httpx.AsyncClient:
    headers = {"X-API-Key": secret} if secret else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver/api/v1", headers=headers
    )


async def test_users_crud(admin: httpx.AsyncClient) -> None:
    created = await admin.post(
        "/users", json={"username": "tech1", "display_name": "Tech One", "roles": ["technologist"]}
    )
    assert created.status_code == 201, created.text
    assert created.json()["roles"] == ["technologist"] and created.json()["disabled"] is False
    duplicate = await admin.post("/users", json={"username": "tech1"})
    assert duplicate.status_code == 409
    bad = await admin.post("/users", json={"username": "no spaces", "roles": ["wizard"]})
    assert bad.status_code == 422

    listed = await admin.get("/users", params={"limit": 10})
    assert [u["username"] for u in listed.json()] == ["root", "tech1"]
    assert (await admin.get("/users", params={"limit": 1, "offset": 1})).json()[0]["username"] == "tech1"

    patched = await admin.patch("/users/tech1", json={"roles": ["viewer", "technologist"], "disabled": True})
    assert patched.status_code == 200
    assert patched.json()["roles"] == ["technologist", "viewer"] and patched.json()["disabled"] is True
    assert patched.json()["display_name"] == "Tech One"
    cleared = await admin.patch("/users/tech1", json={"display_name": None})
    assert cleared.json()["display_name"] is None and cleared.json()["disabled"] is True

    assert (await admin.get("/users/tech1")).json()["username"] == "tech1"
    assert (await admin.delete("/users/tech1")).status_code == 204
    assert (await admin.get("/users/tech1")).status_code == 404
    assert (await admin.delete("/users/tech1")).status_code == 404
    assert (await admin.patch("/users/tech1", json={})).status_code == 404


async def test_roles(admin: httpx.AsyncClient) -> None:
    roles = {r["name"]: r["permissions"] for r in (await admin.get("/roles")).json()}
    assert roles["viewer"] == ["read"]
    assert set(roles) == {r.value for r in Role}


async def test_token_lifecycle(app: FastAPI, admin: httpx.AsyncClient) -> None:
    await admin.post("/users", json={"username": "modality-bot", "roles": ["technologist", "viewer"]})
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    created = await admin.post(
        "/tokens",
        json={"username": "modality-bot", "name": "uploader", "roles": ["viewer"], "expires_at": expires},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body["secret"]
    assert secret.startswith("pacs_") and body["roles"] == ["viewer"] and body["username"] == "modality-bot"

    listed = (await admin.get("/tokens", params={"username": "modality-bot"})).json()
    assert [t["name"] for t in listed] == ["uploader"]
    assert all("secret" not in t for t in listed)
    assert secret not in (await admin.get("/tokens")).text

    async with _client(app, secret) as bot:
        # A viewer may not administer: authenticated (403), not anonymous (401).
        forbidden = await bot.get("/users")
        assert forbidden.status_code == 403

        revoked = await admin.delete(f"/tokens/{body['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        refused = await bot.get("/users")
        assert refused.status_code == 401 and refused.json() == {"detail": "API token revoked"}

    assert (await admin.get("/tokens", params={"username": "modality-bot"})).json() == []
    with_revoked = await admin.get("/tokens", params={"username": "modality-bot", "include_revoked": True})
    assert len(with_revoked.json()) == 1
    assert (await admin.delete("/tokens/999999")).status_code == 404


async def test_token_refusals(admin: httpx.AsyncClient) -> None:
    await admin.post("/users", json={"username": "viewer1", "roles": ["viewer"]})
    too_much = await admin.post(
        "/tokens", json={"username": "viewer1", "name": "x", "roles": ["administrator"]}
    )
    assert too_much.status_code == 422 and "does not have role(s) administrator" in too_much.json()["detail"]
    nobody = await admin.post("/tokens", json={"username": "ghost", "name": "x"})
    assert nobody.status_code == 404
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    expired = await admin.post("/tokens", json={"username": "viewer1", "name": "x", "expires_at": past})
    assert expired.status_code == 422 and expired.json()["detail"] == "expires_at is in the past"


async def test_without_credentials(app: FastAPI) -> None:
    async with _client(app, None) as anonymous:
        for path in ("/users", "/tokens", "/audit", "/audit/fhir", "/roles"):
            response = await anonymous.get(path)
            assert response.status_code == 401, path
    async with _client(app, "pacs_made-up") as forged:
        response = await forged.get("/users")
        assert response.status_code == 401 and response.json() == {"detail": "unknown API token"}


async def test_changes_are_audited_and_queryable(admin: httpx.AsyncClient) -> None:
    await admin.post("/users", json={"username": "rad1", "roles": ["radiologist"]})
    await admin.post("/tokens", json={"username": "rad1", "name": "reading"})
    await admin.delete("/users/rad1")

    events = (await admin.get("/audit", params={"actor": "root"})).json()
    assert [(e["event_id"], e["action"]) for e in events] == [
        ("110113", "D"),
        ("110113", "C"),
        ("110113", "C"),
    ]
    assert events[0]["source_address"] == "10.9.8.7" and events[0]["actor_method"] == "token"
    assert events[2]["objects"] == [{"type": "user", "id": "rad1", "name": None, "query": None}]
    # Reading the audit log is itself audited.
    again = (await admin.get("/audit", params={"limit": 1})).json()
    assert again[0]["event_id"] == "110101" and again[0]["details"]["query"] == {"actor": "root"}

    assert (await admin.get("/audit", params={"actor": "nobody"})).json() == []
    assert (await admin.get("/audit", params={"limit": 0})).status_code == 422
    until = datetime.now(UTC).isoformat()
    wrong = await admin.get("/audit", params={"since": until, "until": until})
    assert wrong.status_code == 422


async def test_audit_as_fhir(admin: httpx.AsyncClient) -> None:
    await admin.post("/users", json={"username": "rad2", "roles": ["radiologist"]})
    response = await admin.get("/audit/fhir", params={"actor": "root"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/fhir+json"
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["total"] == 1
    resource = bundle["entry"][0]["resource"]
    assert resource["resourceType"] == "AuditEvent" and resource["action"] == "C"
    assert resource["type"]["code"] == "110113"
    assert resource["entity"][0]["what"]["identifier"]["value"] == "rad2"
    assert resource["source"]["observer"] == {"display": "pacs-test"}


async def test_bootstrap_cli(
    app: FastAPI,
    db_pool: asyncpg.Pool,
    database_settings: DatabaseSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        await run_cli(["user", "create", "--username", "admin", "--role", "administrator"], database_settings)
        == 0
    )
    assert await run_cli(["user", "create", "--username", "admin"], database_settings) == 1
    assert await run_cli(["token", "create", "--user", "ghost"], database_settings) == 1
    assert await run_cli(["token", "create", "--user", "admin", "--role", "viewer"], database_settings) == 1
    capsys.readouterr()
    assert (
        await run_cli(["token", "create", "--user", "admin", "--expires-days", "1"], database_settings) == 0
    )
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("pacs_")
    async with _client(app, secret) as bootstrapped:
        response = await bootstrapped.get("/users")
        assert response.status_code == 200 and [u["username"] for u in response.json()] == ["admin"]

    assert await run_cli(["token", "list", "--user", "admin"], database_settings) == 0
    token_id = int(capsys.readouterr().out.split("\t")[0])
    assert await run_cli(["token", "revoke", str(token_id)], database_settings) == 0
    assert await run_cli(["token", "revoke", "999999"], database_settings) == 1
    async with _client(app, secret) as revoked:
        assert (await revoked.get("/users")).status_code == 401
