"""Stored instances as local Part 10 files, for as long as they are sent
(:class:`pacs_common.storage.local_files.StoredFiles`, spool files named
``forward-*``)."""

from __future__ import annotations

from pathlib import Path

from pacs_common.storage import StorageRegistry
from pacs_common.storage.local_files import StoredFiles, UnreadableObjectError

__all__ = ["InstanceFiles", "UnavailableError"]

#: The object cannot be read now; ``str(exc)`` says why.
UnavailableError = UnreadableObjectError


class InstanceFiles(StoredFiles):
    def __init__(self, storage: StorageRegistry, spool_dir: Path | None = None) -> None:
        super().__init__(storage, spool_dir, prefix="forward-")
