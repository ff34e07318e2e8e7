"""API tokens: ``pacs_<random>`` secrets for scripts and systems.

Only the sha256 of a secret is stored; the secret is shown once, when the
token is created.  A token belongs to a user (``app_user``) and carries a
subset of that user's roles; it works while it is neither revoked nor
expired and its user is not disabled, with the roles the token and the user
still have in common (taking a role from a user takes it from their tokens).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Final

import asyncpg
from pydantic import BaseModel

from dicomweb_api.security.dependencies import AuthenticationError, Principal
from dicomweb_api.security.permissions import Role

__all__ = [
    "TOKEN_PREFIX",
    "RolesNotHeldError",
    "TokenRecord",
    "TokenStore",
    "UnknownUserError",
    "generate_token_secret",
    "hash_token",
    "roles_from_db",
]

TOKEN_PREFIX: Final = "pacs_"
_SECRET_BYTES: Final = 32
# last_used_at is written at most this often per token (not a write per request).
_LAST_USED_RESOLUTION: Final = "60 seconds"


class UnknownUserError(LookupError):
    """The token's owner does not exist."""


class RolesNotHeldError(ValueError):
    """A token cannot carry roles its owner does not have."""


def generate_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def roles_from_db(values: list[str] | None) -> frozenset[Role]:
    """Roles stored as text; names no longer known are ignored."""
    known = {r.value for r in Role}
    return frozenset(Role(v) for v in values or () if v in known)


class TokenRecord(BaseModel):
    """A token as listed (never its secret)."""

    id: int
    username: str
    name: str
    roles: list[Role]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


_SELECT = """
    SELECT t.pk, u.username, t.name, t.roles, t.created_at, t.expires_at, t.revoked_at, t.last_used_at
    FROM api_token t JOIN app_user u ON u.pk = t.user_fk
"""


def _record(row: asyncpg.Record) -> TokenRecord:
    return TokenRecord(
        id=row["pk"],
        username=row["username"],
        name=row["name"],
        roles=sorted(roles_from_db(row["roles"])),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
    )


class TokenStore:
    """API tokens in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self, username: str, name: str, roles: frozenset[Role] | None, expires_at: datetime | None
    ) -> tuple[TokenRecord, str]:
        """A new token and its secret (the only time the secret is known).

        ``roles`` None: all the user's roles.
        """
        secret = generate_token_secret()
        async with self._pool.acquire() as connection, connection.transaction():
            user = await connection.fetchrow(
                "SELECT pk, roles FROM app_user WHERE username = $1 FOR SHARE", username
            )
            if user is None:
                raise UnknownUserError(username)
            held = roles_from_db(user["roles"])
            wanted = held if roles is None else roles
            missing = wanted - held
            if missing:
                raise RolesNotHeldError(f"user {username} does not have role(s) {', '.join(sorted(missing))}")
            pk = await connection.fetchval(
                """
                INSERT INTO api_token (token_sha256, user_fk, name, roles, expires_at)
                VALUES ($1, $2, $3, $4, $5) RETURNING pk
                """,
                hash_token(secret),
                user["pk"],
                name,
                sorted(r.value for r in wanted),
                expires_at,
            )
            row = await connection.fetchrow(_SELECT + " WHERE t.pk = $1", pk)
        assert row is not None
        return _record(row), secret

    async def list_tokens(
        self, username: str | None = None, include_revoked: bool = False
    ) -> list[TokenRecord]:
        rows = await self._pool.fetch(
            _SELECT
            + """
            WHERE ($1::text IS NULL OR u.username = $1) AND ($2 OR t.revoked_at IS NULL)
            ORDER BY t.pk
            """,
            username,
            include_revoked,
        )
        return [_record(r) for r in rows]

    async def get(self, token_id: int) -> TokenRecord | None:
        row = await self._pool.fetchrow(_SELECT + " WHERE t.pk = $1", token_id)
        return None if row is None else _record(row)

    async def revoke(self, token_id: int) -> TokenRecord | None:
        """Revoke a token (idempotent); None when there is no such token."""
        await self._pool.execute(
            "UPDATE api_token SET revoked_at = now() WHERE pk = $1 AND revoked_at IS NULL", token_id
        )
        return await self.get(token_id)

    async def authenticate(self, secret: str) -> Principal:
        """The principal a secret stands for; :class:`AuthenticationError` says why not."""
        if not secret.startswith(TOKEN_PREFIX):
            raise AuthenticationError("not an API token")
        row = await self._pool.fetchrow(
            """
            SELECT t.pk, t.roles, t.revoked_at, t.expires_at <= now() AS expired,
                   u.username, u.roles AS user_roles, u.disabled
            FROM api_token t JOIN app_user u ON u.pk = t.user_fk
            WHERE t.token_sha256 = $1
            """,
            hash_token(secret),
        )
        if row is None:
            raise AuthenticationError("unknown API token")
        if row["revoked_at"] is not None:
            raise AuthenticationError("API token revoked")
        if row["expired"]:
            raise AuthenticationError("API token expired")
        if row["disabled"]:
            raise AuthenticationError(f"user {row['username']} is disabled")
        await self._pool.execute(
            f"""
            UPDATE api_token SET last_used_at = now()
            WHERE pk = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '{_LAST_USED_RESOLUTION}')
            """,
            row["pk"],
        )
        roles = roles_from_db(row["roles"]) & roles_from_db(row["user_roles"])
        return Principal(subject=row["username"], roles=roles, method="token")
