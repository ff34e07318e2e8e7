"""The DIMSE gateway in-process, against real components.

The gateway is wired the way ``dimse_gateway.main`` wires it — ``build_ae``,
``StoreHandler`` over an ``InstanceReceiver``, ``AssociationObserver``,
``start_server``, a ``BlockingPublisher`` — against the shared RabbitMQ (a
namespace of its own per test) and a real hot tier: a directory, an S3 bucket
on a moto server, an Azure container on Azurite.  The sender is a pynetdicom
SCU in the test, and the assertions are on what a sender and the rest of the
archive see: association results, DIMSE statuses and comments, the stored
objects, the ingest messages and the gateway's metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aio_pika
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dimse_gateway import statuses
from dimse_gateway.associations import AssociationObserver
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.server import ReusePortAssociationServer, build_ae, start_server
from dimse_gateway.store import StoreHandler
from pacs_common.messaging import BlockingPublisher, IngestMessage, Topology, decode_ingest
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import BrokerSettings, GatewaySettings
from pacs_common.storage import ObjectStorage
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.broker import TcpProxy, free_port, settings_via_proxy
from pacs_common.testing.storage_servers import AzuriteServer, MotoServer, unique_name

HOT_TIER = "hot"
GATEWAY_AE = "PACS"
SENDER_AE = "MODALITY"
BACKENDS = ["filesystem", "s3", "azure"]
_STORAGE_FIXTURES = {"filesystem": "fs_storage", "s3": "s3_storage", "azure": "azure_storage"}
# Preamble (128) + "DICM" (4) + (0002,0000) UL element (12): where the group starts counting.
_META_GROUP_START = 128 + 4 + 12


def _testdata(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, f"pydicom test file {name} missing"
    return Path(found)


CT_SMALL = _testdata("CT_small.dcm")


# -- the gateway -------------------------------------------------------------


@dataclass
class Gateway:
    settings: GatewaySettings
    storage: ObjectStorage
    publisher: BlockingPublisher
    registry: CollectorRegistry
    server: ReusePortAssociationServer

    def operations(self, status: int) -> float:
        """pacs_dimse_operations_total of C-STORE answered with ``status``."""
        labels = {"operation": "C-STORE", "status": f"0x{status:04X}"}
        return self.registry.get_sample_value("pacs_dimse_operations_total", labels) or 0.0

    def associations(self, outcome: str) -> float:
        value = self.registry.get_sample_value("pacs_dimse_associations_total", {"outcome": outcome})
        return value or 0.0


class StartGateway(Protocol):
    def __call__(
        self, storage: ObjectStorage, *, broker: BrokerSettings | None = None, **settings: Any
    ) -> Gateway: ...


@contextlib.contextmanager
def _pynetdicom_config(spool: Path) -> Iterator[None]:
    """What ``main._configure_pynetdicom`` sets process-wide (receive into a
    spool file), plus chunked sending for the SCU so it sends a file's bytes
    unchanged; everything is restored afterwards."""
    saved = (
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET,
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET,
        tempfile.tempdir,
    )
    spool.mkdir(parents=True, exist_ok=True)
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool)
    try:
        yield
    finally:
        (
            pynetdicom_config.STORE_RECV_CHUNKED_DATASET,
            pynetdicom_config.STORE_SEND_CHUNKED_DATASET,
            tempfile.tempdir,
        ) = saved


def _shut_down(server: ReusePortAssociationServer) -> None:
    server.shutdown()  # raises if start_server had not registered it in ae._servers
    for assoc in server.active_associations:
        assoc.abort()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def start_gateway(broker_settings: BrokerSettings, spool: Path) -> Iterator[StartGateway]:
    """Starts gateways wired like ``main.main``; all are shut down, and their
    publishers stopped, at teardown.

    The pynetdicom settings are applied when a gateway starts, not at fixture
    set-up: the session-wide moto/Azurite servers must not put their working
    directories into the spool (``tempfile.tempdir``) when a test starts them.
    """
    with contextlib.ExitStack() as stack:

        def start(
            storage: ObjectStorage, *, broker: BrokerSettings | None = None, **overrides: Any
        ) -> Gateway:
            stack.enter_context(_pynetdicom_config(spool))
            settings = GatewaySettings(
                **{
                    "ae_title": GATEWAY_AE,
                    "host": "127.0.0.1",
                    "port": free_port(),
                    "spool_dir": spool,
                    "reuse_port": False,
                    **overrides,
                }
            )
            publisher = BlockingPublisher(broker or broker_settings)
            publisher.start()
            stack.callback(publisher.stop)
            registry = CollectorRegistry()
            metrics = GatewayMetrics(registry)
            receiver = InstanceReceiver(storage, HOT_TIER, publisher.publish_ingest)
            handlers: list[EventHandlerType] = [
                (evt.EVT_C_STORE, StoreHandler(receiver, metrics)),
                *AssociationObserver(metrics).handlers(),
            ]
            ae = build_ae(settings)
            server = start_server(ae, settings, handlers)
            stack.callback(_shut_down, server)
            metrics.active_associations.set_function(lambda: len(server.active_associations))
            return Gateway(settings, storage, publisher, registry, server)

        yield start


@pytest.fixture(params=BACKENDS)
def hot(request: pytest.FixtureRequest) -> ObjectStorage:
    """The hot tier: a directory, a bucket on moto, a container on Azurite."""
    storage: ObjectStorage = request.getfixturevalue(_STORAGE_FIXTURES[request.param])
    return storage


@pytest.fixture(params=BACKENDS)
def broken_hot(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStorage]:
    """A hot tier every write to fails: a root that is a regular file, a
    bucket that does not exist, a container that does not exist."""
    if request.param == "filesystem":
        root = tmp_path / "root-is-a-file"
        root.write_bytes(b"not a directory")
        yield FilesystemStorage(root)
        return
    if request.param == "s3":
        moto: MotoServer = request.getfixturevalue("moto_server")
        s3 = S3Storage(unique_name("missing"), client=moto.client())
        yield s3
        s3.close()
        return
    azurite: AzuriteServer = request.getfixturevalue("azurite")
    azure = AzureBlobStorage.from_connection_string(
        azurite.connection_string, unique_name("missing"), create_container=False, retry_total=0
    )
    yield azure
    azure.close()


# -- the sender ----------------------------------------------------------------


def _scu(calling_ae_title: str = SENDER_AE) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = 5
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    return ae


def _associate(ae: AE, gateway: Gateway, called_ae_title: str | None = None) -> Association:
    return ae.associate("127.0.0.1", gateway.settings.port, ae_title=called_ae_title or GATEWAY_AE)


def _echo_association(
    gateway: Gateway, *, calling: str = SENDER_AE, called: str | None = None
) -> Association:
    ae = _scu(calling)
    ae.add_requested_context(Verification)
    return _associate(ae, gateway, called)


def _rejection(assoc: Association) -> A_ASSOCIATE:
    assert assoc.is_rejected, "the association was not rejected"
    primitive = assoc.acceptor.primitive
    assert isinstance(primitive, A_ASSOCIATE)
    return primitive


def _send(gateway: Gateway, *paths: Path, calling: str = SENDER_AE) -> list[Dataset]:
    """C-STORE each file, on one association, exactly as its bytes are
    (chunked sending over a context in the file's own transfer syntax)."""
    ae = _scu(calling)
    contexts = set()
    for path in paths:
        meta, _ = split_dataset(path)
        contexts.add((UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)))
    for sop_class, transfer_syntax in sorted(contexts):
        ae.add_requested_context(sop_class, transfer_syntax)
    assoc = _associate(ae, gateway)
    assert assoc.is_established, "the gateway did not accept the association"
    try:
        return [assoc.send_c_store(path) for path in paths]
    finally:
        assoc.release()


