"""Authentication: OIDC JWTs verified against a JWKS served over real HTTP,
API tokens in PostgreSQL, and configured anonymous access."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI, Request

from dicomweb_api.security import AuthenticationError, Permission, Principal, Role, require
from dicomweb_api.security.authentication import PacsAuthenticator, build_authenticator, roles_from_claims
from dicomweb_api.security.settings import AuthSettings
from dicomweb_api.security.tokens import TokenStore, hash_token
from dicomweb_api.security.users import UserCreate, UserStore
from pacs_common.audit import AuditAction, AuditLog, AuditOutcome, AuditQuery, AuditSettings

AUDIENCE = "pacs-api"
KID = "test-key-1"


class Issuer:
    """A tiny OIDC issuer: discovery document and JWKS over HTTP, and a signing key."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = KID
        self.jwks_requests = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_requests += 1
                    body = {"keys": [issuer.public_jwk()]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        return jwk

    def sign(
        self,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = KID,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "user-123",
            "preferred_username": "alice",
            "iat": now,
            "exp": now + 300,
            "roles": ["radiologist"],
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        headers = {"kid": kid} if kid else {}
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers=headers)


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def _request(authorization: str | None = None, api_key: str | None = None) -> Request:
    headers: list[tuple[bytes, bytes]] = []
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    if api_key is not None:
        headers.append((b"x-api-key", api_key.encode()))
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""})


async def _oidc(pool: asyncpg.Pool, issuer: Issuer, **overrides: Any) -> PacsAuthenticator:
    values: dict[str, Any] = {
        "oidc_issuer": issuer.url,
        "oidc_jwks_url": issuer.url + "/jwks",
        "oidc_audience": AUDIENCE,
        "leeway_seconds": 0,
    }
    values.update(overrides)
    return await build_authenticator(pool, AuthSettings(**values))


async def _bearer(authenticator: PacsAuthenticator, token: str) -> Principal:
    return await authenticator.authenticate(_request(f"Bearer {token}"))


# --- OIDC ----------------------------------------------------------------------------


async def test_valid_jwt_gives_subject_and_roles(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer)
    principal = await _bearer(authenticator, issuer.sign(roles=["radiologist", "viewer", "someone-else"]))
    assert principal == Principal(
        subject="alice", roles=frozenset({Role.RADIOLOGIST, Role.VIEWER}), method="oidc"
    )


async def test_keys_discovered_from_the_issuer(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer, oidc_jwks_url=None)
    principal = await _bearer(authenticator, issuer.sign())
    assert principal.roles == {Role.RADIOLOGIST}


async def test_keys_are_cached(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer)
    before = issuer.jwks_requests
    for _ in range(5):
        await _bearer(authenticator, issuer.sign())
    assert issuer.jwks_requests == before


async def test_keycloak_realm_roles_and_mapping(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(
        db_pool,
        issuer,
        roles_claim="resource_access.pacs.roles",
        role_mapping={"pacs-admin": "administrator"},
    )
    token = issuer.sign(
        roles=None,
        realm_access={"roles": ["technologist", "offline_access"]},
        resource_access={"pacs": {"roles": ["pacs-admin"]}},
    )
    principal = await _bearer(authenticator, token)
    assert principal.roles == {Role.TECHNOLOGIST, Role.ADMINISTRATOR}


def test_roles_from_a_space_separated_claim() -> None:
    assert roles_from_claims({"scope": "openid viewer"}, "scope", {}) == {Role.VIEWER}


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 10}, "token expired"),
        ({"nbf": int(time.time()) + 3600}, "token not yet valid"),
        ({"iss": "https://elsewhere.example"}, "wrong token issuer"),
        ({"aud": "another-api"}, "wrong token audience"),
        ({"exp": None}, "lacks the 'exp' claim"),
    ],
)
async def test_bad_claims_are_refused(
    db_pool: asyncpg.Pool, issuer: Issuer, claims: dict[str, Any], reason: str
) -> None:
    authenticator = await _oidc(db_pool, issuer)
    with pytest.raises(AuthenticationError, match=reason):
        await _bearer(authenticator, issuer.sign(**claims))


async def test_forged_signature_is_refused(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthenticationError, match="signature invalid"):
        await _bearer(authenticator, issuer.sign(key=other_key, roles=["administrator"]))


