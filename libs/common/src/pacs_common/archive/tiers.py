"""Which storages may hold archived objects (readable only after a restore)."""

from __future__ import annotations

from typing import Final

from pacs_common.storage import ObjectStorage

__all__ = ["ARCHIVE_S3_STORAGE_CLASSES", "may_hold_archived"]

#: S3 storage classes whose objects must be restored before a GET.
ARCHIVE_S3_STORAGE_CLASSES: Final = frozenset({"GLACIER", "DEEP_ARCHIVE"})
_AZURE_ARCHIVE: Final = "archive"


def may_hold_archived(storage: ObjectStorage) -> bool:
    """True for an S3 tier writing GLACIER / DEEP_ARCHIVE objects and an
    Azure tier writing Archive blobs: readers probe objects there before
    they promise a response (a filesystem tier never archives)."""
    if storage.kind == "s3":
        return str(getattr(storage, "storage_class", None) or "").upper() in ARCHIVE_S3_STORAGE_CLASSES
    if storage.kind == "azure":
        tier = getattr(storage, "access_tier", None)
        return str(getattr(tier, "value", tier) or "").lower() == _AZURE_ARCHIVE
    return False