def _status(response: Dataset) -> int | None:
    """The Status of a response; None when no response came at all."""
    value = response.get("Status")
    return None if value is None else int(value)


# -- what the archive sees -------------------------------------------------------


@dataclass(frozen=True)
class Part10:
    meta: Dataset
    dataset_bytes: bytes  # everything after the file meta information


def _sent(path: Path) -> Part10:
    """A file as the SCU sends it: the bytes after its file meta."""
    meta, offset = split_dataset(path)
    return Part10(meta, path.read_bytes()[offset:])


def _parse_stored(data: bytes) -> Part10:
    assert data[128:132] == b"DICM", "the stored object has no Part 10 preamble"
    meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    end = _META_GROUP_START + int(meta.FileMetaInformationGroupLength)
    return Part10(meta, data[end:])


def _read(storage: ObjectStorage, key: str) -> bytes:
    with storage.open(key) as stream:
        return stream.read()


def _key(path: Path, digest: str | None = None) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    base = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"
    return f"{base}.{digest[:16]}.dcm" if digest else f"{base}.dcm"


def _drain_ingest_queue(settings: BrokerSettings) -> list[IngestMessage]:
    """Every message in the namespace's ingest queue, taken off it.

    The gateway answers success only after the broker confirmed the message,
    so what a successful C-STORE queued is there already.  Runs in a thread
    with its own event loop (the tests are plain functions).
    """

    async def drain() -> list[IngestMessage]:
        connection = await aio_pika.connect(settings.url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(Topology.from_settings(settings).ingest_queue, ensure=True)
            messages: list[IngestMessage] = []
            while (raw := await queue.get(no_ack=True, fail=False, timeout=10)) is not None:
                messages.append(decode_ingest(raw.body))
            return messages

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, drain()).result(timeout=30)


