"""The gateway's audit trail, in-process against real PostgreSQL: a C-STORE
association leaves one "Instances Transferred" event listing its studies, a
C-FIND a Query, a refused association a Security Alert — all with the calling
AE title as actor and the peer's address, written by the background writer
(the DIMSE responses never wait for it)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dimse_gateway.associations import AssociationObserver
from dimse_gateway.audit import DimseAudit
from dimse_gateway.find import FindHandler
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.server import FindRouter, ReusePortAssociationServer, build_ae, start_server
from dimse_gateway.store import StoreHandler
from pacs_common.audit import AuditSettings, BackgroundAuditWriter
from pacs_common.db.blocking import BlockingPool
from pacs_common.messaging.models import IngestMessage
from pacs_common.query import QueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import DatabaseSettings, GatewaySettings
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.testing.storage_servers import free_port
from query_service.testing import Service

GATEWAY_AE = "PACS"
MODALITY_AE = "CT_ROOM_1"
STUDY_A = "1.2.826.0.1.3680043.8.498.5501"
STUDY_B = "1.2.826.0.1.3680043.8.498.5502"


@dataclass
class AuditedGateway:
    port: int
    writer: BackgroundAuditWriter
    registry: CollectorRegistry


@pytest.fixture
def gateway(
    tmp_path: Path, database_settings: DatabaseSettings, query_service: Service, clean_db: None
) -> Iterator[AuditedGateway]:
    """A gateway wired like ``main.main``: C-STORE, C-FIND, the audit writer."""
    saved = (pynetdicom_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir)
    spool = tmp_path / "spool"
    spool.mkdir()
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool)
    database = BlockingPool(database_settings, application_name="test-audit-dimse")
    database.start()
    with contextlib.ExitStack() as stack:
        stack.callback(database.stop)
        registry = CollectorRegistry()
        metrics = GatewayMetrics(registry)
        writer = BackgroundAuditWriter(
            database, AuditSettings(), on_drop=lambda reason: metrics.audit_dropped.labels(reason).inc()
        )
        writer.start()
        stack.callback(writer.stop)
        audit = DimseAudit(writer, GATEWAY_AE)
        messages: list[IngestMessage] = []
        receiver = InstanceReceiver(FilesystemStorage(tmp_path / "hot"), "hot", messages.append)
        query = QueryClient(query_service.base_url, timeout_seconds=10)
        stack.callback(query.close)
        find = FindHandler(query, GATEWAY_AE, metrics, audit)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, StoreHandler(receiver, metrics, audit)),
            (evt.EVT_C_FIND, FindRouter(dict.fromkeys(FindHandler.sop_classes, find))),
            *AssociationObserver(metrics).handlers(),
            *audit.handlers(),
        ]
        settings = GatewaySettings(
            ae_title=GATEWAY_AE,
            host="127.0.0.1",
            port=free_port(),
            spool_dir=spool,
            reuse_port=False,
            allowed_calling_ae_titles=[MODALITY_AE],
        )
        server: ReusePortAssociationServer = start_server(build_ae(settings), settings, handlers)
        stack.callback(server.shutdown)
        try:
            yield AuditedGateway(settings.port, writer, registry)
        finally:
            pynetdicom_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = saved


def _instance(study: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = f"{study}.1"
    ds.PatientID = "DIMSE-1"
    ds.PatientName = "Audit^Dimse"
    ds.Modality = "CT"
    return ds


def _store(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _find(port: int, patient_id: str) -> list[int]:
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = patient_id
    identifier.StudyInstanceUID = ""
    try:
        return [
            int(s.Status)
            for s, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        ]
    finally:
        assoc.release()


def _refused(port: int) -> bool:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE)
    return bool(assoc.is_rejected)


async def _rows(db_pool: asyncpg.Pool, event_id: str) -> list[asyncpg.Record]:
    return await db_pool.fetch("SELECT * FROM audit_event WHERE event_id = $1 ORDER BY pk", event_id)


async def test_a_c_store_association_is_one_event_listing_its_studies(
    gateway: AuditedGateway, db_pool: asyncpg.Pool
) -> None:
    instances = [_instance(STUDY_A), _instance(STUDY_A), _instance(STUDY_B)]
    assert await asyncio.to_thread(_store, gateway.port, instances) == [0, 0, 0]
    assert await asyncio.to_thread(gateway.writer.flush) is True
    # The event is queued at release, the writer may still be picking it up.
    for _ in range(100):
        rows = await _rows(db_pool, "110104")
        if rows:
            break
        await asyncio.sleep(0.05)
    [row] = rows
    assert (row["actor"], row["actor_method"], row["source_address"]) == (MODALITY_AE, "dimse", "127.0.0.1")
    assert row["action"] == "C" and row["outcome"] == 0
    assert list(row["study_uids"]) == [STUDY_A, STUDY_B]
    assert row["details"]["stored"] == 3 and row["details"]["operation"] == "C-STORE"


async def test_a_c_find_is_a_query_with_the_calling_ae_title(
    gateway: AuditedGateway, db_pool: asyncpg.Pool
) -> None:
    statuses = await asyncio.to_thread(_find, gateway.port, "DIMSE-1")
    assert statuses[-1] == 0
    rows: list[asyncpg.Record] = []
    for _ in range(100):
        await asyncio.to_thread(gateway.writer.flush)
        rows = await _rows(db_pool, "110112")
        if rows:
            break
        await asyncio.sleep(0.05)
    [row] = rows
    assert (row["actor"], row["actor_method"], row["source_address"]) == (MODALITY_AE, "dimse", "127.0.0.1")
    assert row["action"] == "E" and row["outcome"] == 0 and row["patient_id"] == "DIMSE-1"
    [query] = [o for o in row["objects"] if o["type"] == "query"]
    assert query["id"] == StudyRootQueryRetrieveInformationModelFind
    # An association that ends without storing anything leaves no C-STORE event.
    assert await _rows(db_pool, "110104") == []


async def test_a_refused_association_is_a_security_alert(
    gateway: AuditedGateway, db_pool: asyncpg.Pool
) -> None:
    assert await asyncio.to_thread(_refused, gateway.port)
    rows: list[asyncpg.Record] = []
    for _ in range(100):
        await asyncio.to_thread(gateway.writer.flush)
        rows = await _rows(db_pool, "110113")
        if rows:
            break
        await asyncio.sleep(0.05)
    [row] = rows
    assert row["actor"] == "INTRUDER" and row["outcome"] == 4
    assert gateway.registry.get_sample_value("pacs_dimse_audit_dropped_total", {"reason": "database"}) is None
