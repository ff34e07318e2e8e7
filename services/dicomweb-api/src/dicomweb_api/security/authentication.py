"""The authenticator of the HTTP API: OIDC bearer JWTs, API tokens, and
anonymous access where configured.

* ``Authorization: Bearer pacs_…`` or ``X-API-Key: pacs_…``: an API token
  (:mod:`dicomweb_api.security.tokens`).
* ``Authorization: Bearer <JWT>``: an OIDC access token, verified against the
  issuer's JWKS (signature, ``iss``, ``aud``, ``exp``, ``nbf``); roles from a
  configurable claim.
* No credentials: the anonymous role when ``PACS_AUTH_ANONYMOUS_ROLE`` is
  set, else 401.  Credentials that are presented and bad are always refused,
  anonymous access or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import asyncpg
import httpx
import jwt
from fastapi import Request

from dicomweb_api.security.audit import http_actor
from dicomweb_api.security.dependencies import AuthenticationError, Principal
from dicomweb_api.security.permissions import Role
from dicomweb_api.security.settings import AuthSettings
from dicomweb_api.security.tokens import TOKEN_PREFIX, TokenStore
from pacs_common.audit import AuditAction, AuditEventId, AuditLog, AuditOutcome

__all__ = ["JwksCache", "OidcVerifier", "PacsAuthenticator", "build_authenticator", "roles_from_claims"]

logger = logging.getLogger(__name__)

API_KEY_HEADER: Final = "x-api-key"
KEYCLOAK_ROLES_CLAIM: Final = "realm_access.roles"
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"


class JwksCache:
    """The issuer's signing keys, fetched with httpx and kept for a while.

    An unknown key id (the issuer rotated its keys) refreshes the set, at
    most once per ``min_refresh_seconds``.
    """

    def __init__(
        self,
        jwks_url: str | None,
        issuer: str,
        cache_seconds: float,
        min_refresh_seconds: float,
        timeout_seconds: float,
    ) -> None:
        self._jwks_url = jwks_url
        self._issuer = issuer
        self._cache_seconds = cache_seconds
        self._min_refresh_seconds = min_refresh_seconds
        self._timeout = timeout_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def get(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        stale = self._fetched_at is None or now - self._fetched_at > self._cache_seconds
        unknown = self._lookup(kid) is None
        may_refresh = self._fetched_at is None or now - self._fetched_at >= self._min_refresh_seconds
        if stale or (unknown and may_refresh):
            await self.refresh(if_older_than=now)
        key = self._lookup(kid)
        if key is None:
            raise AuthenticationError(
                f"no signing key {kid!r} at the issuer" if kid else "token has no key id"
            )
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # Without a kid, only an issuer with a single key is unambiguous.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def refresh(self, if_older_than: float | None = None) -> None:
        async with self._lock:
            if (
                if_older_than is not None
                and self._fetched_at is not None
                and self._fetched_at >= if_older_than
            ):
                return  # another request refreshed while this one waited
            try:
                async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=True) as client:
                    url = self._jwks_url or await self._discover(client)
                    response = await client.get(url)
                    response.raise_for_status()
                    document = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning("cannot fetch the OIDC signing keys", extra={"error": str(exc)})
                if not self._keys:
                    raise AuthenticationError("cannot fetch the issuer's signing keys") from exc
                return  # keep the keys we have
            self._keys = _parse_jwks(document)
            self._fetched_at = time.monotonic()

    async def _discover(self, client: httpx.AsyncClient) -> str:
        response = await client.get(self._issuer.rstrip("/") + DISCOVERY_PATH)
        response.raise_for_status()
        jwks_uri = response.json().get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError("the discovery document has no jwks_uri")
        self._jwks_url = jwks_uri
        return jwks_uri


def _parse_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise AuthenticationError("the issuer's JWKS is malformed")
    keys: dict[str, jwt.PyJWK] = {}
    for index, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue  # a key type or algorithm we do not support
        keys[str(entry.get("kid", index))] = key
    return keys


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def roles_from_claims(claims: Mapping[str, Any], claim: str, mapping: Mapping[str, Role]) -> frozenset[Role]:
    """The roles named in ``claim`` (a list or a space-separated string) and
    in Keycloak's ``realm_access.roles``; unknown names are ignored."""
    names: list[str] = []
    for path in dict.fromkeys((claim, KEYCLOAK_ROLES_CLAIM)):
        value = _claim(claims, path)
        if isinstance(value, str):
            names.extend(value.split())
        elif isinstance(value, list):
            names.extend(v for v in value if isinstance(v, str))
    known = {r.value for r in Role}
    roles: set[Role] = set()
    for name in names:
        if name in mapping:
            roles.add(mapping[name])
        elif name in known:
            roles.add(Role(name))
    return frozenset(roles)


