"""The remote-node registry against the real PostgreSQL, and its ``pacs node`` CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator

import asyncpg
import pytest
from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacs_common.cli.main import main
from pacs_common.nodes import (
    ALL_OPERATIONS,
    NodeExistsError,
    NodeNotFoundError,
    Operation,
    RemoteNodeCreate,
    RemoteNodeRepository,
    RemoteNodeUpdate,
)
from pacs_common.settings import DatabaseSettings
from pacs_common.testing.broker import free_port


async def test_add_get_list_update_remove(db_pool: asyncpg.Pool) -> None:
    repo = RemoteNodeRepository(db_pool)
    added = await repo.add(
        RemoteNodeCreate(
            ae_title=" VIEWER ",
            host="viewer.local",
            port=104,
            allowed_operations=(Operation.MOVE, Operation.STORE, Operation.MOVE),
        )
    )
    assert added.ae_title == "VIEWER"
    assert added.allowed_operations == (Operation.STORE, Operation.MOVE)
    assert added.allows(Operation.STORE) and not added.allows(Operation.FIND)
    await repo.add(RemoteNodeCreate(ae_title="ARCHIVE", host="10.0.0.2", port=11112, tls=True))

    assert [n.ae_title for n in await repo.list()] == ["ARCHIVE", "VIEWER"]
    archive = await repo.get("ARCHIVE")
    assert archive is not None
    assert archive.tls and archive.allowed_operations == ALL_OPERATIONS
    assert await repo.get("archive") is None  # AE titles are case-sensitive

    with pytest.raises(NodeExistsError):
        await repo.add(RemoteNodeCreate(ae_title="VIEWER", host="other", port=1))

    changed = await repo.update("VIEWER", RemoteNodeUpdate(port=11113, description="reading room"))
    assert (changed.host, changed.port, changed.description) == ("viewer.local", 11113, "reading room")
    assert changed.updated_at >= added.updated_at
    with pytest.raises(NodeNotFoundError):
        await repo.update("NOBODY", RemoteNodeUpdate(port=1))

    assert await repo.remove("VIEWER") is True
    assert await repo.remove("VIEWER") is False
    assert [n.ae_title for n in await repo.list()] == ["ARCHIVE"]


@pytest.mark.parametrize("title", ["", "A" * 17, "BAD\\AE", "TAB\tAE", "ÜMLAUT"])
def test_invalid_ae_titles_refused(title: str) -> None:
    with pytest.raises(ValidationError):
        RemoteNodeCreate(ae_title=title, host="h", port=104)


# -- the CLI -------------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_settings: DatabaseSettings, clean_db: None) -> None:
    monkeypatch.setenv("PACS_DB_URL", database_settings.url)


def _pacs(*args: str) -> int:
    return main(["-C", "/nonexistent-project", *args])


@pytest.fixture
def echo_scp() -> Iterator[int]:
    """A pynetdicom Verification SCP; yields its port."""
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert isinstance(server, ThreadedAssociationServer)
    try:
        yield port
    finally:
        server.shutdown()


def test_cli_add_list_show_remove(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        _pacs("node", "add", "VIEWER", "--host", "127.0.0.1", "--port", "104", "--allow", "store,move") == 0
    )
    assert "added VIEWER" in capsys.readouterr().out

    assert _pacs("node", "add", "VIEWER", "--host", "127.0.0.1", "--port", "104") == 1
    assert "exists already" in capsys.readouterr().err

    assert _pacs("node", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(n["ae_title"], n["port"], n["allowed_operations"]) for n in listed] == [
        ("VIEWER", 104, ["store", "move"])
    ]

    assert _pacs("node", "update", "VIEWER", "--port", "11112", "--tls") == 0
    capsys.readouterr()
    assert _pacs("node", "show", "VIEWER", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["port"], shown["tls"]) == (11112, True)

    assert _pacs("node", "remove", "VIEWER") == 0
    assert _pacs("node", "show", "VIEWER") == 1
    assert "no node with AE title 'VIEWER'" in capsys.readouterr().err


def test_cli_refuses_unknown_operation(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _pacs("node", "add", "X", "--host", "h", "--port", "1", "--allow", "store,teleport")
    assert exit_info.value.code == 2
    assert "teleport" in capsys.readouterr().err


def test_cli_echo(cli_env: None, echo_scp: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert _pacs("node", "add", "ECHOSCP", "--host", "127.0.0.1", "--port", str(echo_scp)) == 0
    assert _pacs("node", "echo", "ECHOSCP", "--calling-ae", "TESTER") == 0
    assert "status 0x0000 (success)" in capsys.readouterr().out

    # A node registered where nothing listens: one line on stderr, exit code 1.
    assert _pacs("node", "add", "GONE", "--host", "127.0.0.1", "--port", str(free_port())) == 0
    assert _pacs("node", "echo", "GONE", "--timeout", "2") == 1
    assert "no association" in capsys.readouterr().err
