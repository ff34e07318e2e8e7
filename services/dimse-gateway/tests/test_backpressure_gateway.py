"""Backpressure at the DIMSE gateway, against a real RabbitMQ.

The gateway is wired the way ``dimse_gateway.main`` wires it: a
:class:`Backpressure` fed by a :class:`BacklogSampler` that reads the
namespace's ingest queue, the hot tier wrapped to time its writes, and the
``StoreHandler`` asking before it stores.  The ingest queue is filled past
the limit by publishing into it with no worker running; a pynetdicom SCU
then sees 0xA700 with an ErrorComment, the metrics show the refusal, and
after the queue drains the same C-STORE succeeds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import EventHandlerType

from dimse_gateway import statuses
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.server import ReusePortAssociationServer, build_ae, start_server
from dimse_gateway.store import StoreHandler
from pacs_common.backpressure import (
    BacklogSampler,
    Backpressure,
    BackpressureSettings,
    RefusalReason,
)
from pacs_common.messaging import BlockingPublisher, Topology
from pacs_common.messaging.queue_depth import QueueDepthProbe
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import BrokerSettings, GatewaySettings
from pacs_common.storage import ObjectStorage
from pacs_common.storage.base import StoredObject
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.testing.broker import free_port, sample_ingest_message

GATEWAY_AE = "PACS"
HOT = "hot"
BACKLOG_LIMIT = 5


def _ct_small() -> Path:
    found = get_testdata_file("CT_small.dcm")
    assert found is not None
    return Path(found)


@dataclass
class Gateway:
    port: int
    storage: ObjectStorage
    publisher: BlockingPublisher
    registry: CollectorRegistry
    backpressure: Backpressure

    def refusing_gauge(self) -> float | None:
        return self.registry.get_sample_value("pacs_dimse_backpressure_refusing")

    def refusals(self, reason: RefusalReason) -> float:
        labels = {"reason": reason.value}
        return self.registry.get_sample_value("pacs_dimse_backpressure_refusals_total", labels) or 0.0


@contextlib.contextmanager
def _gateway(
    broker_settings: BrokerSettings, storage: ObjectStorage, spool: Path, settings: BackpressureSettings
) -> Iterator[Gateway]:
    """A gateway as ``main`` builds it, with backpressure; torn down on exit."""
    saved = (pynetdicom_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir)
    spool.mkdir(parents=True, exist_ok=True)
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool)
    publisher = BlockingPublisher(broker_settings)
    publisher.start()
    backpressure = Backpressure(settings)
    probe = QueueDepthProbe(broker_settings)
    sampler = BacklogSampler(backpressure, probe, probe.close)
    sampler.start()
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.backpressure_refusing.set_function(lambda: float(backpressure.refusing))
    receiver = InstanceReceiver(backpressure.timed(storage), HOT, publisher.publish_ingest)
    handlers: list[EventHandlerType] = [
        (evt.EVT_C_STORE, StoreHandler(receiver, metrics, None, backpressure))
    ]
    gateway_settings = GatewaySettings(
        ae_title=GATEWAY_AE, host="127.0.0.1", port=free_port(), spool_dir=spool, reuse_port=False
    )
    server: ReusePortAssociationServer = start_server(build_ae(gateway_settings), gateway_settings, handlers)
    try:
        yield Gateway(gateway_settings.port, storage, publisher, registry, backpressure)
    finally:
        server.shutdown()
        sampler.stop()
        publisher.stop()
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = saved


def _new_instance(directory: Path) -> Path:
    """CT_small with new UIDs (each call a distinct instance)."""
    ds = dcmread(_ct_small())
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _store(port: int, path: Path) -> Dataset:
    meta, _ = split_dataset(path)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    try:
        status: Dataset = assoc.send_c_store(path)
        return status
    finally:
        assoc.release()


def _wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.05)


def _purge_ingest_queue(settings: BrokerSettings) -> None:
    async def purge() -> None:
        connection = await aio_pika.connect(settings.url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(Topology.from_settings(settings).ingest_queue, ensure=True)
            await queue.purge()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, purge()).result(timeout=30)


def _queue_depth(settings: BrokerSettings) -> int:
    async def depth() -> int:
        probe = QueueDepthProbe(settings)
        try:
            return await probe()
        finally:
            await probe.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, depth()).result(timeout=30)


def _backlog_settings() -> BackpressureSettings:
    return BackpressureSettings(
        max_ingest_backlog=BACKLOG_LIMIT,
        max_storage_write_seconds=None,
        sample_interval_seconds=0.1,
        resume_fraction=0.5,
    )


def test_full_ingest_backlog_refuses_c_store_until_drained(
    broker_settings: BrokerSettings, fs_storage: FilesystemStorage, tmp_path: Path
) -> None:
    with _gateway(broker_settings, fs_storage, tmp_path / "spool", _backlog_settings()) as gateway:
        assert _store(gateway.port, _new_instance(tmp_path)).Status == statuses.SUCCESS
        assert gateway.refusing_gauge() == 0.0

        # No worker runs: what is published stays in the ingest queue.
        for index in range(BACKLOG_LIMIT):
            gateway.publisher.publish_ingest(sample_ingest_message(index))
        _wait_until(lambda: gateway.backpressure.refusing, 10, "refusing after the backlog grew")

        stored_before = sorted(fs_storage.iter_keys())
        refused = _store(gateway.port, _new_instance(tmp_path))
        assert refused.Status == statuses.OUT_OF_RESOURCES == 0xA700
        assert "ingest backlog" in str(refused.ErrorComment)
        assert len(str(refused.ErrorComment)) <= 64
        assert gateway.refusing_gauge() == 1.0
        assert gateway.refusals(RefusalReason.INGEST_BACKLOG) == 1
        # Refused means nothing stored and nothing queued.
        assert sorted(fs_storage.iter_keys()) == stored_before
        assert _queue_depth(broker_settings) == BACKLOG_LIMIT + 1

        _purge_ingest_queue(broker_settings)
        _wait_until(lambda: not gateway.backpressure.refusing, 10, "accepting after the queue drained")
        accepted = _new_instance(tmp_path)
        assert _store(gateway.port, accepted).Status == statuses.SUCCESS
        assert gateway.refusing_gauge() == 0.0
        assert len(list(fs_storage.iter_keys())) == len(stored_before) + 1
        assert _queue_depth(broker_settings) == 1


class _SlowStorage(FilesystemStorage):
    """A directory whose writes take ``delay`` seconds (a hot tier under load)."""

    delay = 0.3

    def put_file(self, key: str, path: Path) -> StoredObject:
        time.sleep(self.delay)
        return super().put_file(key, path)


def test_slow_storage_writes_refuse_c_store_until_they_age_out(
    broker_settings: BrokerSettings, tmp_path: Path
) -> None:
    storage = _SlowStorage(tmp_path / "hot", fsync=False)
    settings = BackpressureSettings(
        max_ingest_backlog=None,
        max_storage_write_seconds=0.2,
        storage_min_samples=2,
        storage_window_seconds=1.5,
    )
    with _gateway(broker_settings, storage, tmp_path / "spool", settings) as gateway:
        for _ in range(2):  # slow, but stored: latency is measured on real writes
            assert _store(gateway.port, _new_instance(tmp_path)).Status == statuses.SUCCESS
        refused = _store(gateway.port, _new_instance(tmp_path))
        assert refused.Status == statuses.OUT_OF_RESOURCES
        assert "storage writes take" in str(refused.ErrorComment)
        assert gateway.refusals(RefusalReason.STORAGE_LATENCY) == 1
        assert len(list(storage.iter_keys())) == 2

        # Nothing is written while refusing, so the slow samples age out and
        # the next C-STORE probes the storage again.
        _wait_until(lambda: not gateway.backpressure.refusing, 5, "accepting after the window")
        assert _store(gateway.port, _new_instance(tmp_path)).Status == statuses.SUCCESS


# -- the state alone (no broker) -------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backlog_hysteresis_does_not_flap() -> None:
    state = Backpressure(BackpressureSettings(max_ingest_backlog=100, resume_fraction=0.8))
    readings = [99, 100, 95, 81, 80, 99, 100]
    refusing = []
    for ready in readings:
        state.observe_backlog(ready)
        refusing.append(state.refusing)
    assert refusing == [False, True, True, True, False, False, True]
    refusal = state.refusal()
    assert refusal is not None and refusal.reason is RefusalReason.INGEST_BACKLOG
    assert refusal.retry_after_seconds == 30


@pytest.mark.parametrize("enabled", [True, False])
def test_latency_uses_the_median_of_recent_writes(enabled: bool) -> None:
    clock = _Clock()
    settings = BackpressureSettings(
        enabled=enabled,
        max_storage_write_seconds=1.0,
        storage_min_samples=3,
        storage_window_seconds=10,
    )
    state = Backpressure(settings, clock=clock)
    state.observe_storage_write(30.0)  # one slow write is not a trend
    state.observe_storage_write(0.1)
    state.observe_storage_write(0.1)
    assert not state.refusing
    for _ in range(4):
        state.observe_storage_write(2.0)
    assert state.refusing is enabled
    clock.now += 11  # every sample is older than the window
    assert not state.refusing
