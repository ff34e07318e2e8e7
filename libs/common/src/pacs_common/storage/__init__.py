"""Object storage: one interface, filesystem / S3 / Azure Blob backends."""

from pacs_common.storage.base import (
    ObjectArchivedError,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StoredObject,
    copy_object,
    sha256_of,
)
from pacs_common.storage.factory import StorageRegistry, build_storage

__all__ = [
    "ObjectArchivedError",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStorage",
    "StorageError",
    "StorageRegistry",
    "StoredObject",
    "build_storage",
    "copy_object",
    "sha256_of",
]
