"""Users of API tokens and their roles (``app_user``).

OIDC users need no row here (their roles come from the identity provider);
a row is for the owners of API tokens: people, scripts, other systems.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
from pydantic import BaseModel, Field

from dicomweb_api.security.permissions import Role
from dicomweb_api.security.tokens import roles_from_db

__all__ = ["UserCreate", "UserExistsError", "UserPublic", "UserStore", "UserUpdate"]

USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"


class UserExistsError(ValueError):
    """A user with that name exists already."""


class UserBase(BaseModel):
    display_name: str | None = Field(default=None, max_length=256)
    roles: list[Role] = Field(default_factory=list)
    disabled: bool = False


class UserCreate(UserBase):
    username: str = Field(pattern=USERNAME_PATTERN)


class UserUpdate(BaseModel):
    """Fields to change (absent: unchanged)."""

    display_name: str | None = Field(default=None, max_length=256)
    roles: list[Role] | None = None
    disabled: bool | None = None


class UserPublic(UserBase):
    username: str
    created_at: datetime
    updated_at: datetime


_COLUMNS = "username, display_name, roles, disabled, created_at, updated_at"


def _public(row: asyncpg.Record) -> UserPublic:
    return UserPublic(
        username=row["username"],
        display_name=row["display_name"],
        roles=sorted(roles_from_db(row["roles"])),
        disabled=row["disabled"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _role_values(roles: list[Role]) -> list[str]:
    return sorted({r.value for r in roles})


class UserStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(self, user: UserCreate) -> UserPublic:
        try:
            row = await self._pool.fetchrow(
                f"""
                INSERT INTO app_user (username, display_name, roles, disabled)
                VALUES ($1, $2, $3, $4) RETURNING {_COLUMNS}
                """,
                user.username,
                user.display_name,
                _role_values(user.roles),
                user.disabled,
            )
        except asyncpg.UniqueViolationError as exc:
            raise UserExistsError(user.username) from exc
        assert row is not None
        return _public(row)

    async def get(self, username: str) -> UserPublic | None:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM app_user WHERE username = $1", username)
        return None if row is None else _public(row)

    async def list_users(self, limit: int, offset: int) -> list[UserPublic]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM app_user ORDER BY username LIMIT $1 OFFSET $2", limit, offset
        )
        return [_public(r) for r in rows]

    async def update(self, username: str, change: UserUpdate) -> UserPublic | None:
        fields = change.model_fields_set
        row = await self._pool.fetchrow(
            f"""
            UPDATE app_user SET
                display_name = CASE WHEN $2 THEN $3 ELSE display_name END,
                roles = COALESCE($4, roles),
                disabled = COALESCE($5, disabled),
                updated_at = now()
            WHERE username = $1
            RETURNING {_COLUMNS}
            """,
            username,
            "display_name" in fields,
            change.display_name,
            None if change.roles is None else _role_values(change.roles),
            change.disabled,
        )
        return None if row is None else _public(row)

    async def delete(self, username: str) -> bool:
        """Delete a user and their tokens; False when there was none."""
        status = await self._pool.execute("DELETE FROM app_user WHERE username = $1", username)
        return status != "DELETE 0"
