"""Test helpers for the dicomweb-api (used by its tests and the e2e tests).

* :class:`HeaderAuthenticator`: roles named in the ``x-test-roles`` header;
* :func:`store_instances`: Part 10 objects written to real object storage and
  indexed the way the ingest worker indexes them (metadata, bulk data
  catalogue, location), so every read path sees real data;
* :func:`parse_multipart`: a ``multipart/related`` body split back into parts;
* :func:`serve`: the app on a real uvicorn server on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import asyncpg
from fastapi import FastAPI, Request
from pydicom.dataset import Dataset

from dicomweb_api.security import AuthenticationError, Principal, Role
from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.settings import DuplicatePolicy
from pacs_common.storage import ObjectStorage
from pacs_common.telemetry import serve_http

__all__ = [
    "ROLES_HEADER",
    "SUBJECT_HEADER",
    "HeaderAuthenticator",
    "Part",
    "Store",
    "StoredInstance",
    "parse_multipart",
    "part10_bytes",
    "serve",
    "store_instances",
]

#: The header :class:`HeaderAuthenticator` reads roles from (comma-separated).
ROLES_HEADER: Final = "x-test-roles"
SUBJECT_HEADER: Final = "x-test-subject"
#: Bulk data threshold of the ingest worker's default.
BULK_DATA_THRESHOLD: Final = 1024


class HeaderAuthenticator:
    """Roles named in the ``x-test-roles`` header, the subject in
    ``x-test-subject`` (default ``tester``); no roles header means no
    credentials (401)."""

    async def authenticate(self, request: Request) -> Principal:
        roles = request.headers.get(ROLES_HEADER)
        if roles is None:
            raise AuthenticationError("no credentials")
        try:
            granted = frozenset(Role(r.strip()) for r in roles.split(",") if r.strip())
        except ValueError as exc:
            raise AuthenticationError(f"unknown role in {ROLES_HEADER}: {roles}") from exc
        subject = request.headers.get(SUBJECT_HEADER, "tester")
        return Principal(subject=subject, roles=granted, method="token")


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """An instance as stored: its exact bytes and where they are."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    data: bytes
    location: StorageLocation


#: The ``store`` fixture: ``await store([datasets | Part 10 bytes | paths])``.
Store = Callable[[Iterable[Dataset | bytes | Path]], Awaitable[list[StoredInstance]]]


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` written as a Part 10 file (it needs a file meta with a transfer syntax)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _prepare(
    storage: ObjectStorage, tier: str, objects: Iterable[Dataset | bytes | Path]
) -> tuple[list[StoredInstance], list[IndexItem]]:
    stored: list[StoredInstance] = []
    items: list[IndexItem] = []
    for obj in objects:
        if isinstance(obj, Dataset):
            data = part10_bytes(obj)
        elif isinstance(obj, Path):
            data = obj.read_bytes()
        else:
            data = obj
        parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=BULK_DATA_THRESHOLD)
        study = parsed.study.study_instance_uid or ""
        series = parsed.series.series_instance_uid or ""
        sop = parsed.instance.sop_instance_uid or ""
        digest = hashlib.sha256(data).hexdigest()
        key = f"{study}/{series}/{sop}.dcm"
        if storage.exists(key):
            key = f"{study}/{series}/{sop}.{digest[:16]}.dcm"
        put = storage.put(key, io.BytesIO(data), size=len(data))
        location = StorageLocation(
            tier=tier, backend=put.backend, key=put.key, size=put.size, sha256=put.sha256
        )
        items.append(IndexItem.build(parsed, location, datetime.now(UTC), "TEST"))
        stored.append(StoredInstance(study, series, sop, parsed.transfer_syntax_uid, data, location))
    return stored, items


async def store_instances(
    pool: asyncpg.Pool,
    storage: ObjectStorage,
    objects: Iterable[Dataset | bytes | Path],
    *,
    tier: str = "hot",
) -> list[StoredInstance]:
    """Write each object (a dataset with file meta, Part 10 bytes, or a file)
    to ``storage`` and index it; returns what was stored, in order."""
    stored, items = await asyncio.to_thread(_prepare, storage, tier, list(objects))
    await InstanceIndex(pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
    return stored


@dataclass(frozen=True, slots=True)
class Part:
    headers: dict[str, str]
    content: bytes


_BOUNDARY: Final = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """The parts of a ``multipart/related`` body (header names lower-cased)."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise ValueError(f"no boundary in {content_type!r}")
    delimiter = b"--" + found.group(1).encode()
    sections = body.split(b"\r\n" + delimiter)
    # The first delimiter starts the body without a preceding CRLF.
    first = sections[0]
    if not first.startswith(delimiter):
        raise ValueError("the body does not start with the boundary")
    sections[0] = first[len(delimiter) :]
    parts: list[Part] = []
    for section in sections:
        if section.startswith(b"--"):
            break  # close delimiter
        head, separator, content = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a part without a header/content separator")
        headers = {}
        for line in head.decode("ascii").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, content))
    else:
        raise ValueError("the body has no close delimiter")
    return parts


@contextlib.asynccontextmanager
async def serve(app: FastAPI, port: int = 0) -> AsyncIterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 and ``port`` (0: a free one); yields its base URL."""
    server = await serve_http(app, "127.0.0.1", port)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.sleep(0.05)
