"""C-MOVE, C-GET and C-FIND over archive tiers, against the real gateway
handlers, the query-service, PostgreSQL, an S3 GLACIER bucket on the moto
server / Archive blobs on Azurite, and DCMTK's storescp as the C-MOVE
destination.

What a DICOM peer notices: a study with one archived instance is sent
except for that one (final status 0xB000, the instance in the Failed SOP
Instance UID List), a retrieve of only the archived instance fails with
0xA702 at once (no hang), C-FIND shows it NEARLINE while its restore is
pending and ONLINE after the restore processor ran, and then it is sent.
What was sent is recorded as accessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dimse_gateway.find import FindHandler
from dimse_gateway.get import GetHandler
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.move import MoveHandler, RegistryNodeDirectory
from dimse_gateway.sending import InstanceFiles
from dimse_gateway.server import FindRouter, FindService, RetrieveHandlers, build_ae, start_server
from pacs_common.archive.access import ThreadedAccessRecorder
from pacs_common.archive.metrics import RestoreMetrics
from pacs_common.archive.requests import BlockingRestoreRequester
from pacs_common.archive.restore import RestoreProcessor
from pacs_common.archive.settings import AccessSettings, RestoreSettings
from pacs_common.db.blocking import BlockingPool
from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.nodes import Operation, RemoteNodeCreate, RemoteNodeRepository
from pacs_common.query import QueryClient
from pacs_common.settings import DatabaseSettings, DuplicatePolicy, GatewaySettings
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import AzuriteServer, MotoServer, free_port, unique_name
from query_service.testing import Service

GATEWAY_AE = "PACS"
SCU_AE = "VIEWER"
DEST_AE = "DEST"
STORESCP = Path("/usr/bin/storescp")
SUCCESS, PENDING = 0x0000, 0xFF00
SOME_FAILED, ALL_FAILED = 0xB000, 0xA702
CT = Path(str(get_testdata_file("CT_small.dcm", download=False)))


# -- storage and index ------------------------------------------------------------------------


@pytest.fixture(params=["s3-glacier", "azure-archive"])
def cold(request: pytest.FixtureRequest) -> Iterator[ObjectStorage]:
    """An archive tier: objects written there are archived."""
    storage: ObjectStorage
    if request.param == "s3-glacier":
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket = unique_name()
        moto.create_bucket(bucket)
        storage = S3Storage(bucket, client=moto.client(), storage_class="GLACIER")
    else:
        azurite: AzuriteServer = request.getfixturevalue("azurite")
        storage = AzureBlobStorage.from_connection_string(
            azurite.connection_string, unique_name(), access_tier="Archive"
        )
    yield storage
    storage.close()


@pytest.fixture
def tiers(fs_storage: FilesystemStorage, cold: ObjectStorage) -> StorageRegistry:
    return StorageRegistry({"hot": fs_storage, "cold": cold})


async def _store(pool: asyncpg.Pool, storage: ObjectStorage, tier: str, study: str, series: str) -> str:
    ds = dcmread(CT)
    ds.PatientID = "ARCHIVE1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    key = f"{study}/{series}/{ds.SOPInstanceUID}.dcm"
    await asyncio.to_thread(storage.put, key, io.BytesIO(data))
    location = StorageLocation(
        tier=tier, backend=storage.kind, key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    item = IndexItem.build(
        parse_for_index(io.BytesIO(data), bulk_data_threshold=1024), location, datetime.now(UTC)
    )
    await InstanceIndex(pool).index_batch([item], duplicate_policy=DuplicatePolicy.KEEP_FIRST)
    return str(ds.SOPInstanceUID)


# -- the gateway --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gateway_db(database_settings: DatabaseSettings) -> Iterator[BlockingPool]:
    pool = BlockingPool(database_settings, application_name="gateway-archive-tests")
    pool.start()
    yield pool
    pool.stop()


@dataclass
class Gateway:
    port: int
    registry: CollectorRegistry
    access: ThreadedAccessRecorder


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(
    db_pool: asyncpg.Pool,
    gateway_db: BlockingPool,
    query_service: Service,
    tiers: StorageRegistry,
    tmp_path: Path,
) -> AsyncIterator[Gateway]:
    """Wired as ``dimse_gateway.main`` wires it (C-FIND, C-MOVE, C-GET)."""
    saved = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    settings = GatewaySettings(
        ae_title=GATEWAY_AE,
        host="127.0.0.1",
        port=free_port(),
        spool_dir=tmp_path / "spool",
        reuse_port=False,
        query_url=query_service.base_url,
        retrieve_connect_timeout_seconds=5,
        dimse_timeout_seconds=30,
    )
    settings.spool_dir.mkdir(parents=True)
    query = QueryClient(settings.query_url, timeout_seconds=10)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    files = InstanceFiles(tiers, settings.spool_dir)
    access = ThreadedAccessRecorder(gateway_db, AccessSettings(flush_interval_seconds=0.05))
    access.start()
    restores = BlockingRestoreRequester(
        gateway_db, requested_by="dimse-gateway", metrics=RestoreMetrics(registry)
    )
    find = FindHandler(query, settings.ae_title, metrics)
    find_services: dict[str, FindService] = dict.fromkeys(FindHandler.sop_classes, find)
    handlers: list[EventHandlerType] = [(evt.EVT_C_FIND, FindRouter(find_services))]
    retrieve = RetrieveHandlers(
        move=MoveHandler(
            settings,
            query,
            RegistryNodeDirectory(gateway_db),
            files,
            metrics,
            restores=restores,
            access=access,
        ),
        get=GetHandler(query, files, metrics, restores=restores, access=access),
    )
    server = start_server(build_ae(settings), settings, handlers, retrieve)
    try:
        yield Gateway(settings.port, registry, access)
    finally:
        server.shutdown()
        await asyncio.to_thread(access.stop)
        query.close()
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = saved


@contextlib.contextmanager
def _storescp(out: Path) -> Iterator[int]:
    """DCMTK storescp as the C-MOVE destination, writing to ``out``."""
    out.mkdir(exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [str(STORESCP), "-aet", DEST_AE, "-od", str(out), "-uf", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- the peer ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    completed: int
    failed: int
    failed_uids: list[str]
    matches: list[Dataset]


def _scu(*models: str, **kwargs: Any) -> tuple[AE, Association]:
    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for model in models:
        ae.add_requested_context(model)
    return ae, ae.associate("127.0.0.1", kwargs.pop("port"), ae_title=GATEWAY_AE, **kwargs)


def _answer(responses: Any) -> Answer:
    matches: list[Dataset] = []
    status, final, identifier = -1, Dataset(), None
    for response, data in responses:
        assert "Status" in response, "no response (timeout or abort)"
        status = int(response.Status)
        if status in (PENDING, 0xFF01):
            if data is not None:
                matches.append(data)
        else:
            final, identifier = response, data
    failed = identifier.get("FailedSOPInstanceUIDList", []) if identifier is not None else []
    return Answer(
        status,
        int(final.get("NumberOfCompletedSuboperations", 0)),
        int(final.get("NumberOfFailedSuboperations", 0)),
        sorted([failed] if isinstance(failed, str) else [str(u) for u in failed]),
        matches,
    )


def _identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _move(port: int, identifier: Dataset) -> Answer:
    model = StudyRootQueryRetrieveInformationModelMove
    _, assoc = _scu(model, port=port)
    try:
        return _answer(assoc.send_c_move(identifier, DEST_AE, model))
    finally:
        assoc.release()


def _get(port: int, identifier: Dataset) -> tuple[Answer, list[str]]:
    model = StudyRootQueryRetrieveInformationModelGet
    received: list[str] = []

    def store(event: Event) -> int:
        received.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        return SUCCESS

    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=GATEWAY_AE,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    try:
        return _answer(assoc.send_c_get(identifier, model)), received
    finally:
        assoc.release()


def _availability(port: int, study: str, series: str) -> tuple[str, dict[str, str]]:
    """InstanceAvailability of the study and of each of its instances (C-FIND)."""
    model = StudyRootQueryRetrieveInformationModelFind
    _, assoc = _scu(model, port=port)
    try:
        studies = _answer(
            assoc.send_c_find(_identifier("STUDY", StudyInstanceUID=study, InstanceAvailability=""), model)
        )
        images = _answer(
            assoc.send_c_find(
                _identifier(
                    "IMAGE",
                    StudyInstanceUID=study,
                    SeriesInstanceUID=series,
                    SOPInstanceUID="",
                    InstanceAvailability="",
                ),
                model,
            )
        )
    finally:
        assoc.release()
    [match] = studies.matches
    return str(match.InstanceAvailability), {
        str(m.SOPInstanceUID): str(m.InstanceAvailability) for m in images.matches
    }


async def _restore_jobs(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT state, params->>'sop_instance_uid' AS uid FROM job WHERE kind = 'restore'"
    )
    return sorted((row["uid"], row["state"]) for row in rows)


async def _register_destination(pool: asyncpg.Pool, port: int) -> None:
    node = RemoteNodeCreate(
        ae_title=DEST_AE, host="127.0.0.1", port=port, allowed_operations=tuple(Operation)
    )
    await RemoteNodeRepository(pool).add(node)


# -- the tests --------------------------------------------------------------------------------


async def test_archived_instance_fails_its_suboperation_until_restored(
    gateway: Gateway, db_pool: asyncpg.Pool, tiers: StorageRegistry, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    online = [await _store(db_pool, tiers.hot, "hot", study, series) for _ in range(2)]
    archived = await _store(db_pool, tiers.get("cold"), "cold", study, series)
    assert await asyncio.to_thread(_availability, gateway.port, study, series) == (
        "ONLINE", {uid: "ONLINE" for uid in [*online, archived]},
    )  # fmt: skip
    out = tmp_path / "dest"
    with _storescp(out) as port:
        await _register_destination(db_pool, port)
        moved = await asyncio.to_thread(_move, gateway.port, _identifier("STUDY", StudyInstanceUID=study))
        alone = await asyncio.to_thread(_move, gateway.port, _identifier("IMAGE", StudyInstanceUID=study,
                                      SeriesInstanceUID=series, SOPInstanceUID=archived))  # fmt: skip

    # The others were delivered; the archived one failed and its restore was requested.
    assert (moved.status, moved.completed, moved.failed, moved.failed_uids) == (SOME_FAILED, 2, 1, [archived])
    assert sorted(str(dcmread(p).SOPInstanceUID) for p in out.iterdir()) == sorted(online)
    assert (alone.status, alone.completed, alone.failed, alone.failed_uids) == (ALL_FAILED, 0, 1, [archived])
    assert await _restore_jobs(db_pool) == [(archived, "queued")]
    assert gateway.registry.get_sample_value("pacs_restore_requests_total", {"tier": "cold"}) == 1
    assert await asyncio.to_thread(_availability, gateway.port, study, series) == (
        "NEARLINE", {**dict.fromkeys(online, "ONLINE"), archived: "NEARLINE"},
    )  # fmt: skip

    got, received = await asyncio.to_thread(_get, gateway.port, _identifier("STUDY", StudyInstanceUID=study))
    assert (got.status, got.completed, got.failed, got.failed_uids) == (SOME_FAILED, 2, 1, [archived])
    assert sorted(received) == sorted(online)
    assert await _restore_jobs(db_pool) == [(archived, "queued")]  # the same restore

    assert await RestoreProcessor(db_pool, tiers, RestoreSettings(check_interval_seconds=0)).run_once() == 1
    assert await _restore_jobs(db_pool) == [(archived, "done")]
    assert await asyncio.to_thread(_availability, gateway.port, study, series) == (
        "ONLINE", dict.fromkeys([*online, archived], "ONLINE"),
    )  # fmt: skip
    got, received = await asyncio.to_thread(_get, gateway.port, _identifier("STUDY", StudyInstanceUID=study))
    assert (got.status, got.completed, got.failed) == (SUCCESS, 3, 0)
    assert sorted(received) == sorted([*online, archived])


async def _last_accessed(pool: asyncpg.Pool, study: str) -> tuple[Any, dict[str, Any]]:
    at = await pool.fetchval("SELECT last_accessed_at FROM study WHERE study_instance_uid = $1", study)
    rows = await pool.fetch(
        """
        SELECT i.sop_instance_uid, i.last_accessed_at FROM instance i
        JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
        WHERE st.study_instance_uid = $1
        """,
        study,
    )
    return at, {row["sop_instance_uid"]: row["last_accessed_at"] for row in rows}


@pytest.mark.parametrize("cold", ["s3-glacier"], indirect=True)
async def test_move_and_get_record_last_access(
    gateway: Gateway, db_pool: asyncpg.Pool, tiers: StorageRegistry, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    moved = await _store(db_pool, tiers.hot, "hot", study, series)
    other_study = generate_uid()
    fetched = await _store(db_pool, tiers.hot, "hot", other_study, generate_uid())
    untouched = await _store(db_pool, tiers.hot, "hot", study, generate_uid())
    with _storescp(tmp_path / "dest") as port:
        await _register_destination(db_pool, port)
        answer = await asyncio.to_thread(
            _move,
            gateway.port,
            _identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=moved),
        )
    assert answer.status == SUCCESS
    got, _ = await asyncio.to_thread(_get, gateway.port, _identifier("STUDY", StudyInstanceUID=other_study))
    assert got.status == SUCCESS
    await asyncio.to_thread(gateway.access.flush)

    study_at, instances = await _last_accessed(db_pool, study)
    assert study_at is not None and instances[moved] is not None and instances[untouched] is None
    other_at, others = await _last_accessed(db_pool, other_study)
    assert other_at is not None and others[fetched] is not None