class OidcVerifier:
    """Verifies OIDC access tokens (JWTs) against the issuer's keys."""

    def __init__(self, settings: AuthSettings, keys: JwksCache) -> None:
        assert settings.oidc_issuer is not None and settings.oidc_audience is not None
        self._settings = settings
        self._issuer = settings.oidc_issuer
        self._audience = settings.oidc_audience
        self._keys = keys

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthenticationError(f"malformed bearer token: {exc}") from exc
        algorithm = header.get("alg")
        if algorithm not in self._settings.oidc_algorithms:
            raise AuthenticationError(f"token algorithm {algorithm!r} is not accepted")
        key = await self._keys.get(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._settings.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError("token not yet valid (nbf)") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError("token signature invalid") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationError(f"wrong token issuer (expected {self._issuer})") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError(f"wrong token audience (expected {self._audience})") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"token lacks the {exc.claim!r} claim") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from exc
        subject = claims.get(self._settings.subject_claim) or claims["sub"]
        roles = roles_from_claims(claims, self._settings.roles_claim, self._settings.role_mapping)
        return Principal(subject=str(subject), roles=roles, method="oidc")


class PacsAuthenticator:
    """The :class:`~dicomweb_api.security.Authenticator` of the service.

    With an ``audit`` log, every refused credential is audited (DICOM User
    Authentication, EventActionCode E, minor failure, with the reason);
    requests that bring no credentials are not.
    """

    def __init__(
        self,
        settings: AuthSettings,
        tokens: TokenStore | None,
        oidc: OidcVerifier | None,
        audit: AuditLog | None = None,
    ) -> None:
        self._anonymous_role = settings.anonymous_role
        self._tokens = tokens
        self._oidc = oidc
        self._audit = audit

    async def authenticate(self, request: Request) -> Principal:
        try:
            credential = _credential(
                request.headers.get("authorization"), request.headers.get(API_KEY_HEADER)
            )
        except AuthenticationError as exc:
            await self._audit_failure(request, "unknown", exc)
            raise
        if credential is None:
            if self._anonymous_role is None:
                raise AuthenticationError("no credentials (Authorization: Bearer … or X-API-Key)")
            return Principal(subject="anonymous", roles=frozenset({self._anonymous_role}), method="anonymous")
        method = "token" if credential.startswith(TOKEN_PREFIX) else "oidc"
        try:
            return await self._verify(credential, method)
        except AuthenticationError as exc:
            await self._audit_failure(request, method, exc)
            raise

    async def _verify(self, credential: str, method: str) -> Principal:
        if method == "token":
            if self._tokens is None:
                raise AuthenticationError("API tokens are disabled")
            return await self._tokens.authenticate(credential)
        if self._oidc is None:
            raise AuthenticationError("bearer token is not an API token and OIDC is not configured")
        return await self._oidc.verify(credential)

    async def _audit_failure(self, request: Request, method: str, error: AuthenticationError) -> None:
        if self._audit is None:
            return
        try:
            await self._audit.record(
                AuditEventId.USER_AUTHENTICATION,
                AuditAction.EXECUTE,
                AuditOutcome.MINOR_FAILURE,
                actor=http_actor(None, request, actor="unknown", actor_method=method),
                details={"reason": str(error), "path": request.url.path},
            )
        except (asyncpg.PostgresError, OSError) as exc:  # the 401 stands; the loss is logged
            logger.error("cannot audit a refused credential", extra={"error": str(exc)})


def _credential(authorization: str | None, api_key: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationError(f"unsupported authorization scheme {scheme!r} (use Bearer)")
        return value.strip()
    if api_key is not None:
        if not api_key.strip():
            raise AuthenticationError("empty X-API-Key")
        return api_key.strip()
    return None


async def build_authenticator(
    pool: asyncpg.Pool, settings: AuthSettings | None = None, audit: AuditLog | None = None
) -> PacsAuthenticator:
    """The authenticator ``settings`` (default: from ``PACS_AUTH_*``) describe;
    refused credentials go to ``audit`` when given.

    With OIDC configured, the signing keys are fetched once now; an issuer
    that cannot be reached is logged, and tried again on the first token.
    """
    settings = settings or AuthSettings()
    tokens = TokenStore(pool) if settings.api_tokens_enabled else None
    oidc: OidcVerifier | None = None
    if settings.oidc_issuer is not None:
        keys = JwksCache(
            settings.oidc_jwks_url,
            settings.oidc_issuer,
            settings.jwks_cache_seconds,
            settings.jwks_min_refresh_seconds,
            settings.http_timeout_seconds,
        )
        try:
            await keys.refresh()
        except AuthenticationError as exc:
            logger.warning("OIDC issuer not reachable at start-up", extra={"error": str(exc)})
        oidc = OidcVerifier(settings, keys)
    if settings.anonymous_role is not None:
        logger.warning("anonymous access enabled", extra={"role": settings.anonymous_role.value})
    return PacsAuthenticator(settings, tokens, oidc, audit)
