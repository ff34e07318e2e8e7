"""Alembic environment of the index.

Normally :func:`pacs_common.db.migrate.upgrade` runs alembic and hands this
module an open connection (``config.attributes["connection"]``) that already
holds the migration lock and a transaction.  Run by the ``alembic`` command
line instead (``alembic -x`` is not needed: the URL comes from the config or
``PACS_DB_URL``), it opens its own asyncpg engine.  ``--sql`` (offline) mode
prints the SQL, which works because migrations are raw SQL.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from pacs_common.settings import DatabaseSettings

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        url = DatabaseSettings().url
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), literal_binds=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()
elif (existing := config.attributes.get("connection")) is not None:
    _run(existing)
else:
    asyncio.run(_run_online())
