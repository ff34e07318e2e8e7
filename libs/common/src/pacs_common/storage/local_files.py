"""Stored objects as local files, for as long as something sends them.

DICOM senders (C-MOVE/C-GET sub-operations, forwarding) hand pynetdicom a
Part 10 file.  On a filesystem tier that is the object itself (objects are
write-once, so it cannot change underneath); from object storage it is
streamed to a spool file first, one object at a time, never whole in memory.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pacs_common.storage.base import (
    CHUNK_SIZE,
    ObjectArchivedError,
    ObjectNotFoundError,
    StorageError,
)
from pacs_common.storage.factory import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage

__all__ = ["StoredFiles", "UnreadableObjectError"]


class UnreadableObjectError(Exception):
    """The object cannot be read now; ``str(exc)`` says why, ``archived``
    whether it sits in an archive tier (a restore makes it readable)."""

    def __init__(self, reason: str, *, archived: bool = False) -> None:
        super().__init__(reason)
        self.archived = archived


class StoredFiles:
    """Objects of the configured tiers as local files."""

    def __init__(
        self, storage: StorageRegistry, spool_dir: Path | None = None, *, prefix: str = "send-"
    ) -> None:
        self._storage = storage
        self._spool_dir = spool_dir
        self._prefix = prefix

    @contextlib.contextmanager
    def local_file(self, tier: str, key: str) -> Iterator[Path]:
        """The object at ``tier``/``key`` as a path, valid inside the block.

        Raises UnreadableObjectError when the tier is not configured, the
        object is missing or archived, or the read fails."""
        try:
            storage = self._storage.get(tier)
        except KeyError:
            raise UnreadableObjectError(f"storage tier {tier} not configured") from None
        if isinstance(storage, FilesystemStorage):
            path = storage.path_for(key)
            if not path.is_file():
                raise UnreadableObjectError("object missing from storage")
            yield path
            return
        with self.spool_file() as spooled:
            try:
                with storage.open(key) as stream, spooled.open("wb") as out:
                    shutil.copyfileobj(stream, out, CHUNK_SIZE)
            except ObjectNotFoundError:
                raise UnreadableObjectError("object missing from storage") from None
            except ObjectArchivedError:
                raise UnreadableObjectError("object archived", archived=True) from None
            except (StorageError, OSError) as exc:
                raise UnreadableObjectError(f"storage read failed: {exc}") from exc
            yield spooled

    @contextlib.contextmanager
    def spool_file(self) -> Iterator[Path]:
        """A fresh temporary file in the spool directory, removed afterwards."""
        fd, name = tempfile.mkstemp(dir=self._spool_dir, prefix=self._prefix, suffix=".dcm")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
