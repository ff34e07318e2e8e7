"""The receiving half of the ingest contract, shared by C-STORE and STOW-RS.

1. the received Part 10 object is written, write-once, to the hot tier;
2. an ``ingest`` message is published and confirmed by the broker;
3. only then does the caller answer success.

Any failure raises, and the protocol adapter turns the exception into a
failure status (C-STORE 0xA700 / 0xC000, STOW FailedSOPSequence): the sender
never sees success for an instance that is not both stored and queued.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from pacs_common.dicom.received import (
    DatasetIdentity,
    InvalidDatasetError,
    MissingIdentityError,
    read_identity,
)
from pacs_common.messaging.models import IngestMessage, IngestSource, StorageLocation
from pacs_common.storage.base import ObjectExistsError, ObjectStorage, StoredObject, sha256_of

logger = logging.getLogger(__name__)

# Preamble (128) + "DICM" (4) + the group length element (explicit VR UL: 12).
_META_FIXED_PREFIX = 128 + 4 + 12


class IdentityMismatchError(MissingIdentityError):
    """The dataset is not the instance the sender announced in the command."""


__all__ = [
    "IdentityMismatchError",
    "InstanceReceiver",
    "MissingIdentityError",
    "ReceivedInstance",
    "instance_key",
]


@dataclass(frozen=True)
class ReceivedInstance:
    identity: DatasetIdentity
    transfer_syntax_uid: str
    location: StorageLocation
    message: IngestMessage


def instance_key(identity: DatasetIdentity, digest: str | None = None) -> str:
    """``{study}/{series}/{sop}.dcm``; a different object under a SOP Instance
    UID already stored gets a key of its own, with its digest."""
    base = f"{identity.study_instance_uid}/{identity.series_instance_uid}/{identity.sop_instance_uid}"
    return f"{base}.{digest[:16]}.dcm" if digest else f"{base}.dcm"


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def inspect_part10(path: Path) -> tuple[DatasetIdentity, str]:
    """Validate a Part 10 file and return its identity and transfer syntax."""
    try:
        meta = read_file_meta_info(path)
        transfer_syntax = str(meta.TransferSyntaxUID)
        offset = _META_FIXED_PREFIX + int(meta.FileMetaInformationGroupLength)
    except Exception as exc:
        raise InvalidDatasetError(f"not a DICOM Part 10 object: {exc}") from exc
    size = path.stat().st_size
    if offset > size:
        raise InvalidDatasetError("file meta information is longer than the object")
    with path.open("rb") as f:
        f.seek(offset)
        return read_identity(f, transfer_syntax, size - offset), transfer_syntax


class InstanceReceiver:
    """Stores received instances and queues them for indexing.

    ``publish`` must block until the broker confirmed the message and raise
    on any failure (``BlockingPublisher.publish_ingest`` does).
    """

    def __init__(
        self,
        storage: ObjectStorage,
        tier: str,
        publish: Callable[[IngestMessage], None],
    ) -> None:
        self._storage = storage
        self._tier = tier
        self._publish = publish

    def receive(
        self,
        path: Path,
        source: IngestSource,
        *,
        announced_sop_class_uid: str | None = None,
        announced_sop_instance_uid: str | None = None,
    ) -> ReceivedInstance:
        """Validate, store and queue the Part 10 file at ``path``.

        Raises InvalidDatasetError (the sender's fault), StorageError or
        PublishError (ours: retryable).  The caller still owns ``path``.
        """
        identity, transfer_syntax = inspect_part10(path)
        # ErrorComment holds 64 characters: the reason comes first, the UIDs after.
        if announced_sop_instance_uid is not None and identity.sop_instance_uid != announced_sop_instance_uid:
            raise IdentityMismatchError(
                f"SOP Instance UID differs from the request's: dataset {identity.sop_instance_uid}, "
                f"request {announced_sop_instance_uid}"
            )
        if announced_sop_class_uid is not None and identity.sop_class_uid != announced_sop_class_uid:
            raise IdentityMismatchError(
                f"SOP Class UID differs from the request's: dataset {identity.sop_class_uid}, "
                f"request {announced_sop_class_uid}"
            )
        stored = self._store_write_once(path, identity)
        location = StorageLocation(
            tier=self._tier, backend=stored.backend, key=stored.key, size=stored.size, sha256=stored.sha256
        )
        message = IngestMessage(
            sop_class_uid=identity.sop_class_uid,
            sop_instance_uid=identity.sop_instance_uid,
            study_instance_uid=identity.study_instance_uid,
            series_instance_uid=identity.series_instance_uid,
            transfer_syntax_uid=transfer_syntax,
            location=location,
            source=source,
        )
        self._publish(message)
        return ReceivedInstance(identity, transfer_syntax, location, message)

    def _store_write_once(self, path: Path, identity: DatasetIdentity) -> StoredObject:
        key = instance_key(identity)
        try:
            return self._storage.put_file(key, path)
        except ObjectExistsError:
            pass
        # The SOP Instance UID is known already: same bytes → the same object,
        # different bytes → a key of its own; the ingest worker's duplicate
        # policy decides which one the index points to.
        digest = _file_sha256(path)
        existing = self._storage.stat(key)
        if existing is not None and existing.sha256 == digest:
            return StoredObject(backend=self._storage.kind, key=key, size=existing.size, sha256=digest)
        if existing is not None and existing.sha256 is None and sha256_of(self._storage, key) == digest:
            return StoredObject(backend=self._storage.kind, key=key, size=existing.size, sha256=digest)
        other_key = instance_key(identity, digest)
        logger.info(
            "different object under a stored SOP Instance UID; stored beside it",
            extra={"sop_instance_uid": identity.sop_instance_uid, "key": other_key, "sha256": digest},
        )
        try:
            return self._storage.put_file(other_key, path)
        except ObjectExistsError:  # this very content arrived before
            return StoredObject(
                backend=self._storage.kind, key=other_key, size=path.stat().st_size, sha256=digest
            )
