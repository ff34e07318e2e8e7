"""Retries and a circuit breaker around the calls an object store serves
over the network (S3, Azure Blob).

:class:`GuardedCalls` goes first in a backend's bases
(``GuardedS3Storage``, ``GuardedAzureBlobStorage``): the backend
stays what it was (``isinstance(storage, S3Storage)`` still holds, its own
methods — restore, rehydrate — still work) while ``put``, ``open``,
``read_range``, ``stat`` and ``delete`` run through a
:class:`~pacs_common.resilience.DependencyGuard`.  The SDKs retry a request
a few times themselves; this layer adds a retry of the whole operation
after a jittered pause, and a breaker that fails calls at once (as
:class:`~pacs_common.storage.StorageError`) while the store keeps failing.

A ``put`` is retried only when its stream can be rewound, and stays
write-once: when a retry finds the key taken because the first attempt did
land, it succeeds only if the stored object is the same bytes (sha256).
Filesystem tiers are not guarded: a local disk has no transient faults
worth retrying.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from pacs_common.resilience import CircuitOpenError, Dependencies, DependencyGuard, never_retry
from pacs_common.storage.base import (
    CHUNK_SIZE,
    ObjectExistsError,
    ObjectInfo,
    ObjectStorage,
    StorageError,
    StoredObject,
)
from pacs_common.storage.transient import is_transient_storage_error

__all__ = ["GuardedCalls", "storage_guard"]

T = TypeVar("T")

#: The SDKs already retry each request: one more try of the whole operation.
STORAGE_MAX_ATTEMPTS = 2


def storage_guard(dependencies: Dependencies, tier: str) -> DependencyGuard:
    """The guard of one tier, named ``storage-<tier>`` in metrics."""
    return dependencies.guard(
        f"storage-{tier}", is_transient_storage_error, max_attempts=STORAGE_MAX_ATTEMPTS
    )


class GuardedCalls(ObjectStorage):
    """Routes the object calls of the backend after it in the MRO through ``guard``."""

    guard: DependencyGuard | None = None

    def put(self, key: str, stream: BinaryIO, *, size: int | None = None) -> StoredObject:
        put_once = super().put  # type: ignore[safe-super]
        guard = self.guard
        if guard is None:
            return put_once(key, stream, size=size)
        start = _rewind_point(stream)
        attempts = 0

        def attempt() -> StoredObject:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and start is not None:
                stream.seek(start)
            try:
                return put_once(key, stream, size=size)
            except ObjectExistsError:
                landed = self._landed_earlier(key, stream, start) if attempts > 1 else None
                if landed is None:
                    raise
                return landed

        return self._through(guard, attempt, retry=start is not None)

    def open(self, key: str) -> BinaryIO:
        return self._guarded(lambda: super(GuardedCalls, self).open(key))  # type: ignore[safe-super]

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self._guarded(
            lambda: super(GuardedCalls, self).read_range(key, start, length)  # type: ignore[safe-super]
        )

    def stat(self, key: str) -> ObjectInfo | None:
        return self._guarded(lambda: super(GuardedCalls, self).stat(key))  # type: ignore[safe-super]

    def delete(self, key: str) -> None:
        self._guarded(lambda: super(GuardedCalls, self).delete(key))  # type: ignore[safe-super]

    def _guarded(self, operation: Callable[[], T]) -> T:
        if self.guard is None:
            return operation()
        return self._through(self.guard, operation, retry=True)

    @staticmethod
    def _through(guard: DependencyGuard, operation: Callable[[], T], *, retry: bool) -> T:
        try:
            return guard.call(operation, retryable=None if retry else never_retry)
        except CircuitOpenError as exc:
            raise StorageError(str(exc)) from exc

    def _landed_earlier(self, key: str, stream: BinaryIO, start: int | None) -> StoredObject | None:
        """The object an earlier attempt stored, if it holds exactly these bytes."""
        if start is None:
            return None
        info = super().stat(key)  # type: ignore[safe-super]
        if info is None or info.sha256 is None:
            return None
        stream.seek(start)
        digest = hashlib.sha256()
        size = 0
        while chunk := stream.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
        if info.sha256 != digest.hexdigest() or info.size != size:
            return None
        return StoredObject(backend=self.kind, key=key, size=size, sha256=info.sha256)


def _rewind_point(stream: BinaryIO) -> int | None:
    """Where the stream starts, if it can be read again from there."""
    try:
        return stream.tell() if stream.seekable() else None
    except (OSError, ValueError, AttributeError):
        return None