async def test_tampered_payload_is_refused(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer)
    header, _, signature = issuer.sign().split(".")
    payload = jwt.utils.base64url_encode(
        json.dumps(
            {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": 2**40, "roles": ["administrator"]}
        ).encode()
    ).decode()
    with pytest.raises(AuthenticationError, match="signature invalid"):
        await _bearer(authenticator, f"{header}.{payload}.{signature}")


async def test_unknown_key_id_is_refused(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer)
    with pytest.raises(AuthenticationError, match="no signing key 'rotated-away'"):
        await _bearer(authenticator, issuer.sign(kid="rotated-away"))


async def test_symmetric_and_none_algorithms_are_refused(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer)
    claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60}
    hs = jwt.encode(claims, "a-shared-secret-that-is-long-enough-for-hs256", algorithm="HS256")
    with pytest.raises(AuthenticationError, match="algorithm 'HS256' is not accepted"):
        await _bearer(authenticator, hs)
    none = jwt.encode(claims, "", algorithm="none")
    with pytest.raises(AuthenticationError, match="algorithm 'none' is not accepted"):
        await _bearer(authenticator, none)


async def test_malformed_token_is_refused(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer)
    with pytest.raises(AuthenticationError, match="malformed bearer token"):
        await _bearer(authenticator, "not-a-jwt")