def _wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.05)


def _modified_copy(source: Path, target: Path) -> Path:
    """The same instance (same UIDs, same transfer syntax), one attribute changed."""
    ds = dcmread(source)
    ds.PatientName = "Changed^After^Sending"
    ds.save_as(target, enforce_file_format=True)
    return target


# -- associations -----------------------------------------------------------------


def test_echo_is_answered(fs_storage: FilesystemStorage, start_gateway: StartGateway) -> None:
    gateway = start_gateway(fs_storage)
    assoc = _echo_association(gateway)
    assert assoc.is_established
    try:
        assert _status(assoc.send_c_echo()) == statuses.SUCCESS
    finally:
        assoc.release()
    _wait_until(lambda: gateway.associations("released") == 1, 5, "release counted")
    assert gateway.associations("accepted") == 1
    assert gateway.associations("rejected") == 0


@pytest.mark.parametrize("required", [True, False])
def test_called_ae_title_checked_when_required(
    required: bool, fs_storage: FilesystemStorage, start_gateway: StartGateway
) -> None:
    gateway = start_gateway(fs_storage, require_called_ae_title=required)
    assoc = _echo_association(gateway, called="NOT_THE_PACS")
    if required:
        rejection = _rejection(assoc)
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 7)
        assert rejection.result_str == "Rejected Permanent"
        assert rejection.reason_str == "Called AE title not recognised"
        assert gateway.associations("rejected") == 1
        assert gateway.associations("accepted") == 0
        # The right title still gets in.
        assoc = _echo_association(gateway, called=GATEWAY_AE)
    assert assoc.is_established
    try:
        assert _status(assoc.send_c_echo()) == statuses.SUCCESS
    finally:
        assoc.release()


def test_calling_ae_title_allow_list(fs_storage: FilesystemStorage, start_gateway: StartGateway) -> None:
    gateway = start_gateway(fs_storage, allowed_calling_ae_titles=["GOOD"])
    rejection = _rejection(_echo_association(gateway, calling="BAD"))
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    assert rejection.reason_str == "Calling AE title not recognised"

    assoc = _echo_association(gateway, calling="GOOD")
    assert assoc.is_established
    try:
        assert _status(assoc.send_c_echo()) == statuses.SUCCESS
    finally:
        assoc.release()
    assert gateway.associations("rejected") == 1
    assert gateway.associations("accepted") == 1


def test_association_limit(fs_storage: FilesystemStorage, start_gateway: StartGateway) -> None:
    """pynetdicom counts the new association among the active ones and
    rejects it when they exceed maximum_associations: A-ASSOCIATE-RJ,
    rejected-transient, service-provider (presentation) source, local limit
    exceeded (PS3.8 9.3.4)."""
    gateway = start_gateway(fs_storage, max_associations=2)
    open_ones = [_echo_association(gateway) for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in open_ones)
        rejection = _rejection(_echo_association(gateway))
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        assert rejection.result_str == "Rejected Transient"
        assert rejection.reason_str == "Local limit exceeded"
        assert gateway.associations("rejected") == 1
        # The open associations are unaffected.
        for assoc in open_ones:
            assert _status(assoc.send_c_echo()) == statuses.SUCCESS
    finally:
        open_ones[0].release()
    # A slot freed is a slot usable again (the acceptor's thread ends just after the release).
    _wait_until(lambda: len(gateway.server.active_associations) == 1, 5, "released association gone")
    again = _echo_association(gateway)
    try:
        assert again.is_established
        assert _status(again.send_c_echo()) == statuses.SUCCESS
    finally:
        again.release()
        open_ones[1].release()


