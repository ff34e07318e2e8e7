"""Stored instances as local Part 10 files, for as long as they are sent.

On a filesystem tier the object itself is sent (objects are write-once);
from object storage it is streamed to a spool file first, one instance at a
time, never whole in memory.  Blocking: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pacs_common.storage import ObjectArchivedError, ObjectNotFoundError, StorageError, StorageRegistry
from pacs_common.storage.base import CHUNK_SIZE
from pacs_common.storage.filesystem import FilesystemStorage

__all__ = ["InstanceFiles", "UnavailableError"]


class UnavailableError(Exception):
    """The object cannot be read now; ``str(exc)`` says why."""


class InstanceFiles:
    def __init__(self, storage: StorageRegistry, spool_dir: Path | None = None) -> None:
        self._storage = storage
        self._spool_dir = spool_dir

    @contextlib.contextmanager
    def local_file(self, tier: str, key: str) -> Iterator[Path]:
        try:
            storage = self._storage.get(tier)
        except KeyError:
            raise UnavailableError(f"storage tier {tier} not configured") from None
        if isinstance(storage, FilesystemStorage):
            path = storage.path_for(key)
            if not path.is_file():
                raise UnavailableError("object missing from storage")
            yield path
            return
        with self.spool_file() as spooled:
            try:
                with storage.open(key) as stream, spooled.open("wb") as out:
                    shutil.copyfileobj(stream, out, CHUNK_SIZE)
            except ObjectNotFoundError:
                raise UnavailableError("object missing from storage") from None
            except ObjectArchivedError:
                raise UnavailableError("object archived, not restored") from None
            except (StorageError, OSError) as exc:
                raise UnavailableError(f"storage read failed: {exc}") from exc
            yield spooled

    @contextlib.contextmanager
    def spool_file(self) -> Iterator[Path]:
        """A fresh temporary file in the spool directory, removed afterwards."""
        fd, name = tempfile.mkstemp(dir=self._spool_dir, prefix="forward-", suffix=".dcm")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
