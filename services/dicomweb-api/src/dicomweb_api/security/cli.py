"""Bootstrap users and API tokens from a shell (before any administrator
can call the REST API)::

    python -m dicomweb_api.security.cli user create --username admin --role administrator
    python -m dicomweb_api.security.cli token create --user admin --name bootstrap [--role R] [--expires-days N]
    python -m dicomweb_api.security.cli token list [--user U]
    python -m dicomweb_api.security.cli token revoke ID

The database comes from ``PACS_DB_*``.  ``token create`` prints the secret,
the only time it is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from dicomweb_api.security.permissions import Role
from dicomweb_api.security.tokens import RolesNotHeldError, TokenStore, UnknownUserError
from dicomweb_api.security.users import UserCreate, UserExistsError, UserStore
from pacs_common.db.pool import create_pool
from pacs_common.settings import DatabaseSettings

__all__ = ["main", "parser", "run"]

EXIT_OK = 0
EXIT_FAILED = 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m dicomweb_api.security.cli", description="Users and API tokens of the PACS HTTP API."
    )
    kinds = top.add_subparsers(dest="kind", required=True)
    roles = [r.value for r in Role]

    user = kinds.add_parser("user").add_subparsers(dest="action", required=True)
    create_user = user.add_parser("create", help="create a user")
    create_user.add_argument("--username", required=True)
    create_user.add_argument("--display-name")
    create_user.add_argument("--role", action="append", choices=roles, default=[], dest="roles")

    token = kinds.add_parser("token").add_subparsers(dest="action", required=True)
    create_token = token.add_parser("create", help="create an API token and print its secret")
    create_token.add_argument("--user", required=True)
    create_token.add_argument("--name", default="cli")
    create_token.add_argument(
        "--role", action="append", choices=roles, dest="roles", help="default: all the user's roles"
    )
    create_token.add_argument("--expires-days", type=float, help="default: never")
    list_tokens = token.add_parser("list", help="list active tokens")
    list_tokens.add_argument("--user")
    revoke = token.add_parser("revoke", help="revoke a token")
    revoke.add_argument("id", type=int)
    return top


async def run(argv: Sequence[str], database: DatabaseSettings) -> int:
    args = parser().parse_args(argv)
    pool = await create_pool(database, application_name="pacs-security-cli")
    try:
        if args.kind == "user":
            try:
                user = await UserStore(pool).create(
                    UserCreate(username=args.username, display_name=args.display_name, roles=args.roles)
                )
            except UserExistsError:
                print(f"user {args.username} exists", file=sys.stderr)
                return EXIT_FAILED
            print(f"created user {user.username} ({', '.join(user.roles) or 'no roles'})")
            return EXIT_OK
        tokens = TokenStore(pool)
        if args.action == "create":
            expires = (
                None if args.expires_days is None else datetime.now(UTC) + timedelta(days=args.expires_days)
            )
            roles = None if args.roles is None else frozenset(Role(r) for r in args.roles)
            try:
                record, secret = await tokens.create(args.user, args.name, roles, expires)
            except UnknownUserError:
                print(f"no user {args.user}", file=sys.stderr)
                return EXIT_FAILED
            except RolesNotHeldError as exc:
                print(str(exc), file=sys.stderr)
                return EXIT_FAILED
            print(f"token {record.id} for {record.username} ({', '.join(record.roles)}):", file=sys.stderr)
            print(secret)
            return EXIT_OK
        if args.action == "list":
            for token in await tokens.list_tokens(args.user):
                expires_text = token.expires_at.isoformat() if token.expires_at else "never"
                print(
                    f"{token.id}\t{token.username}\t{token.name}\t{','.join(token.roles)}\texpires {expires_text}"
                )
            return EXIT_OK
        revoked = await tokens.revoke(args.id)
        if revoked is None:
            print(f"no token {args.id}", file=sys.stderr)
            return EXIT_FAILED
        print(f"revoked token {revoked.id} of {revoked.username}")
        return EXIT_OK
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(run(sys.argv[1:] if argv is None else argv, DatabaseSettings())))


if __name__ == "__main__":
    main()
