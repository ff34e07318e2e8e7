"""Azure Blob backend (azure-storage-blob, sync): objects as block blobs.

Small objects (up to ``single_put_threshold``) are buffered and written with
one Put Blob.  Larger ones are streamed: each ``block_size`` chunk is staged
as an uncommitted block while it is hashed, and Put Block List publishes the
blob at the end — with the sha256 in its metadata, since the block list
accepts metadata at commit time.  Both writes carry ``If-None-Match: *``, so
the service enforces write-once.  A failed streamed upload leaves only
uncommitted blocks, which Azure discards after a week; there is nothing to
abort.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    ContainerClient,
    LinearRetry,
    RehydratePriority,
    StandardBlobTier,
    StorageStreamDownloader,
)

from pacs_common.storage.base import (
    CHUNK_SIZE,
    HashingReader,
    ObjectArchivedError,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StoredObject,
    check_size,
    normalise_prefix,
    read_exact,
)
from pacs_common.storage.resilient import GuardedCalls

DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024
# Size of each ranged GET when streaming a download; bounds memory per reader
# (the SDK default fetches up to 32 MiB in the first request).
DOWNLOAD_CHUNK_SIZE = 4 * 1024 * 1024
SHA256_FIELD = "sha256"


class AzureBlobStorage(ObjectStorage):
    """Objects in one container, under an optional name prefix."""

    kind = "azure"

    def __init__(
        self,
        container_client: ContainerClient,
        *,
        prefix: str = "",
        access_tier: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        single_put_threshold: int | None = None,
        create_container: bool = True,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.container = container_client
        self.prefix = normalise_prefix(prefix)
        # Validated here so a typo in settings fails at start-up, not at first put.
        self.access_tier = StandardBlobTier(access_tier) if access_tier else None
        self._block_size = block_size
        self._threshold = single_put_threshold if single_put_threshold is not None else block_size
        if create_container:
            self._create_container()

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        container: str,
        *,
        prefix: str = "",
        access_tier: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        single_put_threshold: int | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retry_total: int = 3,
        create_container: bool = True,
    ) -> AzureBlobStorage:
        """A storage with its own client: bounded timeouts, retries and
        download chunk sizes (a caller-made client keeps its own settings)."""
        client = ContainerClient.from_connection_string(
            connection_string,
            container,
            connection_timeout=connect_timeout,
            read_timeout=read_timeout,
            # The SDK's default back-off starts at 15 s and grows exponentially;
            # a reader waiting on an instance should fail (or fail over) within
            # seconds, so retry about once a second instead.
            retry_policy=LinearRetry(backoff=1, random_jitter_range=1, retry_total=retry_total),
            max_single_get_size=DOWNLOAD_CHUNK_SIZE,
            max_chunk_get_size=DOWNLOAD_CHUNK_SIZE,
        )
        try:
            return cls(
                client,
                prefix=prefix,
                access_tier=access_tier,
                block_size=block_size,
                single_put_threshold=single_put_threshold,
                create_container=create_container,
            )
        except BaseException:
            client.close()
            raise

    def __repr__(self) -> str:
        return f"AzureBlobStorage(container={self.container.container_name!r}, prefix={self.prefix!r})"

    def _create_container(self) -> None:
        try:
            self.container.create_container()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise StorageError(
                f"azure: cannot create container {self.container.container_name!r}: {exc}"
            ) from exc

    def _blob(self, key: str) -> BlobClient:
        if not key:
            raise ValueError("empty object key")
        return self.container.get_blob_client(self.prefix + key)

    # -- writing -----------------------------------------------------------

    def put(self, key: str, stream: BinaryIO, *, size: int | None = None) -> StoredObject:
        blob = self._blob(key)
        reader = HashingReader(stream)
        try:
            head = read_exact(reader, self._threshold)
            peek = reader.read(1) if len(head) == self._threshold else b""
            if not peek:
                check_size(key, size, reader.size)
                blob.upload_blob(
                    head,
                    length=len(head),
                    overwrite=False,
                    metadata={SHA256_FIELD: reader.sha256},
                    standard_blob_tier=self.access_tier,
                )
            else:
                self._put_blocks(key, blob, reader, head + peek, size)
        except AzureError as exc:
            raise _put_error(exc, key) from exc
        return StoredObject(backend=self.kind, key=key, size=reader.size, sha256=reader.sha256)

    def _put_blocks(
        self, key: str, blob: BlobClient, reader: HashingReader, pending: bytes, size: int | None
    ) -> None:
        # Cheap early refusal so a duplicate does not upload gigabytes first;
        # the conditional commit below is what actually guarantees write-once.
        if self.stat(key) is not None:
            raise ObjectExistsError(f"object {key!r} already exists")
        # Random, equal-length block ids: a concurrent writer of the same name
        # stages different blocks, and Azure requires one id length per blob.
        upload = uuid.uuid4().hex
        blocks: list[BlobBlock] = []
        while True:
            if len(pending) < self._block_size:
                pending += read_exact(reader, self._block_size - len(pending))
            if not pending:
                break
            body, pending = pending[: self._block_size], pending[self._block_size :]
            block_id = f"{upload}-{len(blocks):06d}"
            blob.stage_block(block_id, body, length=len(body))
            blocks.append(BlobBlock(block_id=block_id))
        check_size(key, size, reader.size)
        blob.commit_block_list(
            blocks,
            metadata={SHA256_FIELD: reader.sha256},
            match_condition=MatchConditions.IfMissing,
            standard_blob_tier=self.access_tier,
        )

    # -- reading -----------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        try:
            downloader = self._blob(key).download_blob()
        except AzureError as exc:
            raise _storage_error(exc, key, "open") from exc
        return io.BufferedReader(_DownloadReader(downloader, key), buffer_size=CHUNK_SIZE)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        if length == 0:
            return b""
        try:
            return self._blob(key).download_blob(offset=start, length=length).readall()
        except HttpResponseError as exc:
            if _error_code(exc) == "InvalidRange":  # start is past the end
                return b""
            raise _storage_error(exc, key, "read") from exc
        except AzureError as exc:
            raise _storage_error(exc, key, "read") from exc

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            props = self._blob(key).get_blob_properties()
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise _storage_error(exc, key, "stat") from exc
        return ObjectInfo(key=key, size=props.size, sha256=(props.metadata or {}).get(SHA256_FIELD))

    def delete(self, key: str) -> None:
        try:
            self._blob(key).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            return
        except AzureError as exc:
            raise _storage_error(exc, key, "delete") from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        try:
            for name in self.container.list_blob_names(name_starts_with=self.prefix + prefix):
                yield name[len(self.prefix) :]
        except AzureError as exc:
            raise StorageError(
                f"azure listing of {self.container.container_name}/{self.prefix}{prefix} failed: {exc}"
            ) from exc

    # -- archive tiers -----------------------------------------------------

    def set_tier(self, key: str, tier: str) -> None:
        """Move one blob to an access tier (Hot, Cool, Cold, Archive)."""
        try:
            self._blob(key).set_standard_blob_tier(StandardBlobTier(tier))
        except AzureError as exc:
            raise _storage_error(exc, key, "set tier of") from exc

    def rehydrate(self, key: str, tier: str = "Hot", *, priority: str = "Standard") -> None:
        """Start bringing an Archive blob back to an online tier; Azure
        completes it asynchronously (hours), reads fail until then."""
        try:
            self._blob(key).set_standard_blob_tier(
                StandardBlobTier(tier), rehydrate_priority=RehydratePriority(priority)
            )
        except AzureError as exc:
            raise _storage_error(exc, key, "rehydrate") from exc

    def close(self) -> None:
        self.container.close()


class _DownloadReader(io.RawIOBase):
    """A blob download as a raw stream whose errors are StorageErrors."""

    def __init__(self, downloader: StorageStreamDownloader[bytes], key: str) -> None:
        self._downloader = downloader
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._downloader.read(len(buffer))
        except AzureError as exc:
            raise _storage_error(exc, self._key, "read") from exc
        buffer[: len(data)] = data
        return len(data)


def _error_code(exc: AzureError) -> str | None:
    """The storage error code (set by the blob SDK on the exceptions it raises).

    The SDK may give a ``StorageErrorCode`` member; it is a ``str`` enum, so
    comparing with the plain code string works either way.
    """
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, str) else None


def _put_error(exc: AzureError, key: str) -> StorageError:
    if isinstance(exc, ResourceExistsError) and _error_code(exc) == "BlobAlreadyExists":
        return ObjectExistsError(f"object {key!r} already exists")
    return _storage_error(exc, key, "put")


def _storage_error(exc: AzureError, key: str, action: str) -> StorageError:
    if _error_code(exc) == "BlobArchived":
        return ObjectArchivedError(f"object {key!r} is archived; rehydrate it first ({exc.message})")
    if isinstance(exc, ResourceNotFoundError):
        return ObjectNotFoundError(f"object {key!r} not found")
    message = exc.message if isinstance(exc, HttpResponseError) else str(exc)
    return StorageError(f"azure {action} {key!r} failed: {message}")


class GuardedAzureBlobStorage(GuardedCalls, AzureBlobStorage):
    """An :class:`AzureBlobStorage` whose object calls go through ``guard`` (retries, breaker)."""
