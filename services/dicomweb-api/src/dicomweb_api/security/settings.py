"""Settings of authentication (``PACS_AUTH_*``); the audit trail has its own
(:class:`pacs_common.audit.AuditSettings`, ``PACS_AUDIT_*``)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dicomweb_api.security.permissions import Role

# Asymmetric algorithms only: a symmetric (HS*) key would be the JWKS itself,
# and "none" is never acceptable.
DEFAULT_ALGORITHMS = [
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]


class AuthSettings(BaseSettings):
    """Who may call the HTTP API."""

    model_config = SettingsConfigDict(env_prefix="PACS_AUTH_", extra="ignore")

    # OIDC bearer tokens: enabled when an issuer is set.  The signing keys
    # come from ``oidc_jwks_url``, or from the issuer's discovery document
    # (``{issuer}/.well-known/openid-configuration``).
    oidc_issuer: str | None = None
    oidc_jwks_url: str | None = None
    oidc_audience: str | None = None
    oidc_algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    # Where the roles are in the token: a claim name, dotted for nested
    # claims (Keycloak's ``realm_access.roles`` is always looked at too).
    roles_claim: str = "roles"
    # Claim values that name a role differently (e.g. {"pacs-admin": "administrator"});
    # a value equal to a role name maps to that role without an entry.
    role_mapping: dict[str, Role] = Field(default_factory=dict)
    # The claim naming the caller in the audit trail.
    subject_claim: str = "preferred_username"
    # Tolerated clock skew for exp / nbf / iat.
    leeway_seconds: int = Field(default=30, ge=0, le=600)
    jwks_cache_seconds: float = Field(default=600.0, gt=0)
    # An unknown key id refreshes the key set, but not more often than this.
    jwks_min_refresh_seconds: float = Field(default=30.0, ge=0)
    http_timeout_seconds: float = Field(default=5.0, gt=0)

    # API tokens (``pacs_…``) stored hashed in PostgreSQL.
    api_tokens_enabled: bool = True
    # Requests without credentials get this role (a demo); None: refused (401).
    anonymous_role: Role | None = None

    @model_validator(mode="after")
    def _oidc_complete(self) -> Self:
        if self.oidc_jwks_url and not self.oidc_issuer:
            raise ValueError(
                "PACS_AUTH_OIDC_ISSUER is required with PACS_AUTH_OIDC_JWKS_URL (iss is checked)"
            )
        if self.oidc_issuer and not self.oidc_audience:
            raise ValueError("PACS_AUTH_OIDC_AUDIENCE is required when OIDC is enabled (aud is checked)")
        if not self.oidc_algorithms:
            raise ValueError("PACS_AUTH_OIDC_ALGORITHMS must not be empty")
        if any(a == "none" or a.startswith("HS") for a in self.oidc_algorithms):
            raise ValueError("only asymmetric JWT algorithms are accepted")
        return self

    @property
    def oidc_enabled(self) -> bool:
        return self.oidc_issuer is not None