# -- storing ---------------------------------------------------------------------


def test_store_writes_the_bytes_sent_and_queues_one_message(
    hot: ObjectStorage, start_gateway: StartGateway, broker_settings: BrokerSettings, spool: Path
) -> None:
    gateway = start_gateway(hot)
    [response] = _send(gateway, CT_SMALL)
    assert _status(response) == statuses.SUCCESS
    assert "ErrorComment" not in response

    sent = _sent(CT_SMALL)
    key = _key(CT_SMALL)
    assert list(hot.iter_keys()) == [key]
    data = _read(hot, key)
    stored = _parse_stored(data)
    assert stored.dataset_bytes == sent.dataset_bytes
    assert stored.meta.MediaStorageSOPClassUID == sent.meta.MediaStorageSOPClassUID
    assert stored.meta.MediaStorageSOPInstanceUID == sent.meta.MediaStorageSOPInstanceUID
    assert stored.meta.TransferSyntaxUID == ExplicitVRLittleEndian == sent.meta.TransferSyntaxUID

    [message] = _drain_ingest_queue(broker_settings)
    ds = dcmread(CT_SMALL, stop_before_pixels=True)
    assert message.sop_class_uid == ds.SOPClassUID
    assert message.sop_instance_uid == ds.SOPInstanceUID
    assert message.study_instance_uid == ds.StudyInstanceUID
    assert message.series_instance_uid == ds.SeriesInstanceUID
    assert message.transfer_syntax_uid == ExplicitVRLittleEndian
    assert message.location.tier == HOT_TIER
    assert message.location.backend == hot.kind
    assert message.location.key == key
    assert message.location.size == len(data)
    assert message.location.sha256 == hashlib.sha256(data).hexdigest()
    assert message.source.protocol == "dimse"
    assert message.source.calling_ae_title == SENDER_AE
    assert message.source.called_ae_title == GATEWAY_AE
    assert message.source.peer is not None
    assert message.source.peer.startswith("127.0.0.1:")

    assert gateway.operations(statuses.SUCCESS) == 1
    assert gateway.operations(statuses.OUT_OF_RESOURCES) == 0
    assert gateway.registry.get_sample_value("pacs_dimse_store_bytes_total") == len(data)
    # pynetdicom removed its spool file; nothing is left behind.
    assert list(spool.iterdir()) == []


def test_same_instance_twice_is_one_object_two_messages(
    hot: ObjectStorage, start_gateway: StartGateway, broker_settings: BrokerSettings
) -> None:
    gateway = start_gateway(hot)
    # From two senders: the stored object does not depend on who sent it.
    [first] = _send(gateway, CT_SMALL, calling="MODALITY")
    [second] = _send(gateway, CT_SMALL, calling="OTHER_MODALITY")
    assert _status(first) == _status(second) == statuses.SUCCESS

    key = _key(CT_SMALL)
    assert list(hot.iter_keys()) == [key]
    digest = hashlib.sha256(_read(hot, key)).hexdigest()
    messages = _drain_ingest_queue(broker_settings)
    assert [m.location.key for m in messages] == [key, key]
    assert [m.location.sha256 for m in messages] == [digest, digest]
    assert [m.source.calling_ae_title for m in messages] == ["MODALITY", "OTHER_MODALITY"]
    assert gateway.operations(statuses.SUCCESS) == 2


def test_different_object_under_a_stored_uid_is_kept_beside_it(
    hot: ObjectStorage, start_gateway: StartGateway, broker_settings: BrokerSettings, tmp_path: Path
) -> None:
    gateway = start_gateway(hot)
    changed = _modified_copy(CT_SMALL, tmp_path / "changed.dcm")
    assert _sent(changed).dataset_bytes != _sent(CT_SMALL).dataset_bytes

    [original_response] = _send(gateway, CT_SMALL)
    key = _key(CT_SMALL)
    original = _read(hot, key)
    [changed_response] = _send(gateway, changed)
    assert _status(original_response) == _status(changed_response) == statuses.SUCCESS

    first, second = _drain_ingest_queue(broker_settings)
    assert first.sop_instance_uid == second.sop_instance_uid
    assert first.location.key == key
    assert second.location.sha256 != first.location.sha256
    other_key = _key(CT_SMALL, second.location.sha256)
    assert second.location.key == other_key
    assert sorted(hot.iter_keys()) == sorted([key, other_key])
    # The original is untouched; the newcomer holds exactly what was sent.
    assert _read(hot, key) == original
    assert _parse_stored(original).dataset_bytes == _sent(CT_SMALL).dataset_bytes
    newcomer = _read(hot, other_key)
    assert _parse_stored(newcomer).dataset_bytes == _sent(changed).dataset_bytes
    assert hashlib.sha256(newcomer).hexdigest() == second.location.sha256
    assert second.location.size == len(newcomer)
    assert gateway.operations(statuses.SUCCESS) == 2


