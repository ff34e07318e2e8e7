"""The test-server helpers themselves, as end-to-end tests use them."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import pytest

from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import (
    find_azurite_bin,
    repo_root,
    start_azurite,
    start_moto_server,
    unique_name,
)


def test_azurite_binary_can_be_overridden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PACS_AZURITE_BIN", str(tmp_path / "azurite-blob"))
    assert find_azurite_bin(install=False) == tmp_path / "azurite-blob"


def test_repo_root_is_the_workspace() -> None:
    assert (repo_root() / "uv.lock").is_file()


def test_helpers_start_usable_servers_and_stop_them() -> None:
    moto = start_moto_server()
    azurite = start_azurite()
    try:
        bucket = unique_name()
        moto.create_bucket(bucket)
        s3 = S3Storage(bucket, client=moto.client())
        assert s3.put("a/b.dcm", io.BytesIO(b"s3")).size == 2
        s3.close()
        azure = AzureBlobStorage.from_connection_string(azurite.connection_string, unique_name())
        assert azure.put("a/b.dcm", io.BytesIO(b"az")).size == 2
        azure.close()
    finally:
        moto.stop()
        azurite.stop()
    moto.stop()  # idempotent
    assert moto.server.process.returncode is not None
    assert azurite.server.process.returncode is not None
    assert not moto.server.workdir.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(moto.url, timeout=1)
