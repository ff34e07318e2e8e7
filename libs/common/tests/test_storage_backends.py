"""One behavioural contract, three real backends: the filesystem, an S3 server
(moto) and Azure Blob (Azurite).  Backend-specific behaviour (archive tiers,
hard links, multipart details, unreachable endpoints) follows the shared part.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from azure.storage.blob import StandardBlobTier

from pacs_common.storage import (
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
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import TMP_DIR_NAME, FilesystemStorage
from pacs_common.storage.s3 import S3Storage, make_s3_client
from pacs_common.testing.storage_servers import (
    AzuriteServer,
    MotoServer,
    free_port,
    make_azurite_connection_string,
    start_moto_server,
    unique_name,
)

MiB = 1024 * 1024
KEY = "1.2.840.1/1.2.840.1.2/1.2.840.1.2.3.dcm"
BACKEND_FIXTURES = {"filesystem": "fs_storage", "s3": "s3_storage", "azure": "azure_storage"}


@pytest.fixture(params=list(BACKEND_FIXTURES))
def storage(request: pytest.FixtureRequest) -> ObjectStorage:
    backend: ObjectStorage = request.getfixturevalue(BACKEND_FIXTURES[request.param])
    return backend


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def generated_chunks(total: int, seed: int) -> Iterator[bytes]:
    """Deterministic data in irregular chunk sizes (so reads come back short)."""
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(rng.randint(1, 300_000), total - sent)
        yield rng.randbytes(n)
        sent += n


def generated_sha256(total: int, seed: int) -> str:
    digest = hashlib.sha256()
    for chunk in generated_chunks(total, seed):
        digest.update(chunk)
    return digest.hexdigest()


class GeneratedStream(io.RawIOBase):
    """A non-seekable stream over ``generated_chunks``: never a bytes blob.

    Records the largest read request, so tests can prove that a backend
    streamed rather than reading everything at once.
    """

    def __init__(self, total: int, seed: int) -> None:
        self._chunks = generated_chunks(total, seed)
        self._pending = b""
        self.largest_request = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self.largest_request = max(self.largest_request, len(buffer))
        if not self._pending:
            self._pending = next(self._chunks, b"")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            self.largest_request = max(self.largest_request, 1 << 62)
            return b"".join([self._pending, *self._chunks])
        buffer = bytearray(size)
        n = self.readinto(memoryview(buffer))
        return bytes(buffer[:n])


def generated(total: int, seed: int) -> BinaryIO:
    """A generated stream typed as what ``put`` takes (RawIOBase is not BinaryIO to mypy)."""
    return cast(BinaryIO, GeneratedStream(total, seed))


def read_all_hashed(storage: ObjectStorage, key: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with storage.open(key) as stream:
        while chunk := stream.read(MiB):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# -- the shared contract ----------------------------------------------------------


def test_put_then_read_back(storage: ObjectStorage) -> None:
    data = payload(300_001)
    stored = storage.put(KEY, io.BytesIO(data), size=len(data))

    assert stored == StoredObject(backend=storage.kind, key=KEY, size=len(data), sha256=sha(data))
    with storage.open(KEY) as stream:
        assert stream.read() == data
    assert storage.stat(KEY) == ObjectInfo(key=KEY, size=len(data), sha256=sha(data))
    assert sha256_of(storage, KEY) == sha(data)
    assert storage.exists(KEY)


def test_empty_object(storage: ObjectStorage) -> None:
    stored = storage.put("empty/object.dcm", io.BytesIO(b""))

    assert (stored.size, stored.sha256) == (0, sha(b""))
    with storage.open("empty/object.dcm") as stream:
        assert stream.read() == b""
    assert storage.stat("empty/object.dcm") == ObjectInfo(key="empty/object.dcm", size=0, sha256=sha(b""))


def test_put_is_write_once(storage: ObjectStorage) -> None:
    original = payload(1000, seed=1)
    storage.put(KEY, io.BytesIO(original))

    with pytest.raises(ObjectExistsError):
        storage.put(KEY, io.BytesIO(payload(2000, seed=2)))

    with storage.open(KEY) as stream:
        assert stream.read() == original
    assert storage.stat(KEY) == ObjectInfo(key=KEY, size=1000, sha256=sha(original))


def test_large_put_is_write_once(storage: ObjectStorage) -> None:
    storage.put(KEY, generated(7 * MiB, seed=3))

    with pytest.raises(ObjectExistsError):
        storage.put(KEY, generated(8 * MiB, seed=4))

    assert read_all_hashed(storage, KEY) == (7 * MiB, generated_sha256(7 * MiB, seed=3))


def test_large_object_is_streamed(storage: ObjectStorage) -> None:
    total = 20_000_000
    source = GeneratedStream(total, seed=5)
    expected = generated_sha256(total, seed=5)

    stored = storage.put(KEY, cast(BinaryIO, source))

    assert (stored.size, stored.sha256) == (total, expected)
    # Never asked the source for more than one part at a time.
    assert 0 < source.largest_request <= 8 * MiB
    assert read_all_hashed(storage, KEY) == (total, expected)
    assert storage.stat(KEY) == ObjectInfo(key=KEY, size=total, sha256=expected)
    assert storage.read_range(KEY, 12_345_678, 10) == storage.read_range(KEY, 12_345_670, 18)[8:]


def test_read_range(storage: ObjectStorage) -> None:
    data = payload(1000)
    storage.put(KEY, io.BytesIO(data))

    assert storage.read_range(KEY, 100, 50) == data[100:150]
    assert storage.read_range(KEY, 0, 1) == data[:1]
    assert storage.read_range(KEY, 990, 100) == data[990:]
    assert storage.read_range(KEY, 1000, 10) == b""
    assert storage.read_range(KEY, 5000, 10) == b""
    assert storage.read_range(KEY, 10, 0) == b""


def test_missing_object(storage: ObjectStorage) -> None:
    assert storage.stat("no/such/object.dcm") is None
    assert not storage.exists("no/such/object.dcm")
    with pytest.raises(ObjectNotFoundError):
        storage.open("no/such/object.dcm")
    with pytest.raises(ObjectNotFoundError):
        storage.read_range("no/such/object.dcm", 0, 10)


def test_delete_is_idempotent(storage: ObjectStorage) -> None:
    storage.put(KEY, io.BytesIO(b"first"))

    storage.delete(KEY)
    storage.delete(KEY)
    storage.delete("never/existed.dcm")

    assert storage.stat(KEY) is None
    with pytest.raises(ObjectNotFoundError):
        storage.open(KEY)
    # Write-once means "never over an existing object": a deleted key is free again.
    storage.put(KEY, io.BytesIO(b"second"))
    assert storage.read_range(KEY, 0, 100) == b"second"


def test_iter_keys_with_prefix(storage: ObjectStorage) -> None:
    keys = ["s1/a/1.dcm", "s1/a/2.dcm", "s1/ab/3.dcm", "s1/b/4.dcm", "s2/x/5.dcm"]
    for key in keys:
        storage.put(key, io.BytesIO(key.encode()))

    assert sorted(storage.iter_keys()) == keys
    assert sorted(storage.iter_keys("s1/")) == keys[:4]
    assert sorted(storage.iter_keys("s1/a/")) == keys[:2]
    assert sorted(storage.iter_keys("s1/a")) == keys[:3]  # a string prefix, not a directory
    assert sorted(storage.iter_keys("s2/x/5")) == ["s2/x/5.dcm"]
    assert list(storage.iter_keys("s3/")) == []


def test_put_file(storage: ObjectStorage, tmp_path: Path) -> None:
    data = payload(70_000)
    path = tmp_path / "received.dcm"
    path.write_bytes(data)

    stored = storage.put_file(KEY, path)
    path.unlink()  # the caller still owns its file

    assert stored == StoredObject(backend=storage.kind, key=KEY, size=len(data), sha256=sha(data))
    assert storage.read_range(KEY, 0, len(data) + 1) == data
    assert storage.stat(KEY) == ObjectInfo(key=KEY, size=len(data), sha256=sha(data))


def test_size_mismatch_stores_nothing(storage: ObjectStorage) -> None:
    with pytest.raises(StorageError) as small:
        storage.put(KEY, io.BytesIO(b"x" * 100), size=99)
    with pytest.raises(StorageError) as large:
        storage.put(KEY, generated(6 * MiB, seed=6), size=6 * MiB + 1)

    assert not isinstance(small.value, ObjectExistsError)
    assert not isinstance(large.value, ObjectExistsError)
    assert storage.stat(KEY) is None
    assert list(storage.iter_keys()) == []


def test_copy_between_backends_keeps_sha256(
    fs_storage: FilesystemStorage, s3_storage: S3Storage, azure_storage: AzureBlobStorage
) -> None:
    total = 7 * MiB + 3  # multipart on S3, blocks on Azure
    expected = generated_sha256(total, seed=7)
    fs_storage.put(KEY, generated(total, seed=7))

    to_s3 = copy_object(fs_storage, KEY, s3_storage)
    to_azure = copy_object(s3_storage, KEY, azure_storage)
    back = copy_object(azure_storage, KEY, fs_storage, "copies/back.dcm")

    for stored, backend in ((to_s3, s3_storage), (to_azure, azure_storage), (back, fs_storage)):
        assert (stored.backend, stored.size, stored.sha256) == (backend.kind, total, expected)
        assert backend.stat(stored.key) == ObjectInfo(key=stored.key, size=total, sha256=expected)
        assert sha256_of(backend, stored.key) == expected


# -- filesystem ---------------------------------------------------------------


def test_fs_put_file_links_on_the_same_device(fs_storage: FilesystemStorage, tmp_path: Path) -> None:
    path = tmp_path / "spooled.dcm"
    path.write_bytes(b"DICM" * 1000)

    fs_storage.put_file(KEY, path)

    target = fs_storage.path_for(KEY)
    assert os.stat(target).st_ino == os.stat(path).st_ino  # zero copy
    assert os.stat(target).st_nlink == 2
    path.unlink()
    assert os.stat(target).st_nlink == 1
    assert target.read_bytes() == b"DICM" * 1000


def test_fs_put_file_copies_across_devices(fs_storage: FilesystemStorage) -> None:
    shm = Path("/dev/shm")
    fs_storage.root.mkdir(parents=True)
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(fs_storage.root).st_dev:
        pytest.skip("no second filesystem to put a file from")
    path = shm / f"pacs-test-{unique_name()}.dcm"
    path.write_bytes(b"across devices")
    try:
        stored = fs_storage.put_file(KEY, path)
        assert os.stat(fs_storage.path_for(KEY)).st_ino != os.stat(path).st_ino
    finally:
        path.unlink()
    assert stored.sha256 == sha(b"across devices")
    assert fs_storage.path_for(KEY).read_bytes() == b"across devices"


def test_fs_put_file_refuses_an_existing_key(fs_storage: FilesystemStorage, tmp_path: Path) -> None:
    fs_storage.put(KEY, io.BytesIO(b"original"))
    path = tmp_path / "newcomer.dcm"
    path.write_bytes(b"newcomer")

    with pytest.raises(ObjectExistsError):
        fs_storage.put_file(KEY, path)

    assert fs_storage.path_for(KEY).read_bytes() == b"original"
    assert path.read_bytes() == b"newcomer"


def test_fs_leaves_no_temporary_files_and_hides_stale_ones(fs_storage: FilesystemStorage) -> None:
    fs_storage.put(KEY, io.BytesIO(b"a"))
    with pytest.raises(ObjectExistsError):
        fs_storage.put(KEY, io.BytesIO(b"b"))
    tmp_dir = fs_storage.root / TMP_DIR_NAME
    assert list(tmp_dir.iterdir()) == []

    (tmp_dir / "stale.part").write_bytes(b"left by a crash")
    assert list(fs_storage.iter_keys()) == [KEY]


@pytest.mark.parametrize(
    "key", ["", "/abs/key.dcm", "a/../b.dcm", "../b.dcm", "a//b.dcm", "a/./b", "a/", f"{TMP_DIR_NAME}/x"]
)
def test_fs_rejects_keys_that_escape_or_alias(fs_storage: FilesystemStorage, key: str) -> None:
    with pytest.raises(ValueError):
        fs_storage.put(key, io.BytesIO(b"x"))


def test_fs_root_that_is_a_file_fails_with_storage_error(tmp_path: Path) -> None:
    root = tmp_path / "not-a-directory"
    root.write_bytes(b"")
    storage = FilesystemStorage(root)
    source = tmp_path / "source.dcm"
    source.write_bytes(b"x")

    with pytest.raises(StorageError) as put:
        storage.put(KEY, io.BytesIO(b"x"))
    with pytest.raises(StorageError) as put_file:
        storage.put_file(KEY, source)

    assert not isinstance(put.value, ObjectExistsError)
    assert not isinstance(put_file.value, ObjectExistsError)


def test_fs_root_under_proc_fails_with_storage_error() -> None:
    storage = FilesystemStorage(Path("/proc/pacs-no-such-dir/objects"))
    with pytest.raises(StorageError):
        storage.put(KEY, io.BytesIO(b"x"))


# -- S3 -----------------------------------------------------------------------


def test_s3_multipart_upload_records_sha256_in_a_tag(s3_storage: S3Storage) -> None:
    total = 11 * MiB
    s3_storage.put(KEY, generated(total, seed=8))

    head = s3_storage.client.head_object(Bucket=s3_storage.bucket, Key=KEY)
    assert head["ETag"].strip('"').endswith("-3")  # 5 MiB + 5 MiB + 1 MiB parts
    assert "sha256" not in head.get("Metadata", {})
    tags = s3_storage.client.get_object_tagging(Bucket=s3_storage.bucket, Key=KEY)["TagSet"]
    assert tags == [{"Key": "sha256", "Value": generated_sha256(total, seed=8)}]


def test_s3_single_put_records_sha256_in_metadata(s3_storage: S3Storage) -> None:
    s3_storage.put(KEY, io.BytesIO(b"small"))

    head = s3_storage.client.head_object(Bucket=s3_storage.bucket, Key=KEY)
    assert head["Metadata"] == {"sha256": sha(b"small")}


@pytest.mark.parametrize("size", [100, 6 * MiB])
def test_s3_conditional_write_refuses_a_racing_writer(
    s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    s3_storage.put(KEY, io.BytesIO(b"winner"))
    # Pretend the early existence check saw nothing, as when two writers race:
    # the server's If-None-Match must still refuse the second one.
    monkeypatch.setattr(s3_storage, "stat", lambda key: None)

    with pytest.raises(ObjectExistsError):
        s3_storage.put(KEY, generated(size, seed=9))

    assert s3_storage.read_range(KEY, 0, 100) == b"winner"
    uploads = s3_storage.client.list_multipart_uploads(Bucket=s3_storage.bucket)
    assert uploads.get("Uploads", []) == []  # the refused multipart upload was aborted


def test_s3_prefix_isolates_tiers(moto_server: MotoServer, s3_storage: S3Storage) -> None:
    other = S3Storage(s3_storage.bucket, prefix="/cold/", client=moto_server.client())
    other.put(KEY, io.BytesIO(b"cold"))
    s3_storage.put("hot.dcm", io.BytesIO(b"hot"))

    assert list(other.iter_keys()) == [KEY]
    assert other.read_range(KEY, 0, 10) == b"cold"
    assert s3_storage.stat(KEY) is None
    assert sorted(s3_storage.iter_keys()) == [f"cold/{KEY}", "hot.dcm"]
    other.close()


def test_s3_glacier_object_must_be_restored(moto_server: MotoServer, s3_storage: S3Storage) -> None:
    glacier = S3Storage(s3_storage.bucket, client=moto_server.client(), storage_class="GLACIER")
    glacier.put(KEY, io.BytesIO(b"archived"))

    head = glacier.client.head_object(Bucket=glacier.bucket, Key=KEY)
    assert head["StorageClass"] == "GLACIER"
    assert glacier.stat(KEY) == ObjectInfo(key=KEY, size=8, sha256=sha(b"archived"))
    with pytest.raises(ObjectArchivedError):
        glacier.open(KEY)
    with pytest.raises(ObjectArchivedError):
        glacier.read_range(KEY, 0, 4)

    glacier.restore(KEY, days=1)
    glacier.restore(KEY, days=1)  # asking again is harmless
    assert glacier.read_range(KEY, 0, 100) == b"archived"
    glacier.close()


def _assert_fails_fast(storage: ObjectStorage, limit: float = 20.0) -> None:
    calls: list[Callable[[], object]] = [
        lambda: storage.put("new.dcm", io.BytesIO(b"x")),
        lambda: storage.stat(KEY),
        lambda: storage.open(KEY),
        lambda: storage.read_range(KEY, 0, 1),
        lambda: storage.delete(KEY),
        lambda: list(storage.iter_keys()),
    ]
    started = time.monotonic()
    for call in calls:
        with pytest.raises(StorageError) as caught:
            call()
        assert type(caught.value) is StorageError  # not "not found" / "exists"
    assert time.monotonic() - started < limit


def test_s3_stopped_server_raises_storage_error() -> None:
    server = start_moto_server()
    try:
        bucket = unique_name()
        server.create_bucket(bucket)
        client = make_s3_client(
            endpoint_url=server.url,
            access_key_id="testing",
            secret_access_key="testing",
            connect_timeout=1,
            read_timeout=2,
            max_attempts=2,
        )
        storage = S3Storage(bucket, client=client)
        storage.put(KEY, io.BytesIO(b"before"))
    finally:
        server.stop()

    _assert_fails_fast(storage)


def test_s3_unreachable_endpoint_raises_storage_error() -> None:
    client = make_s3_client(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="testing",
        secret_access_key="testing",
        connect_timeout=1,
        read_timeout=2,
        max_attempts=2,
    )
    _assert_fails_fast(S3Storage("nobucket", client=client))


# -- Azure --------------------------------------------------------------------


def test_azure_large_object_is_committed_from_blocks(azure_storage: AzureBlobStorage) -> None:
    total = 11 * MiB
    azure_storage.put(KEY, generated(total, seed=10))

    blob = azure_storage.container.get_blob_client(KEY)
    committed, uncommitted = blob.get_block_list("all")
    assert [block.size for block in committed] == [4 * MiB, 4 * MiB, 3 * MiB]
    assert uncommitted == []
    assert blob.get_blob_properties().metadata == {"sha256": generated_sha256(total, seed=10)}


@pytest.mark.parametrize("size", [100, 6 * MiB])
def test_azure_conditional_write_refuses_a_racing_writer(
    azure_storage: AzureBlobStorage, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    azure_storage.put(KEY, io.BytesIO(b"winner"))
    monkeypatch.setattr(azure_storage, "stat", lambda key: None)

    with pytest.raises(ObjectExistsError):
        azure_storage.put(KEY, generated(size, seed=11))

    assert azure_storage.read_range(KEY, 0, 100) == b"winner"


def test_azure_access_tier_applies_to_every_put(azurite: AzuriteServer) -> None:
    storage = AzureBlobStorage.from_connection_string(
        azurite.connection_string,
        unique_name(),
        access_tier="Cool",
        block_size=4 * MiB,
        single_put_threshold=5 * MiB,
    )
    try:
        storage.put("small.dcm", io.BytesIO(b"small"))
        storage.put("large.dcm", generated(6 * MiB, seed=12))
        for key in ("small.dcm", "large.dcm"):
            assert (
                storage.container.get_blob_client(key).get_blob_properties().blob_tier
                == StandardBlobTier.COOL
            )
    finally:
        storage.container.delete_container()
        storage.close()


def test_azure_prefix_isolates_tiers(azurite: AzuriteServer, azure_storage: AzureBlobStorage) -> None:
    other = AzureBlobStorage.from_connection_string(
        azurite.connection_string, azure_storage.container.container_name, prefix="cold"
    )
    other.put(KEY, io.BytesIO(b"cold"))
    azure_storage.put("hot.dcm", io.BytesIO(b"hot"))

    assert list(other.iter_keys()) == [KEY]
    assert azure_storage.stat(KEY) is None
    assert sorted(azure_storage.iter_keys()) == [f"cold/{KEY}", "hot.dcm"]
    other.close()


def test_azure_archived_blob_must_be_rehydrated(azure_storage: AzureBlobStorage) -> None:
    azure_storage.put(KEY, io.BytesIO(b"archived"))
    azure_storage.container.get_blob_client(KEY).set_standard_blob_tier("Archive")

    assert azure_storage.stat(KEY) == ObjectInfo(key=KEY, size=8, sha256=sha(b"archived"))
    with pytest.raises(ObjectArchivedError):
        azure_storage.open(KEY)
    with pytest.raises(ObjectArchivedError):
        azure_storage.read_range(KEY, 0, 4)

    azure_storage.rehydrate(KEY, "Hot")
    assert azure_storage.read_range(KEY, 0, 100) == b"archived"


def test_azure_set_tier_archives(azure_storage: AzureBlobStorage) -> None:
    azure_storage.put(KEY, io.BytesIO(b"x"))
    azure_storage.set_tier(KEY, "Archive")
    with pytest.raises(ObjectArchivedError):
        azure_storage.open(KEY)


def test_azure_unreachable_endpoint_raises_storage_error() -> None:
    connection_string = make_azurite_connection_string(f"http://127.0.0.1:{free_port()}/devstoreaccount1")
    started = time.monotonic()
    with pytest.raises(StorageError):
        AzureBlobStorage.from_connection_string(
            connection_string, "unreachable", connect_timeout=1, read_timeout=2, retry_total=1
        )
    storage = AzureBlobStorage.from_connection_string(
        connection_string,
        "unreachable",
        connect_timeout=1,
        read_timeout=2,
        retry_total=1,
        create_container=False,
    )
    assert time.monotonic() - started < 20
    _assert_fails_fast(storage)
