"""Retries and the circuit breaker of a guarded S3 tier, against a real moto
S3 server that is stopped and started under it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from moto.server import ThreadedMotoServer
from prometheus_client import CollectorRegistry

from pacs_common.resilience import BreakerState, CircuitOpenError, Dependencies, ResilienceSettings
from pacs_common.storage import ObjectExistsError, StorageError, StoredObject
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.resilient import GuardedCalls, storage_guard
from pacs_common.storage.s3 import GuardedS3Storage, make_s3_client
from pacs_common.testing.storage_servers import MOTO_ACCESS_KEY, MOTO_SECRET_KEY, free_port, unique_name

KEY = "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
BODY = b"DICM" * 1000
MIB = 1024 * 1024


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Moto:
    """A real moto S3 server (in this process, on its own port) that can be
    stopped and started again on the same port; its objects survive."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bucket = unique_name("resilience")
        self.server: ThreadedMotoServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        client = make_s3_client(
            endpoint_url=self.url, access_key_id=MOTO_ACCESS_KEY, secret_access_key=MOTO_SECRET_KEY
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=self.bucket)
        client.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def moto() -> Iterator[Moto]:
    server = Moto()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def guarded_storage(moto: Moto, dependencies: Dependencies) -> GuardedS3Storage:
    # One request per SDK call: the retries under test are this layer's.
    client = make_s3_client(
        endpoint_url=moto.url,
        access_key_id=MOTO_ACCESS_KEY,
        secret_access_key=MOTO_SECRET_KEY,
        connect_timeout=1.0,
        read_timeout=5.0,
        max_attempts=1,
    )
    storage = GuardedS3Storage(
        moto.bucket, client=client, multipart_threshold=5 * MIB, multipart_chunk=5 * MIB
    )
    storage.guard = storage_guard(dependencies, "hot")
    return storage


def settings(threshold: int = 3) -> ResilienceSettings:
    return ResilienceSettings(
        retry_max_attempts=3,
        retry_base_delay_seconds=0.01,
        retry_max_delay_seconds=0.05,
        breaker_failure_threshold=threshold,
        breaker_reset_seconds=30.0,
    )


def test_a_retry_rides_out_a_store_restarting_mid_call(moto: Moto) -> None:
    restarts: list[float] = []

    def restart_while_waiting(seconds: float) -> None:
        # The pause between attempts: the store comes back meanwhile.
        restarts.append(seconds)
        moto.start()

    dependencies = Dependencies(settings(), sleep=restart_while_waiting)
    storage = guarded_storage(moto, dependencies)
    try:
        moto.stop()
        stored = storage.put(KEY, io.BytesIO(BODY), size=len(BODY))  # first attempt refused, second lands
        assert stored.size == len(BODY)
        assert len(restarts) == 1
        info = storage.stat(KEY)
        assert info is not None
        assert info.sha256 == stored.sha256
        with storage.open(KEY) as stream:
            assert stream.read() == BODY
        registry = CollectorRegistry()
        registry.register(dependencies)
        assert (
            registry.get_sample_value("pacs_dependency_retries_total", {"dependency": "storage-hot"}) == 1.0
        )
    finally:
        storage.close()


def test_breaker_opens_while_the_store_is_down_and_closes_after_a_good_trial(moto: Moto) -> None:
    clock = ManualClock()
    dependencies = Dependencies(settings(threshold=2), clock=clock, sleep=lambda seconds: None)
    registry = CollectorRegistry()
    registry.register(dependencies)
    storage = guarded_storage(moto, dependencies)

    def state() -> float | None:
        return registry.get_sample_value("pacs_circuit_breaker_state", {"dependency": "storage-hot"})

    try:
        storage.put(KEY, io.BytesIO(BODY), size=len(BODY))
        assert state() == float(BreakerState.CLOSED)
        moto.stop()
        # A storage call gets 2 attempts (the SDK retries inside each): two failures open it.
        with pytest.raises(StorageError) as failed:
            storage.stat(KEY)
        assert not isinstance(failed.value.__cause__, CircuitOpenError)
        assert state() == float(BreakerState.OPEN)
        # Open: refused at once, the store is not even asked.
        with pytest.raises(StorageError) as refused:
            storage.read_range(KEY, 0, 4)
        assert isinstance(refused.value.__cause__, CircuitOpenError)

        moto.start()
        # Up again, but the breaker still refuses until its timeout passes.
        with pytest.raises(StorageError) as still_refused:
            storage.stat(KEY)
        assert isinstance(still_refused.value.__cause__, CircuitOpenError)
        clock.now += 30.0
        assert state() == float(BreakerState.HALF_OPEN)
        info = storage.stat(KEY)  # the trial: answered → closed
        assert info is not None
        assert info.size == len(BODY)
        assert state() == float(BreakerState.CLOSED)
        assert storage.read_range(KEY, 0, 4) == b"DICM"
    finally:
        storage.close()


def test_not_found_is_an_answer_not_a_failure(moto: Moto) -> None:
    dependencies = Dependencies(settings(threshold=1), sleep=lambda seconds: None)
    storage = guarded_storage(moto, dependencies)
    try:
        for _ in range(3):
            assert storage.stat("no/such/key.dcm") is None
            with pytest.raises(StorageError):
                storage.read_range("no/such/key.dcm", 0, 4)
        assert storage.guard is not None
        assert storage.guard.breaker.state is BreakerState.CLOSED
        assert storage.guard.retries == 0
    finally:
        storage.close()


class LostAnswerStorage(FilesystemStorage):
    """A store whose first ``put`` lands but whose answer is lost (a reset
    connection after the upload completed)."""

    lost = 0

    def put(self, key: str, stream: BinaryIO, *, size: int | None = None) -> StoredObject:
        stored = super().put(key, stream, size=size)
        if self.lost == 0:
            self.lost += 1
            raise StorageError("connection reset") from ConnectionResetError(104, "reset")
        return stored


class GuardedLostAnswerStorage(GuardedCalls, LostAnswerStorage):
    pass


def test_a_put_retried_after_a_lost_answer_stays_write_once(tmp_path: Path) -> None:
    storage = GuardedLostAnswerStorage(tmp_path / "objects")
    storage.guard = storage_guard(Dependencies(settings(), sleep=lambda seconds: None), "hot")
    stored = storage.put(KEY, io.BytesIO(BODY), size=len(BODY))  # lands, "fails", retried: same bytes there
    assert stored.size == len(BODY)
    assert storage.guard.retries == 1
    with storage.open(KEY) as stream:
        assert stream.read() == BODY
    # Other bytes under the same key are still refused, retry or not.
    storage.lost = 0
    with pytest.raises(ObjectExistsError):
        storage.put(KEY, io.BytesIO(BODY[::-1]), size=len(BODY))
