"""Settings → backends, and the tier registry, against the real test servers."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydantic import SecretStr

from pacs_common.settings import StorageBackendKind, StorageTierSettings
from pacs_common.storage import StorageRegistry, build_storage
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import AzuriteServer, MotoServer, unique_name

KEY = "1.2/3.4/5.6.dcm"


def test_build_filesystem_storage_under_the_prefix(tmp_path: Path) -> None:
    settings = StorageTierSettings(
        backend=StorageBackendKind.FILESYSTEM, path=tmp_path, prefix="hot/", fsync=False
    )

    storage = build_storage(settings)
    storage.put(KEY, io.BytesIO(b"fs"))

    assert isinstance(storage, FilesystemStorage)
    assert (tmp_path / "hot" / KEY).read_bytes() == b"fs"


def test_build_s3_storage(moto_server: MotoServer) -> None:
    bucket = unique_name()
    moto_server.create_bucket(bucket)
    settings = StorageTierSettings(
        backend=StorageBackendKind.S3,
        s3_endpoint_url=moto_server.url,
        s3_bucket=bucket,
        s3_access_key_id="testing",
        s3_secret_access_key=SecretStr("testing"),
        s3_storage_class="STANDARD_IA",
        prefix="warm",
    )

    storage = build_storage(settings)
    try:
        storage.put(KEY, io.BytesIO(b"s3"))
        assert isinstance(storage, S3Storage)
        head = storage.client.head_object(Bucket=bucket, Key=f"warm/{KEY}")
        assert head["StorageClass"] == "STANDARD_IA"
        assert storage.read_range(KEY, 0, 10) == b"s3"
    finally:
        storage.close()


def test_s3_ensure_bucket_creates_it_once(moto_server: MotoServer) -> None:
    storage = S3Storage(unique_name(), client=moto_server.client())
    try:
        storage.ensure_bucket()
        storage.ensure_bucket()
        storage.put(KEY, io.BytesIO(b"x"))
        assert list(storage.iter_keys()) == [KEY]
    finally:
        storage.close()


def test_build_azure_storage(azurite: AzuriteServer) -> None:
    container = unique_name()
    settings = StorageTierSettings(
        backend=StorageBackendKind.AZURE,
        azure_connection_string=SecretStr(azurite.connection_string),
        azure_container=container,
        azure_access_tier="Cool",
    )

    storage = build_storage(settings)
    try:
        storage.put(KEY, io.BytesIO(b"azure"))
        assert isinstance(storage, AzureBlobStorage)
        assert storage.container.container_name == container
        assert storage.container.get_blob_client(KEY).get_blob_properties().blob_tier == "Cool"
    finally:
        storage.close()


def test_azure_needs_a_connection_string() -> None:
    with pytest.raises(ValueError, match="CONNECTION_STRING"):
        build_storage(StorageTierSettings(backend=StorageBackendKind.AZURE, azure_connection_string=None))


def test_registry_from_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_server: MotoServer
) -> None:
    bucket = unique_name()
    moto_server.create_bucket(bucket)
    monkeypatch.setenv("PACS_STORAGE_HOT_BACKEND", "filesystem")
    monkeypatch.setenv("PACS_STORAGE_HOT_PATH", str(tmp_path / "hot"))
    monkeypatch.setenv("PACS_STORAGE_COLD_BACKEND", "s3")
    monkeypatch.setenv("PACS_STORAGE_COLD_S3_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("PACS_STORAGE_COLD_S3_BUCKET", bucket)
    monkeypatch.setenv("PACS_STORAGE_COLD_S3_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("PACS_STORAGE_COLD_S3_SECRET_ACCESS_KEY", "testing")

    with StorageRegistry.from_settings(("hot", "cold")) as registry:
        assert registry.names == ("hot", "cold")
        assert "cold" in registry
        assert isinstance(registry.hot, FilesystemStorage)
        assert registry.hot.root == tmp_path / "hot"
        cold = registry.get("cold")
        assert isinstance(cold, S3Storage)
        assert cold.bucket == bucket
        cold.put(KEY, io.BytesIO(b"cold"))
        assert cold.read_range(KEY, 0, 10) == b"cold"
        with pytest.raises(KeyError, match=r"'warm' is not configured \(configured tiers: cold, hot\)"):
            registry.get("warm")


def test_registry_without_hot_tier_says_so() -> None:
    registry = StorageRegistry({})
    with pytest.raises(KeyError, match="'hot' is not configured"):
        _ = registry.hot


def test_registry_from_settings_closes_built_tiers_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []
    monkeypatch.setattr(FilesystemStorage, "close", lambda self: closed.append(str(self.root)))
    monkeypatch.setenv("PACS_STORAGE_HOT_BACKEND", "filesystem")
    monkeypatch.setenv("PACS_STORAGE_HOT_PATH", "/nonexistent/hot")
    monkeypatch.setenv("PACS_STORAGE_COLD_BACKEND", "azure")
    monkeypatch.delenv("PACS_STORAGE_COLD_AZURE_CONNECTION_STRING", raising=False)

    with pytest.raises(ValueError):
        StorageRegistry.from_settings(("hot", "cold"))

    assert closed == ["/nonexistent/hot"]
