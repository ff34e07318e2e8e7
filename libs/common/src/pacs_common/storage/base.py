"""The object storage interface every backend implements.

Objects are write-once: ``put`` never replaces an existing key.  Callers that
may see the same key twice (a resent instance) check ``stat`` and choose
another key when the content differs.  All methods are blocking; async
callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict

CHUNK_SIZE = 1024 * 1024


class StorageError(Exception):
    """The backend failed (I/O error, network error, refused request)."""


class ObjectExistsError(StorageError):
    """``put`` refused because the key already holds an object."""


class ObjectNotFoundError(StorageError):
    """The key holds no object."""


class ObjectArchivedError(StorageError):
    """The object sits in an archive tier and must be restored before reading
    (S3 GLACIER InvalidObjectState, Azure Archive BlobArchived)."""


class StoredObject(BaseModel):
    """Where an object went and what it is: what the index records."""

    model_config = ConfigDict(frozen=True)

    backend: str
    key: str
    size: int
    sha256: str


class ObjectInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    size: int
    # Recorded at put time by this library; None for objects written by others.
    sha256: str | None = None


class HashingReader:
    """Wraps a binary stream and hashes/counts what is read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def normalise_prefix(prefix: str) -> str:
    """``"a/b/"`` for ``"/a/b"``; empty stays empty."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def read_exact(stream: HashingReader, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of stream (``read`` may return
    short counts on pipes and sockets; upload parts must be full-sized)."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0 and (chunk := stream.read(remaining)):
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def check_size(key: str, expected: int | None, actual: int) -> None:
    """A stream that gave other than the announced size is not stored."""
    if expected is not None and expected != actual:
        raise StorageError(f"object {key!r}: stream gave {actual} bytes, expected {expected}; not stored")


class ObjectStorage(ABC):
    """A place objects are kept: a directory, an S3 bucket, an Azure container."""

    #: "filesystem", "s3" or "azure" — recorded in the index with each object.
    kind: str

    @abstractmethod
    def put(self, key: str, stream: BinaryIO, *, size: int | None = None) -> StoredObject:
        """Store the stream under ``key`` (streaming; large objects in parts).

        Raises ObjectExistsError if the key exists, StorageError on failure.
        The object is durable when this returns.
        """

    def put_file(self, key: str, path: Path) -> StoredObject:
        """Store a local file; backends may do better than streaming it."""
        with path.open("rb") as f:
            return self.put(key, f, size=path.stat().st_size)

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the whole object (caller closes it)."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from offset ``start`` (fewer at the end of the object)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and recorded sha256 of the object, or None if there is none."""

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    @abstractmethod
    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (for integrity and orphan checks)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connections."""


def copy_object(
    source: ObjectStorage, key: str, target: ObjectStorage, target_key: str | None = None
) -> StoredObject:
    """Stream an object from one backend to another and return where it went."""
    with source.open(key) as stream:
        return target.put(target_key or key, stream)


def sha256_of(storage: ObjectStorage, key: str) -> str:
    """Hash an object by reading it back (integrity verification)."""
    digest = hashlib.sha256()
    with storage.open(key) as stream:
        while chunk := stream.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()
