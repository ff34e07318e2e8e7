"""WADO-RS while the object store is down: a 503 with Retry-After before
any byte of the body, never a 200 whose multipart body breaks off (a viewer
would show a half-loaded study or a decoding error instead of retrying)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomweb_api.testing import store_instances
from pacs_common.settings import StorageTiersSettings
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.testing.storage_servers import (
    MOTO_ACCESS_KEY,
    MOTO_SECRET_KEY,
    MotoServer,
    start_moto_server,
    unique_name,
)


def _ct(study: str) -> Dataset:
    ds = dcmread(str(get_testdata_file("CT_small.dcm", download=False)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture
def own_moto() -> Iterator[MotoServer]:
    """A moto server of this test's own: the test stops it."""
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def storage_registry(
    own_moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[StorageRegistry]:
    """The hot tier on S3, built from the environment the way ``main`` does."""
    bucket = unique_name()
    own_moto.create_bucket(bucket)
    monkeypatch.setenv("PACS_STORAGE_TIERS", "hot")
    for name, value in {
        "BACKEND": "s3",
        "S3_ENDPOINT_URL": own_moto.url,
        "S3_BUCKET": bucket,
        "S3_ACCESS_KEY_ID": MOTO_ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": MOTO_SECRET_KEY,
    }.items():
        monkeypatch.setenv(f"PACS_STORAGE_HOT_{name}", value)
    registry = StorageRegistry.from_settings(StorageTiersSettings().tiers)
    yield registry
    registry.close()


@pytest.fixture
def hot_storage(storage_registry: StorageRegistry) -> ObjectStorage:
    return storage_registry.hot


async def test_retrieve_is_503_while_the_object_store_is_down(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, storage_registry: StorageRegistry, own_moto: MotoServer
) -> None:
    study = generate_uid()
    [stored] = await store_instances(db_pool, storage_registry.hot, [_ct(study)], tier="hot")
    url = (
        f"/dicom-web/studies/{study}/series/{stored.series_instance_uid}/instances/{stored.sop_instance_uid}"
    )
    assert (await client.get(url)).status_code == 200

    own_moto.stop()
    response = await client.get(url)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert "unavailable" in response.json()["detail"]
