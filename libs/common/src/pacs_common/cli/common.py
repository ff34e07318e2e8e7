"""What the ``pacs`` commands share: settings, connections, expected errors.

Why: an operator running ``pacs status`` against a database that is down
wants "database unreachable: connection refused", not a traceback; so every
connection goes through here and turns the errors that describe the world
(not a bug) into :class:`CliError`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr, ValidationError

from pacs_common.localrun.infra import describe_error
from pacs_common.localrun.runner import load_state
from pacs_common.settings import BrokerSettings, DatabaseSettings

if TYPE_CHECKING:
    import asyncpg

    from pacs_common.messaging.broker import Broker


class CliError(Exception):
    """An expected failure: printed as one line on stderr, exit code 1."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe the environment (a server down, a bad
    setting), reported as one line instead of a traceback."""
    import aio_pika.exceptions
    import asyncpg

    errors: list[type[BaseException]] = [
        OSError,
        TimeoutError,
        ValidationError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        aio_pika.exceptions.AMQPError,
    ]
    try:
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    except ImportError:  # pragma: no cover - a dependency of pacs-common
        pass
    try:
        from alembic.util import CommandError

        errors.append(CommandError)
    except ImportError:  # pragma: no cover - a dependency of pacs-common
        pass
    return tuple(errors)


def database_settings(project_dir: Path) -> DatabaseSettings:
    """From the environment; when ``PACS_DB_URL`` is not set and ``pacs run``
    runs in ``project_dir``, the database that system uses (maybe a throwaway)."""
    try:
        settings = DatabaseSettings()
        state = load_state(project_dir)
        if state is not None and "PACS_DB_URL" not in os.environ:
            settings = settings.model_copy(update={"url": state["database_url"]})
    except ValidationError as exc:
        raise CliError(f"invalid database settings: {_first_error(exc)}") from exc
    return settings


def broker_settings(project_dir: Path) -> BrokerSettings:
    """Like :func:`database_settings`, for RabbitMQ and the namespace."""
    try:
        settings = BrokerSettings()
        state = load_state(project_dir)
        if state is not None:
            update: dict[str, object] = {}
            if "PACS_AMQP_URL" not in os.environ:
                update["url"] = SecretStr(state["broker_url"])
            if "PACS_AMQP_NAMESPACE" not in os.environ:
                update["namespace"] = state["namespace"]
            settings = settings.model_copy(update=update)
    except ValidationError as exc:
        raise CliError(f"invalid broker settings: {_first_error(exc)}") from exc
    return settings


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"{where}: {error.get('msg', '')}" if where else str(error.get("msg", exc))


async def connect_database(settings: DatabaseSettings) -> asyncpg.Connection:
    import asyncpg

    try:
        return await asyncpg.connect(settings.url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CliError(f"database unreachable: {describe_error(exc)}") from exc


@asynccontextmanager
async def open_broker(settings: BrokerSettings, *, declare: bool) -> AsyncIterator[Broker]:
    """A :class:`Broker` for one command; ``declare=False`` looks without
    creating anything."""
    import aio_pika.exceptions

    from pacs_common.messaging.broker import Broker

    try:
        broker = await Broker.connect(settings, declare=declare)
    except (OSError, TimeoutError, ValueError, aio_pika.exceptions.AMQPError) as exc:
        raise CliError(f"broker unreachable: {describe_error(exc)}") from exc
    try:
        yield broker
    finally:
        await broker.close()


def deidentify_salt(salt_file: Path | None) -> bytes:
    """The secret salt of de-identification: from ``salt_file`` when given,
    else ``PACS_DEIDENTIFY_SALT`` (a CliError saying what to do otherwise)."""
    from pydantic import ValidationError

    from pacs_common.dicom.deidentify import MIN_SALT_BYTES, DeidentifySettings

    if salt_file is not None:
        try:
            salt = salt_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise CliError(f"cannot read the salt file {salt_file}: {exc.strerror}") from exc
        if len(salt) < MIN_SALT_BYTES:
            raise CliError(f"the salt in {salt_file} is shorter than {MIN_SALT_BYTES} bytes")
        return salt
    try:
        return DeidentifySettings().salt_bytes()
    except ValidationError as exc:
        raise CliError(
            f"de-identification needs a secret salt of at least {MIN_SALT_BYTES} bytes: "
            "give --salt-file or set PACS_DEIDENTIFY_SALT"
        ) from exc
