"""Building storages from settings, and the tier name → storage registry.

The index records each object's tier name; readers resolve it here, so where
a tier physically lives (directory, bucket, container) is configuration only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from pacs_common.resilience import Dependencies, DependencyGuard
from pacs_common.settings import StorageBackendKind, StorageTierSettings
from pacs_common.storage.base import ObjectStorage
from pacs_common.storage.resilient import storage_guard


def build_storage(settings: StorageTierSettings, *, guard: DependencyGuard | None = None) -> ObjectStorage:
    """The backend one tier's settings describe (clients created, no I/O
    except that an Azure container is created when missing).  ``guard``:
    retries and circuit breaker for a network store (S3, Azure)."""
    # Imported here so a service using one backend does not import the SDKs
    # of the others at start-up.
    if settings.backend is StorageBackendKind.FILESYSTEM:
        from pacs_common.storage.filesystem import FilesystemStorage, split_key

        root = Path(settings.path)
        prefix = settings.prefix.strip("/")
        if prefix:
            root = root.joinpath(*split_key(prefix))
        return FilesystemStorage(root, fsync=settings.fsync)

    if settings.backend is StorageBackendKind.S3:
        from pacs_common.storage.s3 import GuardedS3Storage, S3Storage, make_s3_client

        secret = settings.s3_secret_access_key
        client = make_s3_client(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
        s3 = (GuardedS3Storage if guard is not None else S3Storage)(
            settings.s3_bucket,
            prefix=settings.prefix,
            client=client,
            storage_class=settings.s3_storage_class,
            multipart_threshold=settings.multipart_threshold_bytes,
            multipart_chunk=settings.multipart_chunk_bytes,
        )
        if isinstance(s3, GuardedS3Storage):
            s3.guard = guard
        return s3

    if settings.backend is StorageBackendKind.AZURE:
        from pacs_common.storage.azure import AzureBlobStorage, GuardedAzureBlobStorage

        if settings.azure_connection_string is None:
            raise ValueError("an azure storage tier needs AZURE_CONNECTION_STRING to be set")
        azure = (GuardedAzureBlobStorage if guard is not None else AzureBlobStorage).from_connection_string(
            settings.azure_connection_string.get_secret_value(),
            settings.azure_container,
            prefix=settings.prefix,
            access_tier=settings.azure_access_tier,
            block_size=settings.multipart_chunk_bytes,
            single_put_threshold=settings.multipart_threshold_bytes,
        )
        if isinstance(azure, GuardedAzureBlobStorage):
            azure.guard = guard
        return azure

    raise ValueError(f"unknown storage backend {settings.backend!r}")


class StorageRegistry:
    """The configured tiers by name ("hot", "warm", "cold").  ``dependencies``:
    the guards of its network tiers (register it in a metrics registry for
    ``pacs_circuit_breaker_state`` / ``pacs_dependency_retries_total``)."""

    def __init__(
        self, tiers: Mapping[str, ObjectStorage], *, dependencies: Dependencies | None = None
    ) -> None:
        self._tiers = dict(tiers)
        self.dependencies = dependencies or Dependencies()

    @classmethod
    def from_settings(
        cls, tier_names: Sequence[str] = ("hot",), *, dependencies: Dependencies | None = None
    ) -> StorageRegistry:
        """Build each tier from ``PACS_STORAGE_<TIER>_*`` (S3 and Azure tiers
        guarded by ``storage-<tier>`` in ``dependencies``); if one fails, the
        ones already built are closed before the error propagates."""
        dependencies = dependencies or Dependencies()
        tiers: dict[str, ObjectStorage] = {}
        try:
            for name in tier_names:
                tier = StorageTierSettings.for_tier(name)
                local = tier.backend is StorageBackendKind.FILESYSTEM  # no transient faults
                guard = None if local else storage_guard(dependencies, name)
                tiers[name] = build_storage(tier, guard=guard)
        except BaseException:
            cls(tiers).close()
            raise
        return cls(tiers, dependencies=dependencies)

    def get(self, tier: str) -> ObjectStorage:
        try:
            return self._tiers[tier]
        except KeyError:
            configured = ", ".join(sorted(self._tiers)) or "none"
            raise KeyError(
                f"storage tier {tier!r} is not configured (configured tiers: {configured})"
            ) from None

    @property
    def hot(self) -> ObjectStorage:
        return self.get("hot")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tiers)

    def __contains__(self, tier: object) -> bool:
        return tier in self._tiers

    def __iter__(self) -> Iterator[str]:
        return iter(self._tiers)

    def close(self) -> None:
        """Close every tier; the first failure is raised after all were tried."""
        first: BaseException | None = None
        for storage in self._tiers.values():
            try:
                storage.close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> StorageRegistry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
