"""The remote-node registry (AE registry): which DICOM peers this PACS knows.

A node is reached at ``host:port`` (over TLS when ``tls`` is set) under its
AE title, and may ask of the PACS only its ``allowed_operations``.  The
gateway looks C-MOVE destinations up here: a destination must be registered
and allowed ``store`` (receiving instances from us).  AE titles are
case-sensitive; leading and trailing spaces are not significant (PS3.5 AE VR)
and are stripped.

:class:`RemoteNodeRepository` is the asyncpg access (``remote_node`` table,
migration 0002); blocking callers (pynetdicom handler threads) use it through
:class:`pacs_common.db.blocking.BlockingPool`.
"""

from __future__ import annotations

import ssl
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "NodeExistsError",
    "NodeNotFoundError",
    "Operation",
    "RemoteNode",
    "RemoteNodeCreate",
    "RemoteNodeRepository",
    "RemoteNodeUpdate",
    "echo",
    "tls_client_context",
]


class Operation(StrEnum):
    """What a node may ask of the PACS (``remote_node.allowed_operations``)."""

    ECHO = "echo"
    STORE = "store"  # also: may be a C-MOVE destination
    FIND = "find"
    MOVE = "move"
    GET = "get"
    WORKLIST = "worklist"
    MPPS = "mpps"
    COMMITMENT = "commitment"


ALL_OPERATIONS: tuple[Operation, ...] = tuple(Operation)


def _ae_title(value: str) -> str:
    value = value.strip(" ")
    if not 1 <= len(value) <= 16:
        raise ValueError("an AE title has 1 to 16 characters (spaces around it do not count)")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("an AE title holds printable ASCII characters other than backslash")
    return value


class RemoteNodeUpdate(BaseModel):
    """A change to a node: only the fields that are set change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str | None = Field(default=None, min_length=1, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: bool | None = None
    allowed_operations: tuple[Operation, ...] | None = None
    description: str | None = None

    @field_validator("allowed_operations")
    @classmethod
    def _dedupe(cls, value: tuple[Operation, ...] | None) -> tuple[Operation, ...] | None:
        return None if value is None else tuple(sorted(set(value), key=ALL_OPERATIONS.index))


class RemoteNodeCreate(BaseModel):
    """A node to register."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    allowed_operations: tuple[Operation, ...] = ALL_OPERATIONS
    description: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("allowed_operations")
    @classmethod
    def _dedupe(cls, value: tuple[Operation, ...]) -> tuple[Operation, ...]:
        return tuple(sorted(set(value), key=ALL_OPERATIONS.index))


class RemoteNode(RemoteNodeCreate):
    """A registered node."""

    created_at: datetime
    updated_at: datetime

    def allows(self, operation: Operation) -> bool:
        return operation in self.allowed_operations


class NodeExistsError(Exception):
    """A node with this AE title is registered already."""


class NodeNotFoundError(LookupError):
    """No node with this AE title is registered."""


_COLUMNS = "ae_title, host, port, tls, allowed_operations, description, created_at, updated_at"


def _node(row: asyncpg.Record) -> RemoteNode:
    return RemoteNode.model_validate(dict(row))


Executor = asyncpg.Pool | asyncpg.Connection


class RemoteNodeRepository:
    """``remote_node`` over an asyncpg pool (or a connection)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def add(self, node: RemoteNodeCreate) -> RemoteNode:
        try:
            row = await self._db.fetchrow(
                f"""
                INSERT INTO remote_node (ae_title, host, port, tls, allowed_operations, description)
                VALUES ($1, $2, $3, $4, $5, $6)
                RETURNING {_COLUMNS}
                """,
                node.ae_title,
                node.host,
                node.port,
                node.tls,
                [str(op) for op in node.allowed_operations],
                node.description,
            )
        except asyncpg.UniqueViolationError:
            raise NodeExistsError(f"a node with AE title {node.ae_title!r} exists already") from None
        assert row is not None
        return _node(row)

    async def get(self, ae_title: str) -> RemoteNode | None:
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM remote_node WHERE ae_title = $1", ae_title.strip(" ")
        )
        return None if row is None else _node(row)

    async def list(self) -> list[RemoteNode]:
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM remote_node ORDER BY ae_title")
        return [_node(row) for row in rows]

    async def update(self, ae_title: str, change: RemoteNodeUpdate) -> RemoteNode:
        values: dict[str, Any] = change.model_dump(exclude_unset=True)
        if "allowed_operations" in values and values["allowed_operations"] is not None:
            values["allowed_operations"] = [str(op) for op in values["allowed_operations"]]
        # A field explicitly set to None keeps its value, except the description (cleared).
        values = {k: v for k, v in values.items() if v is not None or k == "description"}
        if not values:
            node = await self.get(ae_title)
            if node is None:
                raise NodeNotFoundError(f"no node with AE title {ae_title!r}")
            return node
        assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(values, start=2))
        row = await self._db.fetchrow(
            f"""
            UPDATE remote_node SET {assignments}, updated_at = now()
            WHERE ae_title = $1
            RETURNING {_COLUMNS}
            """,
            ae_title.strip(" "),
            *values.values(),
        )
        if row is None:
            raise NodeNotFoundError(f"no node with AE title {ae_title!r}")
        return _node(row)

    async def remove(self, ae_title: str) -> bool:
        """Remove the node; False when there was none."""
        result = await self._db.execute("DELETE FROM remote_node WHERE ae_title = $1", ae_title.strip(" "))
        return result != "DELETE 0"


def tls_client_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """The TLS context for associations we open to a node marked ``tls``.

    Minimal for now (DICOM TLS profiles are a later issue): the peer's
    certificate is verified against ``ca_file`` (or the system's CAs) and its
    host name; ``cert_file``/``key_file`` present a client certificate when
    the peer asks for one.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


def echo(
    node: RemoteNode, *, calling_ae_title: str, timeout: float, ssl_context: ssl.SSLContext | None
) -> tuple[bool, str]:
    """C-ECHO ``node``; (answered with success, what happened)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    tls_args = (ssl_context, node.host) if ssl_context is not None else None
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
        return False, f"association rejected: {reason or 'no reason given'}"
    if not assoc.is_established:
        return False, "no association (node unreachable, aborted or timed out)"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        return False, "no C-ECHO response"
    code = int(status.Status)
    return code == 0x0000, f"status 0x{code:04X}" + (" (success)" if code == 0 else "")