# -- failures ----------------------------------------------------------------------


def test_unreachable_broker_refuses_then_recovers(
    hot: ObjectStorage,
    start_gateway: StartGateway,
    broker_settings: BrokerSettings,
    amqp_proxy: TcpProxy,
) -> None:
    via_proxy = settings_via_proxy(broker_settings, amqp_proxy).model_copy(
        update={"reconnect_interval_seconds": 0.3}
    )
    gateway = start_gateway(hot, broker=via_proxy)
    assert gateway.publisher.is_healthy()

    amqp_proxy.cut()
    [refused] = _send(gateway, CT_SMALL)
    assert _status(refused) == statuses.OUT_OF_RESOURCES
    assert refused.ErrorComment == "ingest queue unavailable"
    assert _drain_ingest_queue(broker_settings) == []

    amqp_proxy.start()
    _wait_until(gateway.publisher.is_healthy, 15, "publisher reconnected")
    [accepted] = _send(gateway, CT_SMALL)
    assert _status(accepted) == statuses.SUCCESS

    # The object written before the refusal is the one the retry reuses.
    key = _key(CT_SMALL)
    assert list(hot.iter_keys()) == [key]
    [message] = _drain_ingest_queue(broker_settings)
    assert message.location.key == key
    assert message.location.sha256 == hashlib.sha256(_read(hot, key)).hexdigest()
    assert gateway.operations(statuses.OUT_OF_RESOURCES) == 1
    assert gateway.operations(statuses.SUCCESS) == 1


def test_failing_storage_refuses_and_publishes_nothing(
    broken_hot: ObjectStorage, start_gateway: StartGateway, broker_settings: BrokerSettings
) -> None:
    gateway = start_gateway(broken_hot)
    [refused, refused_again] = _send(gateway, CT_SMALL, CT_SMALL)
    for response in (refused, refused_again):
        assert _status(response) == statuses.OUT_OF_RESOURCES
        assert response.ErrorComment == "storage unavailable"
    assert _drain_ingest_queue(broker_settings) == []
    assert gateway.operations(statuses.OUT_OF_RESOURCES) == 2
    assert gateway.operations(statuses.SUCCESS) == 0
    assert gateway.registry.get_sample_value("pacs_dimse_store_bytes_total") == 0


def test_operation_metrics_count_successes_and_refusals(
    fs_storage: FilesystemStorage,
    start_gateway: StartGateway,
    broker_settings: BrokerSettings,
    amqp_proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    """One gateway, a mix of outcomes: the counters match the statuses the
    sender received, one for one."""
    gateway = start_gateway(fs_storage, broker=settings_via_proxy(broker_settings, amqp_proxy))
    changed = _modified_copy(CT_SMALL, tmp_path / "changed.dcm")
    mr = _testdata("MR_small.dcm")
    responses = _send(gateway, CT_SMALL, mr, changed, CT_SMALL)
    amqp_proxy.cut()
    responses += _send(gateway, mr, CT_SMALL)
    received = [_status(r) for r in responses]
    assert received == [statuses.SUCCESS] * 4 + [statuses.OUT_OF_RESOURCES] * 2
    assert gateway.operations(statuses.SUCCESS) == 4
    assert gateway.operations(statuses.OUT_OF_RESOURCES) == 2
    assert len(_drain_ingest_queue(broker_settings)) == 4


# -- what the gateway logs and records about the called AE title --------------


def test_rejection_log_names_the_called_ae_title_the_sender_used(
    fs_storage: FilesystemStorage, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start_gateway(fs_storage)
    with caplog.at_level(logging.WARNING, logger="dimse_gateway.associations"):
        _rejection(_echo_association(gateway, calling="SENDER", called="WRONG_TITLE"))
    [record] = [r for r in caplog.records if r.getMessage() == "association rejected"]
    assert getattr(record, "calling_ae_title", None) == "SENDER"
    assert getattr(record, "called_ae_title", None) == "WRONG_TITLE"