async def test_jwt_without_oidc_configured_is_refused(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await build_authenticator(db_pool, AuthSettings())
    with pytest.raises(AuthenticationError, match="OIDC is not configured"):
        await _bearer(authenticator, issuer.sign())


async def test_unreachable_issuer_refuses_tokens_but_starts(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(
        db_pool, issuer, oidc_jwks_url="http://127.0.0.1:9/jwks", http_timeout_seconds=1
    )
    with pytest.raises(AuthenticationError, match="cannot fetch the issuer's signing keys"):
        await _bearer(authenticator, issuer.sign())


def test_settings_refuse_an_incomplete_oidc_configuration() -> None:
    with pytest.raises(ValueError, match="AUDIENCE is required"):
        AuthSettings(oidc_issuer="https://idp.example")
    with pytest.raises(ValueError, match="ISSUER is required"):
        AuthSettings(oidc_jwks_url="https://idp.example/jwks")
    with pytest.raises(ValueError, match="asymmetric"):
        AuthSettings(oidc_issuer="https://idp.example", oidc_audience="a", oidc_algorithms=["HS256"])


# --- API tokens ---------------------------------------------------------------------


async def _user(pool: asyncpg.Pool, username: str = "script", roles: list[Role] | None = None) -> None:
    await UserStore(pool).create(
        UserCreate(username=username, roles=roles or [Role.TECHNOLOGIST, Role.VIEWER])
    )


async def test_api_token_in_either_header(db_pool: asyncpg.Pool) -> None:
    await _user(db_pool)
    record, secret = await TokenStore(db_pool).create("script", "ci", frozenset({Role.TECHNOLOGIST}), None)
    assert secret.startswith("pacs_") and len(secret) > 40
    stored = await db_pool.fetchval("SELECT token_sha256 FROM api_token WHERE pk = $1", record.id)
    assert stored == hash_token(secret) and secret not in stored
    authenticator = await build_authenticator(db_pool, AuthSettings())
    expected = Principal(subject="script", roles=frozenset({Role.TECHNOLOGIST}), method="token")
    assert await authenticator.authenticate(_request(f"Bearer {secret}")) == expected
    assert await authenticator.authenticate(_request(api_key=secret)) == expected
    used = await TokenStore(db_pool).get(record.id)
    assert used is not None and used.last_used_at is not None


async def test_api_token_refusals(db_pool: asyncpg.Pool) -> None:
    await _user(db_pool)
    store = TokenStore(db_pool)
    authenticator = await build_authenticator(db_pool, AuthSettings())

    with pytest.raises(AuthenticationError, match="unknown API token"):
        await authenticator.authenticate(_request("Bearer pacs_nothing-like-this"))

    revoked, revoked_secret = await store.create("script", "old", None, None)
    await store.revoke(revoked.id)
    with pytest.raises(AuthenticationError, match="API token revoked"):
        await authenticator.authenticate(_request(f"Bearer {revoked_secret}"))

    _, expired_secret = await store.create("script", "short", None, datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(AuthenticationError, match="API token expired"):
        await authenticator.authenticate(_request(api_key=expired_secret))

    _, secret = await store.create("script", "ok", None, datetime.now(UTC) + timedelta(days=1))
    await db_pool.execute("UPDATE app_user SET disabled = true WHERE username = 'script'")
    with pytest.raises(AuthenticationError, match="user script is disabled"):
        await authenticator.authenticate(_request(f"Bearer {secret}"))

    disabled = await build_authenticator(db_pool, AuthSettings(api_tokens_enabled=False))
    with pytest.raises(AuthenticationError, match="API tokens are disabled"):
        await disabled.authenticate(_request(f"Bearer {secret}"))


async def test_token_roles_follow_the_user(db_pool: asyncpg.Pool) -> None:
    await _user(db_pool)
    store = TokenStore(db_pool)
    _, secret = await store.create("script", "all", None, None)
    authenticator = await build_authenticator(db_pool, AuthSettings())
    principal = await authenticator.authenticate(_request(f"Bearer {secret}"))
    assert principal.roles == {Role.TECHNOLOGIST, Role.VIEWER}
    await db_pool.execute("UPDATE app_user SET roles = '{viewer}' WHERE username = 'script'")
    principal = await authenticator.authenticate(_request(f"Bearer {secret}"))
    assert principal.roles == {Role.VIEWER}


async def test_token_cannot_exceed_the_users_roles(db_pool: asyncpg.Pool) -> None:
    await _user(db_pool, roles=[Role.VIEWER])
    with pytest.raises(ValueError, match="does not have role"):
        await TokenStore(db_pool).create("script", "x", frozenset({Role.ADMINISTRATOR}), None)
    with pytest.raises(LookupError):
        await TokenStore(db_pool).create("nobody", "x", None, None)


# --- anonymous and headers ------------------------------------------------------------


async def test_no_credentials(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    closed = await build_authenticator(db_pool, AuthSettings())
    with pytest.raises(AuthenticationError, match="no credentials"):
        await closed.authenticate(_request())
    demo = await _oidc(db_pool, issuer, anonymous_role="viewer")
    assert await demo.authenticate(_request()) == Principal(
        subject="anonymous", roles=frozenset({Role.VIEWER}), method="anonymous"
    )
    # Bad credentials are refused even where anonymous access is allowed.
    with pytest.raises(AuthenticationError, match="token expired"):
        await _bearer(demo, issuer.sign(exp=int(time.time()) - 10))


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [("Basic dXNlcjpwYXNz", "unsupported authorization scheme 'Basic'"), ("Bearer ", "unsupported")],
)
async def test_unsupported_authorization(db_pool: asyncpg.Pool, authorization: str, reason: str) -> None:
    authenticator = await build_authenticator(db_pool, AuthSettings(anonymous_role="viewer"))
    with pytest.raises(AuthenticationError, match=reason):
        await authenticator.authenticate(_request(authorization))


async def test_through_a_route(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    app = FastAPI()
    app.state.authenticator = await _oidc(db_pool, issuer)

    @app.get("/who")
    async def who(principal: Annotated[Principal, Depends(require(Permission.READ))]) -> dict[str, str]:
        return {"subject": principal.subject}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ok = await client.get("/who", headers={"Authorization": f"Bearer {issuer.sign()}"})
        assert ok.status_code == 200 and ok.json() == {"subject": "alice"}
        expired = await client.get(
            "/who", headers={"Authorization": f"Bearer {issuer.sign(exp=int(time.time()) - 5)}"}
        )
        assert expired.status_code == 401 and expired.json() == {"detail": "token expired"}
        assert expired.headers["www-authenticate"].startswith("Bearer")
        no_role = await client.get("/who", headers={"Authorization": f"Bearer {issuer.sign(roles=[])}"})
        assert no_role.status_code == 403


async def test_rotated_keys_are_fetched(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    authenticator = await _oidc(db_pool, issuer, jwks_min_refresh_seconds=0)
    old_key, old_kid = issuer.key, issuer.kid
    try:
        issuer.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer.kid = "test-key-2"
        principal = await _bearer(authenticator, issuer.sign(kid="test-key-2"))
        assert principal.subject == "alice"
    finally:
        issuer.key, issuer.kid = old_key, old_kid


async def test_refused_credentials_are_audited(db_pool: asyncpg.Pool, issuer: Issuer) -> None:
    settings = AuthSettings(oidc_issuer=issuer.url, oidc_audience=AUDIENCE, anonymous_role="viewer")
    audit = AuditLog(db_pool, AuditSettings())
    authenticator = await build_authenticator(db_pool, settings, audit)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthenticationError):
        await _bearer(authenticator, issuer.sign(key=other_key))
    with pytest.raises(AuthenticationError):
        await authenticator.authenticate(_request(api_key="pacs_guessed"))
    with pytest.raises(AuthenticationError):
        await authenticator.authenticate(_request("Basic eDp5"))
    await authenticator.authenticate(_request())  # anonymous: not a refusal
    await _bearer(authenticator, issuer.sign())  # accepted: not audited per request
    events = await audit.query(AuditQuery())
    assert [(e.event_id, e.action, e.outcome, e.actor_method, e.details["reason"]) for e in events] == [
        (
            "110114",
            AuditAction.EXECUTE,
            AuditOutcome.MINOR_FAILURE,
            "unknown",
            "unsupported authorization scheme 'Basic' (use Bearer)",
        ),
        ("110114", AuditAction.EXECUTE, AuditOutcome.MINOR_FAILURE, "token", "unknown API token"),
        ("110114", AuditAction.EXECUTE, AuditOutcome.MINOR_FAILURE, "oidc", "token signature invalid"),
    ]
