"""``pacs node add|update|list|show|remove|echo``: the remote-node registry.

The registry says where each DICOM peer is and what it may ask of the PACS;
the gateway sends C-MOVE sub-operations only to destinations registered here
(and allowed ``store``).  ``pacs node echo`` checks that a node answers
before anyone depends on it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from pacs_common.cli.common import CliError, connect_database, database_settings
from pacs_common.localrun.infra import run_sync
from pacs_common.nodes import (
    ALL_OPERATIONS,
    NodeExistsError,
    NodeNotFoundError,
    Operation,
    RemoteNode,
    RemoteNodeCreate,
    RemoteNodeRepository,
    RemoteNodeUpdate,
    echo,
    tls_client_context,
)
from pacs_common.settings import DatabaseSettings

T = TypeVar("T")

DEFAULT_CALLING_AE = "PACS"
#: Verification SOP Class.


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("node", help="the remote DICOM node registry (AE titles)")
    commands = parser.add_subparsers(
        dest="node_command", metavar="{add,update,list,show,remove,echo}", required=True
    )

    add = commands.add_parser("add", help="register a node")
    add.add_argument("ae_title", metavar="AE_TITLE")
    add.add_argument("--host", required=True)
    add.add_argument("--port", type=_port, required=True)
    add.add_argument("--tls", action="store_true", help="reach it over TLS")
    add.add_argument(
        "--allow",
        type=_operations,
        default=ALL_OPERATIONS,
        metavar="OPS",
        help=f"comma-separated operations it may use (default: all: {','.join(ALL_OPERATIONS)})",
    )
    add.add_argument("--description")
    add.set_defaults(handler=run_add)

    update = commands.add_parser("update", help="change a registered node")
    update.add_argument("ae_title", metavar="AE_TITLE")
    update.add_argument("--host")
    update.add_argument("--port", type=_port)
    update.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None)
    update.add_argument("--allow", type=_operations, metavar="OPS")
    update.add_argument("--description")
    update.set_defaults(handler=run_update)

    listing = commands.add_parser("list", help="list registered nodes")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=run_list)

    show = commands.add_parser("show", help="show one node")
    show.add_argument("ae_title", metavar="AE_TITLE")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=run_show)

    remove = commands.add_parser("remove", help="unregister a node")
    remove.add_argument("ae_title", metavar="AE_TITLE")
    remove.set_defaults(handler=run_remove)

    echo = commands.add_parser("echo", help="C-ECHO a registered node")
    echo.add_argument("ae_title", metavar="AE_TITLE")
    echo.add_argument(
        "--calling-ae",
        default=None,
        metavar="AE",
        help="our AE title in the association (default: PACS_GATEWAY_AE_TITLE or PACS)",
    )
    echo.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    echo.add_argument("--ca-file", type=Path, default=None, help="CA certificates to trust (TLS nodes)")
    echo.set_defaults(handler=run_echo)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is 1 to 65535")
    return value


def _operations(text: str) -> tuple[Operation, ...]:
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    try:
        return tuple(Operation(name) for name in names)
    except ValueError:
        unknown = [name for name in names if name not in {op.value for op in Operation}]
        raise argparse.ArgumentTypeError(
            f"unknown operation(s) {', '.join(unknown)}; known: {','.join(ALL_OPERATIONS)}"
        ) from None


def _with_repository(settings: DatabaseSettings, work: Callable[[RemoteNodeRepository], Awaitable[T]]) -> T:
    async def call() -> T:
        connection = await connect_database(settings)
        try:
            return await work(RemoteNodeRepository(connection))
        finally:
            await connection.close()

    return run_sync(call)


def _public(node: RemoteNode) -> dict[str, Any]:
    return node.model_dump(mode="json")


def _describe(node: RemoteNode) -> str:
    lines = [
        f"AE title     {node.ae_title}",
        f"address      {node.host}:{node.port}{'  (TLS)' if node.tls else ''}",
        f"may use      {', '.join(node.allowed_operations) or '-'}",
        f"description  {node.description or '-'}",
        f"registered   {node.created_at.isoformat()}",
        f"updated      {node.updated_at.isoformat()}",
    ]
    return "\n".join(lines)


def _get(settings: DatabaseSettings, ae_title: str) -> RemoteNode:
    node = _with_repository(settings, lambda repo: repo.get(ae_title))
    if node is None:
        raise CliError(f"no node with AE title {ae_title!r}")
    return node


def run_add(args: argparse.Namespace) -> int:
    try:
        node = RemoteNodeCreate(
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            tls=args.tls,
            allowed_operations=args.allow,
            description=args.description,
        )
    except ValidationError as exc:
        raise CliError(_validation_message(exc)) from exc
    try:
        added = _with_repository(database_settings(args.project_dir), lambda repo: repo.add(node))
    except NodeExistsError as exc:
        raise CliError(f"{exc} (use `pacs node update`)") from exc
    print(f"added {added.ae_title} at {added.host}:{added.port}")
    return 0


def run_update(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("tls", args.tls),
            ("allowed_operations", args.allow),
            ("description", args.description),
        )
        if value is not None
    }
    if not fields:
        raise CliError("nothing to change: give --host, --port, --tls/--no-tls, --allow or --description")
    try:
        change = RemoteNodeUpdate(**fields)
    except ValidationError as exc:
        raise CliError(_validation_message(exc)) from exc
    try:
        node = _with_repository(
            database_settings(args.project_dir), lambda repo: repo.update(args.ae_title, change)
        )
    except NodeNotFoundError as exc:
        raise CliError(str(exc)) from exc
    print(_describe(node))
    return 0


def run_list(args: argparse.Namespace) -> int:
    nodes = _with_repository(database_settings(args.project_dir), lambda repo: repo.list())
    if args.json:
        print(json.dumps([_public(node) for node in nodes], indent=2))
        return 0
    if not nodes:
        print("no nodes registered (add one with `pacs node add`)")
        return 0
    print(f"{'AE TITLE':<16}  {'HOST':<30}  {'PORT':>5}  {'TLS':<3}  {'MAY USE':<40}  DESCRIPTION")
    for node in nodes:
        print(
            f"{node.ae_title:<16}  {node.host:<30}  {node.port:>5}  {'yes' if node.tls else 'no':<3}  "
            f"{','.join(node.allowed_operations):<40}  {node.description or ''}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    node = _get(database_settings(args.project_dir), args.ae_title)
    print(json.dumps(_public(node), indent=2) if args.json else _describe(node))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    removed = _with_repository(database_settings(args.project_dir), lambda repo: repo.remove(args.ae_title))
    if not removed:
        raise CliError(f"no node with AE title {args.ae_title!r}")
    print(f"removed {args.ae_title}")
    return 0


def run_echo(args: argparse.Namespace) -> int:
    node = _get(database_settings(args.project_dir), args.ae_title)
    calling = args.calling_ae or _gateway_ae_title()
    ssl_context = tls_client_context(args.ca_file) if node.tls else None
    ok, message = echo(node, calling_ae_title=calling, timeout=args.timeout, ssl_context=ssl_context)
    if not ok:
        raise CliError(f"C-ECHO {calling} -> {node.ae_title} at {node.host}:{node.port}: {message}")
    print(f"C-ECHO {calling} -> {node.ae_title} at {node.host}:{node.port}: {message}")
    return 0


def _gateway_ae_title() -> str:
    from pacs_common.settings import GatewaySettings

    try:
        return GatewaySettings().ae_title
    except ValidationError:
        return DEFAULT_CALLING_AE


def _validation_message(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", exc)).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
