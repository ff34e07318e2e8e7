"""C-FIND, C-MOVE and C-GET against real components.

The gateway is wired the way ``dimse_gateway.main`` wires it (``build_ae``,
``FindRouter`` + ``FindHandler``, ``MoveHandler`` / ``GetHandler`` through
``start_server``'s retrieve handlers), in-process.  Behind it: the real
query-service as a subprocess (``python -m query_service``) on the test
session's PostgreSQL database, the index filled by
``InstanceIndex.index_batch`` from real Part 10 objects that sit in real
storage (a directory, or an S3 bucket on moto), and the remote-node registry
in the same database.  Peers are a pynetdicom SCU in the test and, as C-MOVE
destinations, a pynetdicom storage SCP or DCMTK's storescp.

Assertions are what a DICOM peer notices: statuses, Error Comments, counts,
the identifiers and instances received and their transfer syntax.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dimse_gateway.associations import AssociationObserver
from dimse_gateway.find import FindHandler
from dimse_gateway.get import GetHandler
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.move import MoveHandler, RegistryNodeDirectory
from dimse_gateway.sending import InstanceFiles
from dimse_gateway.server import (
    FindRouter,
    FindService,
    RetrieveHandlers,
    ReusePortAssociationServer,
    build_ae,
    start_server,
)
from pacs_common.db.blocking import BlockingPool
from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.nodes import Operation, RemoteNodeCreate, RemoteNodeRepository, tls_client_context
from pacs_common.query import QueryClient
from pacs_common.resilience import BreakerState, Dependencies, remote_ae_dependency
from pacs_common.resilience.settings import ResilienceSettings
from pacs_common.settings import DatabaseSettings, DuplicatePolicy, GatewaySettings
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.testing.broker import free_port
from pacs_common.testing.query import PacedQueryClient

GATEWAY_AE = "PACS"
SCU_AE = "VIEWER"
DEST_AE = "DEST"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
STORESCP = Path("/usr/bin/storescp")

PENDING = 0xFF00
SUCCESS = 0x0000
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH = 0xA900
ALL_FAILED = 0xA702
SOME_FAILED = 0xB000
MOVE_DESTINATION_UNKNOWN = 0xA801


def _testdata(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    assert found is not None, f"pydicom test file {name} missing"
    return Path(found)


CT = _testdata("CT_small.dcm")  # Explicit VR Little Endian
MR = _testdata("MR_small.dcm")  # Explicit VR Little Endian
JPEG_LOSSLESS = _testdata("SC_rgb_jpeg_gdcm.dcm")  # JPEG Lossless SV1, Secondary Capture


# -- the query-service, as a process -----------------------------------------------------


class QueryServices:
    """``python -m query_service`` on the session's database, one process per
    ``max_matches`` asked for; all stopped at the end of the session."""

    def __init__(self, database: DatabaseSettings, log_dir: Path) -> None:
        self._database = database
        self._log_dir = log_dir
        self._running: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def url(self, max_matches: int = 5000) -> str:
        if max_matches not in self._running:
            self._running[max_matches] = self._start(max_matches)
        return self._running[max_matches][0]

    def _start(self, max_matches: int) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        log = self._log_dir / f"query-service-{max_matches}.log"
        env = {
            **os.environ,
            "PACS_DB_URL": self._database.url,
            "PACS_QUERY_HTTP_HOST": "127.0.0.1",
            "PACS_QUERY_HTTP_PORT": str(port),
            "PACS_QUERY_MAX_MATCHES": str(max_matches),
            "PACS_TELEMETRY_LOG_LEVEL": "WARNING",
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "query_service"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"query-service exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    return url, process
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"query-service not ready in 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        for _, process in self._running.values():
            process.terminate()
        for _, process in self._running.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def query_services(
    database_settings: DatabaseSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueryServices]:
    services = QueryServices(database_settings, tmp_path_factory.mktemp("query-service"))
    try:
        yield services
    finally:
        services.stop()


@pytest.fixture(scope="session")
def blocking_db(database_settings: DatabaseSettings) -> Iterator[BlockingPool]:
    pool = BlockingPool(database_settings, application_name="gateway-tests")
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


# -- the archive: objects in storage, rows in the index -------------------------------------


@dataclass(frozen=True)
class Stored:
    path_bytes: bytes  # the Part 10 object as stored
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str

    @property
    def dataset_bytes(self) -> bytes:
        """What goes over the wire: everything after the file meta."""
        with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
            f.write(self.path_bytes)
            f.flush()
            _, offset = split_dataset(Path(f.name))
        return self.path_bytes[offset:]


class Archive:
    def __init__(self, db: BlockingPool, storage: ObjectStorage) -> None:
        self._db = db
        self.storage = storage

    def add(
        self,
        template: Path,
        *,
        patient_id: str,
        study: str,
        series: str,
        sop: str,
        patient_name: str = "DOE^JOHN",
        store_object: bool = True,
        **attributes: Any,
    ) -> Stored:
        ds = dcmread(template)
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        key = f"{study}/{series}/{sop}.dcm"
        if store_object:
            self.storage.put(key, io.BytesIO(data), size=len(data))
        location = StorageLocation(
            tier="hot",
            backend=self.storage.kind,
            key=key,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self.index(
            [IndexItem.build(parse_for_index(io.BytesIO(data), bulk_data_threshold=1024), location, T0)]
        )
        return Stored(data, sop, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))

    def index(self, items: Sequence[IndexItem]) -> None:
        self._db.run(
            lambda pool: InstanceIndex(pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
        )

    def set_availability(self, sop_instance_uid: str, availability: str) -> None:
        self._db.run(
            lambda pool: pool.execute(
                "UPDATE instance SET availability = $2 WHERE sop_instance_uid = $1",
                sop_instance_uid,
                availability,
            )
        )

    def register(
        self,
        ae_title: str,
        port: int,
        operations: Sequence[Operation] = tuple(Operation),
        *,
        tls: bool = False,
    ) -> None:
        node = RemoteNodeCreate(
            tls=tls, ae_title=ae_title, host="127.0.0.1", port=port, allowed_operations=tuple(operations)
        )
        self._db.run(lambda pool: RemoteNodeRepository(pool).add(node))


@pytest.fixture
def archive(clean_db: None, blocking_db: BlockingPool, fs_storage: ObjectStorage) -> Archive:
    return Archive(blocking_db, fs_storage)


@dataclass
class Study:
    """Two patients, three studies, four series; UIDs by name."""

    p1_study: str = "1.2.826.0.1.3680043.10.1.1"
    p1_ct_series: str = "1.2.826.0.1.3680043.10.1.1.1"
    p1_mr_series: str = "1.2.826.0.1.3680043.10.1.1.2"
    p1_second_study: str = "1.2.826.0.1.3680043.10.1.2"
    p1_second_series: str = "1.2.826.0.1.3680043.10.1.2.1"
    p2_study: str = "1.2.826.0.1.3680043.10.2.1"
    p2_series: str = "1.2.826.0.1.3680043.10.2.1.1"
    stored: dict[str, Stored] = field(default_factory=dict)


def _fill(archive: Archive) -> Study:
    s = Study()
    common: dict[str, Any] = {"patient_id": "P1", "patient_name": "DOE^JOHN"}
    s.stored["ct1"] = archive.add(
        CT, study=s.p1_study, series=s.p1_ct_series, sop=f"{s.p1_ct_series}.1",
        StudyDate="20200110", StudyDescription="HEAD", AccessionNumber="A1", InstanceNumber=1, **common,
    )  # fmt: skip
    s.stored["ct2"] = archive.add(
        CT, study=s.p1_study, series=s.p1_ct_series, sop=f"{s.p1_ct_series}.2",
        StudyDate="20200110", StudyDescription="HEAD", AccessionNumber="A1", InstanceNumber=2, **common,
    )  # fmt: skip
    s.stored["mr1"] = archive.add(
        MR, study=s.p1_study, series=s.p1_mr_series, sop=f"{s.p1_mr_series}.1",
        StudyDate="20200110", StudyDescription="HEAD", AccessionNumber="A1", **common,
    )  # fmt: skip
    s.stored["sc1"] = archive.add(
        JPEG_LOSSLESS, study=s.p1_second_study, series=s.p1_second_series, sop=f"{s.p1_second_series}.1",
        StudyDate="20210301", StudyDescription="CHEST", AccessionNumber="A2", **common,
    )  # fmt: skip
    s.stored["p2ct"] = archive.add(
        CT, study=s.p2_study, series=s.p2_series, sop=f"{s.p2_series}.1",
        patient_id="P2", patient_name="Müller^Jürgen", StudyDate="20220505", StudyDescription="Kopf",
        AccessionNumber="A3", SpecificCharacterSet="ISO_IR 100",
    )  # fmt: skip
    return s


# -- the gateway -----------------------------------------------------------------------------


@dataclass
class Gateway:
    settings: GatewaySettings
    registry: CollectorRegistry
    server: ReusePortAssociationServer

    def operations(self, operation: str, status: int) -> float:
        labels = {"operation": operation, "status": f"0x{status:04X}"}
        return self.registry.get_sample_value("pacs_dimse_operations_total", labels) or 0.0

    def suboperations(self, operation: str, outcome: str) -> float:
        labels = {"operation": operation, "outcome": outcome}
        return self.registry.get_sample_value("pacs_dimse_suboperations_total", labels) or 0.0


class StartGateway(Protocol):
    def __call__(
        self,
        storage: ObjectStorage,
        *,
        max_matches: int = 5000,
        tls_ca_file: Path | None = None,
        paced: bool = False,
        breakers: Dependencies | None = None,
    ) -> Gateway: ...


@pytest.fixture
def start_gateway(
    query_services: QueryServices, blocking_db: BlockingPool, tmp_path: Path
) -> Iterator[StartGateway]:
    saved = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    with contextlib.ExitStack() as stack:
        # What main._configure_pynetdicom sets for sending: files go out in chunks.
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        stack.callback(setattr, pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", saved)

        def start(
            storage: ObjectStorage,
            *,
            max_matches: int = 5000,
            tls_ca_file: Path | None = None,
            paced: bool = False,
            breakers: Dependencies | None = None,
        ) -> Gateway:
            settings = GatewaySettings(
                ae_title=GATEWAY_AE,
                host="127.0.0.1",
                port=free_port(),
                spool_dir=tmp_path / "spool",
                reuse_port=False,
                query_url=query_services.url(max_matches),
                retrieve_connect_timeout_seconds=5,
                dimse_timeout_seconds=30,
            )
            settings.spool_dir.mkdir(parents=True, exist_ok=True)
            client_class = PacedQueryClient if paced else QueryClient
            query = client_class(settings.query_url, timeout_seconds=settings.query_timeout_seconds)
            stack.callback(query.close)
            registry = CollectorRegistry()
            metrics = GatewayMetrics(registry)
            files = InstanceFiles(StorageRegistry({"hot": storage}), settings.spool_dir)
            find = FindHandler(query, settings.ae_title, metrics)
            find_services: dict[str, FindService] = dict.fromkeys(FindHandler.sop_classes, find)
            handlers: list[EventHandlerType] = [
                (evt.EVT_C_FIND, FindRouter(find_services)),
                *AssociationObserver(metrics).handlers(),
            ]
            retrieve = RetrieveHandlers(
                move=MoveHandler(
                    settings,
                    query,
                    RegistryNodeDirectory(blocking_db),
                    files,
                    metrics,
                    ssl_context_factory=lambda: tls_client_context(tls_ca_file),
                    breakers=breakers,
                ),
                get=GetHandler(query, files, metrics),
            )
            server = start_server(build_ae(settings), settings, handlers, retrieve)
            stack.callback(_shut_down, server)
            return Gateway(settings, registry, server)

        yield start


def _shut_down(server: ReusePortAssociationServer) -> None:
    server.shutdown()
    for assoc in server.active_associations:
        assoc.abort()


# -- the SCU -----------------------------------------------------------------------------------


def _scu() -> AE:
    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = 5
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    return ae


def _associate(gateway: Gateway, *models: str, ae: AE | None = None, **kwargs: Any) -> Association:
    ae = ae or _scu()
    for model in models:
        ae.add_requested_context(model)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gateway.settings.port, ae_title=GATEWAY_AE, **kwargs)
    assert assoc.is_established
    return assoc


def _identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class Responses:
    statuses: list[int]
    identifiers: list[Dataset]  # of the pending responses
    final: Dataset  # the final status dataset
    final_identifier: Dataset | None

    @property
    def status(self) -> int:
        return self.statuses[-1]


def _collect(responses: Iterator[tuple[Dataset, Dataset | None]]) -> Responses:
    statuses: list[int] = []
    identifiers: list[Dataset] = []
    final = Dataset()
    final_identifier = None
    for status, identifier in responses:
        assert "Status" in status, "no response (timeout or abort)"
        statuses.append(int(status.Status))
        if int(status.Status) in (PENDING, 0xFF01):
            if identifier is not None:
                identifiers.append(identifier)
        else:
            final, final_identifier = status, identifier
    return Responses(statuses, identifiers, final, final_identifier)


def _find(assoc: Association, model: str, identifier: Dataset) -> Responses:
    return _collect(assoc.send_c_find(identifier, model))


def _values(identifiers: Sequence[Dataset], keyword: str) -> list[str]:
    return sorted(str(ds.get(keyword, "")) for ds in identifiers)


# -- C-FIND ------------------------------------------------------------------------------------


def test_find_study_root_every_level(archive: Archive, start_gateway: StartGateway) -> None:
    s = _fill(archive)
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(gateway, model)
    try:
        studies = _find(
            assoc,
            model,
            _identifier("STUDY", PatientID="P1", StudyInstanceUID="", StudyDate="", StudyDescription=""),
        )
        assert studies.status == SUCCESS
        assert studies.statuses[:-1] == [PENDING, PENDING]
        assert _values(studies.identifiers, "StudyInstanceUID") == sorted([s.p1_study, s.p1_second_study])
        for ds in studies.identifiers:
            assert ds.QueryRetrieveLevel == "STUDY"
            assert ds.RetrieveAETitle == GATEWAY_AE
            assert "SpecificCharacterSet" not in ds  # all ASCII
        assert _values(studies.identifiers, "StudyDescription") == ["CHEST", "HEAD"]

        series = _find(
            assoc,
            model,
            _identifier("SERIES", StudyInstanceUID=s.p1_study, SeriesInstanceUID="", Modality=""),
        )
        assert series.status == SUCCESS
        assert _values(series.identifiers, "Modality") == ["CT", "MR"]
        assert all(ds.QueryRetrieveLevel == "SERIES" for ds in series.identifiers)

        images = _find(
            assoc,
            model,
            _identifier(
                "IMAGE", StudyInstanceUID=s.p1_study, SeriesInstanceUID=s.p1_ct_series, SOPInstanceUID=""
            ),
        )
        assert images.status == SUCCESS
        assert _values(images.identifiers, "SOPInstanceUID") == sorted(
            [s.stored["ct1"].sop_instance_uid, s.stored["ct2"].sop_instance_uid]
        )
    finally:
        assoc.release()
    assert gateway.operations("C-FIND", SUCCESS) == 3


def test_find_patient_root_every_level(archive: Archive, start_gateway: StartGateway) -> None:
    s = _fill(archive)
    gateway = start_gateway(archive.storage)
    model = PatientRootQueryRetrieveInformationModelFind
    assoc = _associate(gateway, model)
    try:
        patients = _find(assoc, model, _identifier("PATIENT", PatientID="", PatientName=""))
        assert patients.status == SUCCESS
        assert _values(patients.identifiers, "PatientID") == ["P1", "P2"]
        assert all(ds.QueryRetrieveLevel == "PATIENT" for ds in patients.identifiers)

        studies = _find(assoc, model, _identifier("STUDY", PatientID="P2", StudyInstanceUID=""))
        assert _values(studies.identifiers, "StudyInstanceUID") == [s.p2_study]

        series = _find(
            assoc,
            model,
            _identifier("SERIES", PatientID="P1", StudyInstanceUID=s.p1_study, SeriesInstanceUID=""),
        )
        assert _values(series.identifiers, "SeriesInstanceUID") == sorted([s.p1_ct_series, s.p1_mr_series])

        images = _find(
            assoc,
            model,
            _identifier(
                "IMAGE",
                PatientID="P1",
                StudyInstanceUID=s.p1_second_study,
                SeriesInstanceUID=s.p1_second_series,
                SOPInstanceUID="",
                SOPClassUID="",
            ),
        )
        assert images.status == SUCCESS
        assert [str(ds.SOPClassUID) for ds in images.identifiers] == [SecondaryCaptureImageStorage]
    finally:
        assoc.release()


def test_find_matching_wildcard_range_uid_list(archive: Archive, start_gateway: StartGateway) -> None:
    s = _fill(archive)
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(gateway, model)
    try:
        wildcard = _find(assoc, model, _identifier("STUDY", PatientName="DOE*", StudyInstanceUID=""))
        assert _values(wildcard.identifiers, "StudyInstanceUID") == sorted([s.p1_study, s.p1_second_study])

        date_range = _find(
            assoc, model, _identifier("STUDY", StudyDate="20210101-20221231", StudyInstanceUID="")
        )
        assert _values(date_range.identifiers, "StudyInstanceUID") == sorted([s.p1_second_study, s.p2_study])

        uid_list = _find(
            assoc, model, _identifier("STUDY", StudyInstanceUID=[s.p1_study, s.p2_study], AccessionNumber="")
        )
        assert _values(uid_list.identifiers, "AccessionNumber") == ["A1", "A3"]

        nothing = _find(assoc, model, _identifier("STUDY", PatientName="NOBODY*", StudyInstanceUID=""))
        assert nothing.statuses == [SUCCESS]
    finally:
        assoc.release()


def test_find_answers_in_a_character_set_the_scu_reads(archive: Archive, start_gateway: StartGateway) -> None:
    _fill(archive)
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(gateway, model)
    try:
        # The SCU speaks Latin-1 and the value fits: answered in Latin-1.
        latin1 = _identifier("STUDY", PatientID="P2", PatientName="", StudyDescription="")
        latin1.SpecificCharacterSet = "ISO_IR 100"
        answer = _find(assoc, model, latin1)
        assert answer.status == SUCCESS
        (ds,) = answer.identifiers
        assert ds.SpecificCharacterSet == "ISO_IR 100"
        assert str(ds.PatientName) == "Müller^Jürgen"

        # The SCU speaks Cyrillic, which has no ü: answered in UTF-8.
        cyrillic = _identifier("STUDY", PatientID="P2", PatientName="")
        cyrillic.SpecificCharacterSet = "ISO_IR 144"
        (ds,) = _find(assoc, model, cyrillic).identifiers
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "Müller^Jürgen"

        # A matching key with non-ASCII text, sent in Latin-1, is decoded before matching.
        by_name = _identifier("STUDY", PatientName="Müller*", StudyInstanceUID="")
        by_name.SpecificCharacterSet = "ISO_IR 100"
        assert len(_find(assoc, model, by_name).identifiers) == 1
    finally:
        assoc.release()


@pytest.mark.parametrize(
    ("model", "level", "reason"),
    [
        (StudyRootQueryRetrieveInformationModelFind, "FOO", "unknown QueryRetrieveLevel"),
        (StudyRootQueryRetrieveInformationModelFind, "PATIENT", "not in the STUDY ROOT model"),
        (PatientRootQueryRetrieveInformationModelFind, "", "QueryRetrieveLevel (0008,0052) missing"),
    ],
)
def test_find_invalid_level_fails_and_association_survives(
    model: str, level: str, reason: str, archive: Archive, start_gateway: StartGateway
) -> None:
    _fill(archive)
    gateway = start_gateway(archive.storage)
    assoc = _associate(gateway, model)
    try:
        answer = _find(assoc, model, _identifier(level, PatientID="P1"))
        assert answer.statuses == [IDENTIFIER_DOES_NOT_MATCH]
        assert reason in str(answer.final.ErrorComment)
        assert len(str(answer.final.ErrorComment)) <= 64
        # The association still works.
        assert int(assoc.send_c_echo().Status) == SUCCESS
        ok = _find(assoc, model, _identifier("STUDY", PatientID="P1", StudyInstanceUID=""))
        assert ok.status == SUCCESS and len(ok.identifiers) == 2
    finally:
        assoc.release()
    assert gateway.operations("C-FIND", IDENTIFIER_DOES_NOT_MATCH) == 1


def test_find_refused_by_the_query_service_is_a900(archive: Archive, start_gateway: StartGateway) -> None:
    """Required unique keys missing above the level: the query-service says why."""
    _fill(archive)
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(gateway, model)
    try:
        answer = _find(assoc, model, _identifier("IMAGE", StudyDate="BAD-DATE-RANGE-X", SOPInstanceUID=""))
        assert answer.statuses == [IDENTIFIER_DOES_NOT_MATCH]
        assert answer.final.get("ErrorComment")
    finally:
        assoc.release()


def _synthetic_studies(archive: Archive, count: int) -> None:
    """``count`` studies of one instance each, indexed in one batch (objects not stored)."""
    template = dcmread(CT, stop_before_pixels=True)
    items = []
    for n in range(count):
        ds = template.copy()
        ds.PatientID = "MANY"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.9.{n}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.9.{n}.1"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.9.{n}.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        location = StorageLocation(
            tier="hot", backend="filesystem", key=f"many/{n}.dcm", size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )  # fmt: skip
        items.append(
            IndexItem.build(parse_for_index(io.BytesIO(data), bulk_data_threshold=1024), location, T0)
        )
    archive.index(items)


def test_find_cancel(archive: Archive, start_gateway: StartGateway) -> None:
    total = 300
    _synthetic_studies(archive, total)
    gateway = start_gateway(archive.storage, paced=True)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(gateway, model)
    try:
        context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == model)
        responses = assoc.send_c_find(
            _identifier("STUDY", PatientID="MANY", StudyInstanceUID=""), model, msg_id=7
        )
        statuses = []
        for status, _ in responses:
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, context_id)
        assert statuses[-1] == CANCEL
        assert set(statuses[:-1]) == {PENDING}
        assert len(statuses) - 1 < total
        # The association carries on.
        ok = _find(
            assoc,
            model,
            _identifier("STUDY", PatientID="MANY", StudyInstanceUID="1.2.826.0.1.3680043.10.9.3"),
        )
        assert ok.status == SUCCESS and len(ok.identifiers) == 1
    finally:
        assoc.release()
    assert gateway.operations("C-FIND", CANCEL) == 1


def test_find_truncated_at_the_match_limit(archive: Archive, start_gateway: StartGateway) -> None:
    _synthetic_studies(archive, 5)
    gateway = start_gateway(archive.storage, max_matches=3)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(gateway, model)
    try:
        answer = _find(assoc, model, _identifier("STUDY", PatientID="MANY", StudyInstanceUID=""))
    finally:
        assoc.release()
    assert answer.statuses == [PENDING, PENDING, PENDING, OUT_OF_RESOURCES]
    assert "match limit 3 reached" in str(answer.final.ErrorComment)


# -- C-MOVE destinations -----------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    sop_instance_uid: str
    transfer_syntax: UID
    dataset_bytes: bytes
    move_originator: str | None

    def dataset(self) -> Dataset:
        from pynetdicom.dsutils import decode

        return decode(io.BytesIO(self.dataset_bytes), self.transfer_syntax.is_implicit_VR, True)


class StoreSCP:
    """A pynetdicom storage SCP that keeps what it receives."""

    def __init__(
        self, transfer_syntaxes: Sequence[str], *, delay: float = 0.0, fail: Sequence[str] = ()
    ) -> None:
        self.received: list[Received] = []
        self._delay = delay
        self._fail = set(fail)
        self._lock = threading.Lock()
        self.ae = AE(ae_title=DEST_AE)
        for sop_class in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(sop_class, list(transfer_syntaxes))
        self.port = free_port()
        server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert isinstance(server, ThreadedAssociationServer)
        self.server = server

    def _store(self, event: Event) -> int:
        time.sleep(self._delay)
        request = cast(C_STORE, event.request)
        sop = str(request.AffectedSOPInstanceUID)
        if event.dataset_path is not None:  # chunked receive (process-wide pynetdicom setting)
            _, offset = split_dataset(event.dataset_path)
            data = Path(event.dataset_path).read_bytes()[offset:]
        else:
            assert request.DataSet is not None
            data = request.DataSet.getvalue()
        originator = request.MoveOriginatorApplicationEntityTitle
        with self._lock:
            self.received.append(
                Received(
                    sop,
                    UID(event.context.transfer_syntax),
                    data,
                    str(originator).strip() if originator else None,
                )
            )
        return 0xA700 if sop in self._fail else SUCCESS

    def by_uid(self) -> dict[str, Received]:
        return {r.sop_instance_uid: r for r in self.received}

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def store_scp() -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES, **kwargs: Any) -> StoreSCP:
        scp = StoreSCP(transfer_syntaxes, **kwargs)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _move(assoc: Association, model: str, identifier: Dataset, destination: str = DEST_AE) -> Responses:
    return _collect(assoc.send_c_move(identifier, destination, model))


def _counts(ds: Dataset) -> tuple[int, int, int]:
    """(completed, failed, warning) of a response."""
    return (
        int(ds.get("NumberOfCompletedSuboperations", -1)),
        int(ds.get("NumberOfFailedSuboperations", -1)),
        int(ds.get("NumberOfWarningSuboperations", -1)),
    )


def _failed_uids(identifier: Dataset | None) -> list[str]:
    assert identifier is not None, "no final identifier"
    value = identifier.get("FailedSOPInstanceUIDList", [])
    return sorted([value] if isinstance(value, str) else [str(v) for v in value])


# -- C-MOVE ---------------------------------------------------------------------------------------


def test_move_study_arrives_byte_identical(
    archive: Archive, start_gateway: StartGateway, store_scp: Callable[..., StoreSCP]
) -> None:
    s = _fill(archive)
    destination = store_scp()
    archive.register(DEST_AE, destination.port, [Operation.STORE])
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        answer = _move(assoc, model, _identifier("STUDY", StudyInstanceUID=s.p1_study))
    finally:
        assoc.release()

    assert answer.statuses == [PENDING, PENDING, PENDING, SUCCESS]
    assert _counts(answer.final) == (3, 0, 0)
    received = destination.by_uid()
    expected = [s.stored[name] for name in ("ct1", "ct2", "mr1")]
    assert sorted(received) == sorted(i.sop_instance_uid for i in expected)
    for stored in expected:
        got = received[stored.sop_instance_uid]
        assert got.transfer_syntax == stored.transfer_syntax_uid
        assert got.dataset_bytes == stored.dataset_bytes
        assert got.move_originator == SCU_AE
    assert gateway.operations("C-MOVE", SUCCESS) == 1
    assert gateway.suboperations("C-MOVE", "completed") == 3


def test_move_transcodes_for_a_destination_taking_explicit_vr_only(
    archive: Archive, start_gateway: StartGateway, store_scp: Callable[..., StoreSCP]
) -> None:
    s = _fill(archive)
    destination = store_scp([ExplicitVRLittleEndian])
    archive.register(DEST_AE, destination.port)
    gateway = start_gateway(archive.storage)
    model = PatientRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        answer = _move(assoc, model, _identifier("PATIENT", PatientID="P1"))
    finally:
        assoc.release()

    assert answer.status == SUCCESS
    assert _counts(answer.final) == (4, 0, 0)
    received = destination.by_uid()
    jpeg = s.stored["sc1"]
    assert jpeg.transfer_syntax_uid == JPEGLosslessSV1
    got = received[jpeg.sop_instance_uid]
    assert got.transfer_syntax == ExplicitVRLittleEndian
    decoded = got.dataset()
    assert decoded.SOPInstanceUID == jpeg.sop_instance_uid
    decoded.file_meta = dcmread(io.BytesIO(jpeg.path_bytes), stop_before_pixels=True).file_meta
    decoded.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    original = dcmread(io.BytesIO(jpeg.path_bytes))
    assert np.array_equal(decoded.pixel_array, original.pixel_array)
    # What was stored in an accepted syntax still arrives unchanged.
    assert received[s.stored["ct1"].sop_instance_uid].dataset_bytes == s.stored["ct1"].dataset_bytes


def test_move_to_an_implicit_only_destination(
    archive: Archive, start_gateway: StartGateway, store_scp: Callable[..., StoreSCP]
) -> None:
    s = _fill(archive)
    destination = store_scp([ImplicitVRLittleEndian])
    archive.register(DEST_AE, destination.port)
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        answer = _move(
            assoc, model, _identifier("SERIES", StudyInstanceUID=s.p1_study, SeriesInstanceUID=s.p1_ct_series)
        )
    finally:
        assoc.release()
    assert answer.status == SUCCESS
    for got in destination.received:
        assert got.transfer_syntax == ImplicitVRLittleEndian
        original = dcmread(io.BytesIO(s.stored["ct1"].path_bytes))
        assert got.dataset().PixelData == original.PixelData


def test_move_unknown_destination(
    archive: Archive, start_gateway: StartGateway, store_scp: Callable[..., StoreSCP]
) -> None:
    s = _fill(archive)
    destination = store_scp()
    archive.register("NOSTORE", destination.port, [Operation.FIND])  # registered, may not receive
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        unknown = _move(assoc, model, _identifier("STUDY", StudyInstanceUID=s.p1_study), destination="NOBODY")
        not_allowed = _move(
            assoc, model, _identifier("STUDY", StudyInstanceUID=s.p1_study), destination="NOSTORE"
        )
        assert int(assoc.send_c_echo().Status) == SUCCESS  # the association survives
    finally:
        assoc.release()
    assert unknown.statuses == [MOVE_DESTINATION_UNKNOWN]
    assert "NOBODY unknown" in str(unknown.final.ErrorComment)
    assert not_allowed.statuses == [MOVE_DESTINATION_UNKNOWN]
    assert destination.received == []
    assert gateway.operations("C-MOVE", MOVE_DESTINATION_UNKNOWN) == 2


def test_move_counts_failed_suboperations(
    archive: Archive, start_gateway: StartGateway, store_scp: Callable[..., StoreSCP]
) -> None:
    s = _fill(archive)
    # One more instance in the CT series that is indexed but missing from storage,
    # and one that sits in a nearline tier.
    missing = archive.add(
        CT,
        patient_id="P1",
        study=s.p1_study,
        series=s.p1_ct_series,
        sop=f"{s.p1_ct_series}.3",
        store_object=False,
    )
    archive.set_availability(s.stored["ct2"].sop_instance_uid, "NEARLINE")
    destination = store_scp()
    archive.register(DEST_AE, destination.port)
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        answer = _move(assoc, model, _identifier("STUDY", StudyInstanceUID=s.p1_study))
    finally:
        assoc.release()
    assert answer.status == SOME_FAILED
    assert _counts(answer.final) == (2, 2, 0)
    assert _failed_uids(answer.final_identifier) == sorted(
        [missing.sop_instance_uid, s.stored["ct2"].sop_instance_uid]
    )
    assert sorted(destination.by_uid()) == sorted(
        [s.stored["ct1"].sop_instance_uid, s.stored["mr1"].sop_instance_uid]
    )
    # Pending responses count down.
    assert answer.statuses.count(PENDING) == 4
    assert gateway.suboperations("C-MOVE", "failed") == 2


def test_move_all_failed_is_a702(
    archive: Archive, start_gateway: StartGateway, store_scp: Callable[..., StoreSCP]
) -> None:
    s = _fill(archive)
    destination = store_scp(fail=[s.stored["sc1"].sop_instance_uid])  # the destination refuses it
    archive.register(DEST_AE, destination.port)
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        answer = _move(assoc, model, _identifier("STUDY", StudyInstanceUID=s.p1_second_study))
    finally:
        assoc.release()
    assert answer.status == ALL_FAILED
    assert _counts(answer.final) == (0, 1, 0)
    assert _failed_uids(answer.final_identifier) == [s.stored["sc1"].sop_instance_uid]
    assert "0xA700" in str(answer.final.get("ErrorComment", ""))


def test_move_destination_unreachable(archive: Archive, start_gateway: StartGateway) -> None:
    s = _fill(archive)
    archive.register(DEST_AE, free_port())  # nothing listens there
    gateway = start_gateway(archive.storage)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        answer = _move(assoc, model, _identifier("STUDY", StudyInstanceUID=s.p1_second_study))
    finally:
        assoc.release()
    assert answer.statuses == [ALL_FAILED]
    assert _counts(answer.final) == (0, 1, 0)
    assert "cannot associate with DEST" in str(answer.final.ErrorComment)


def test_move_to_a_destination_that_keeps_failing_opens_its_circuit(
    archive: Archive, start_gateway: StartGateway
) -> None:
    """After the configured number of failed associations the destination is
    not dialled again until the breaker's reset time: each C-MOVE fails at
    once (A702) instead of holding a gateway thread for the connect timeout."""
    s = _fill(archive)
    port = free_port()
    archive.register(DEST_AE, port)  # nothing listens there
    breakers = Dependencies(ResilienceSettings(breaker_failure_threshold=2, breaker_reset_seconds=300))
    gateway = start_gateway(archive.storage, breakers=breakers)
    breaker = breakers.breaker(remote_ae_dependency(DEST_AE, "127.0.0.1", port))
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    identifier = _identifier("STUDY", StudyInstanceUID=s.p1_second_study)
    try:
        for _ in range(2):
            assert _move(assoc, model, identifier).statuses == [ALL_FAILED]
        assert breaker.state is BreakerState.OPEN
        # Something listens now, but the open circuit keeps the gateway from dialling.
        with socket.create_server(("127.0.0.1", port)) as listener:
            listener.settimeout(0.5)
            answer = _move(assoc, model, identifier)
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        assoc.release()
    assert answer.statuses == [ALL_FAILED]
    assert "cannot associate with DEST" in str(answer.final.ErrorComment)


def test_move_cancel(
    archive: Archive, start_gateway: StartGateway, store_scp: Callable[..., StoreSCP]
) -> None:
    s = _fill(archive)
    destination = store_scp(delay=0.3)
    archive.register(DEST_AE, destination.port)
    gateway = start_gateway(archive.storage)
    model = PatientRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == model)
        responses = assoc.send_c_move(_identifier("PATIENT", PatientID="P1"), DEST_AE, model, msg_id=9)
        answer_statuses: list[int] = []
        final = Dataset()
        final_identifier = None
        for status, identifier in responses:
            answer_statuses.append(int(status.Status))
            if len(answer_statuses) == 1:
                assoc.send_c_cancel(9, context_id)
            final, final_identifier = status, identifier
    finally:
        assoc.release()
    assert answer_statuses[-1] == CANCEL
    completed, failed, warning = _counts(final)
    remaining = int(final.NumberOfRemainingSuboperations)
    assert completed >= 1 and remaining >= 1
    assert completed + failed + warning + remaining == 4
    assert len(destination.received) == completed
    assert final_identifier is not None
    assert s.p1_study  # the patient's studies were the ones moved
    assert gateway.operations("C-MOVE", CANCEL) == 1


def test_move_from_s3(
    clean_db: None,
    blocking_db: BlockingPool,
    s3_storage: ObjectStorage,
    start_gateway: StartGateway,
    store_scp: Callable[..., StoreSCP],
) -> None:
    """Objects in a bucket are streamed to a spool file, one at a time, and sent."""
    archive = Archive(blocking_db, s3_storage)
    s = _fill(archive)
    destination = store_scp()
    archive.register(DEST_AE, destination.port)
    gateway = start_gateway(s3_storage)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(gateway, model)
    try:
        answer = _move(assoc, model, _identifier("STUDY", StudyInstanceUID=[s.p1_study, s.p1_second_study]))
    finally:
        assoc.release()
    assert answer.status == SUCCESS
    assert _counts(answer.final) == (4, 0, 0)
    for name in ("ct1", "ct2", "mr1", "sc1"):
        stored = s.stored[name]
        assert destination.by_uid()[stored.sop_instance_uid].dataset_bytes == stored.dataset_bytes
    assert list((gateway.settings.spool_dir).iterdir()) == []  # spool files removed


@pytest.mark.skipif(not STORESCP.exists(), reason="DCMTK storescp not installed")
def test_move_to_dcmtk_storescp(archive: Archive, start_gateway: StartGateway, tmp_path: Path) -> None:
    """DCMTK's storescp accepts uncompressed syntaxes only (its default): the
    JPEG Lossless instance arrives decompressed, the others as stored."""
    s = _fill(archive)
    out = tmp_path / "storescp"
    with _storescp(out) as port:
        archive.register(DEST_AE, port)
        gateway = start_gateway(archive.storage)
        model = PatientRootQueryRetrieveInformationModelMove
        assoc = _associate(gateway, model)
        try:
            answer = _move(assoc, model, _identifier("PATIENT", PatientID="P1"))
        finally:
            assoc.release()
    assert answer.status == SUCCESS
    assert _counts(answer.final) == (4, 0, 0)
    files = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in out.iterdir()}
    assert sorted(files) == sorted(i.sop_instance_uid for n, i in s.stored.items() if n != "p2ct")
    jpeg = files[s.stored["sc1"].sop_instance_uid]
    assert not jpeg.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(jpeg.pixel_array, dcmread(io.BytesIO(s.stored["sc1"].path_bytes)).pixel_array)
    ct = files[s.stored["ct1"].sop_instance_uid]
    assert ct.PixelData == dcmread(io.BytesIO(s.stored["ct1"].path_bytes)).PixelData


@contextlib.contextmanager
def _storescp(out: Path, *args: str) -> Iterator[int]:
    """DCMTK storescp writing to ``out``; yields its port."""
    out.mkdir(exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [str(STORESCP), "-aet", DEST_AE, "-od", str(out), "-uf", *args, str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(
    not STORESCP.exists() or shutil.which("openssl") is None, reason="needs DCMTK and openssl"
)
def test_move_over_tls_to_a_node_marked_tls(
    archive: Archive, start_gateway: StartGateway, tmp_path: Path
) -> None:
    s = _fill(archive)
    key, cert = _self_signed_certificate(tmp_path)
    # storescp's TLS: its key and certificate, no client certificate asked for.
    with _storescp(tmp_path / "tls-out", "+tls", str(key), str(cert), "-ic") as port:
        archive.register(DEST_AE, port, tls=True)
        # Without trusting the certificate the association is refused: nothing sent.
        untrusting = start_gateway(archive.storage)
        assoc = _associate(untrusting, StudyRootQueryRetrieveInformationModelMove)
        try:
            refused = _move(
                assoc,
                StudyRootQueryRetrieveInformationModelMove,
                _identifier("STUDY", StudyInstanceUID=s.p1_study),
            )
        finally:
            assoc.release()
        gateway = start_gateway(archive.storage, tls_ca_file=cert)
        assoc = _associate(gateway, StudyRootQueryRetrieveInformationModelMove)
        try:
            answer = _move(
                assoc,
                StudyRootQueryRetrieveInformationModelMove,
                _identifier("STUDY", StudyInstanceUID=s.p1_study),
            )
        finally:
            assoc.release()
    assert refused.status == ALL_FAILED
    assert answer.status == SUCCESS
    assert _counts(answer.final) == (3, 0, 0)
    assert len(list((tmp_path / "tls-out").iterdir())) == 3


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.05)


# -- C-GET -----------------------------------------------------------------------------------------


class GetSCU:
    """A C-GET requestor that receives on its own association (SCP role)."""

    def __init__(self, storage: dict[str, Sequence[str]], *, delay: float = 0.0) -> None:
        self.received: list[Received] = []
        self._delay = delay
        self.ae = _scu()
        self.roles = []
        for sop_class, syntaxes in storage.items():
            self.ae.add_requested_context(sop_class, list(syntaxes))
            self.roles.append(build_role(sop_class, scp_role=True))

    def _store(self, event: Event) -> int:
        time.sleep(self._delay)
        request = cast(C_STORE, event.request)
        if event.dataset_path is not None:
            _, offset = split_dataset(event.dataset_path)
            data = Path(event.dataset_path).read_bytes()[offset:]
        else:
            assert request.DataSet is not None
            data = request.DataSet.getvalue()
        self.received.append(
            Received(str(request.AffectedSOPInstanceUID), UID(event.context.transfer_syntax), data, None)
        )
        return SUCCESS

    def get(self, gateway: Gateway, model: str, identifier: Dataset, *, cancel_after: int = 0) -> Responses:
        """The C-GET's responses; with ``cancel_after``, C-CANCEL after that many."""
        assoc = _associate(
            gateway, model, ae=self.ae, ext_neg=self.roles, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        try:
            responses = assoc.send_c_get(identifier, model, msg_id=5)
            if not cancel_after:
                return _collect(responses)
            context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == model)

            def cancelling() -> Iterator[tuple[Dataset, Dataset | None]]:
                for n, response in enumerate(responses, start=1):
                    if n == cancel_after:
                        assoc.send_c_cancel(5, context_id)
                    yield response

            return _collect(cancelling())
        finally:
            assoc.release()


def test_get_with_role_selection(archive: Archive, start_gateway: StartGateway) -> None:
    s = _fill(archive)
    gateway = start_gateway(archive.storage)
    scu = GetSCU(
        {
            CTImageStorage: [ExplicitVRLittleEndian],
            MRImageStorage: [ExplicitVRLittleEndian],
            SecondaryCaptureImageStorage: [JPEGLosslessSV1],
        }
    )
    model = PatientRootQueryRetrieveInformationModelGet
    answer = scu.get(gateway, model, _identifier("PATIENT", PatientID="P1"))
    assert answer.statuses == [PENDING] * 4 + [SUCCESS]
    assert _counts(answer.final) == (4, 0, 0)
    received = {r.sop_instance_uid: r for r in scu.received}
    for name in ("ct1", "ct2", "mr1", "sc1"):
        stored = s.stored[name]
        assert received[stored.sop_instance_uid].transfer_syntax == stored.transfer_syntax_uid
        assert received[stored.sop_instance_uid].dataset_bytes == stored.dataset_bytes
    assert gateway.operations("C-GET", SUCCESS) == 1
    assert gateway.suboperations("C-GET", "completed") == 4


def test_get_transcodes_to_a_syntax_accepted_on_the_association(
    archive: Archive, start_gateway: StartGateway
) -> None:
    s = _fill(archive)
    gateway = start_gateway(archive.storage)
    scu = GetSCU({SecondaryCaptureImageStorage: [ImplicitVRLittleEndian]})
    answer = scu.get(
        gateway,
        StudyRootQueryRetrieveInformationModelGet,
        _identifier("STUDY", StudyInstanceUID=s.p1_second_study),
    )
    assert answer.status == SUCCESS
    (got,) = scu.received
    assert got.transfer_syntax == ImplicitVRLittleEndian
    decoded = got.dataset()
    decoded.file_meta = dcmread(io.BytesIO(s.stored["sc1"].path_bytes), stop_before_pixels=True).file_meta
    decoded.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert np.array_equal(decoded.pixel_array, dcmread(io.BytesIO(s.stored["sc1"].path_bytes)).pixel_array)


def test_get_without_a_storage_context_fails_those_instances(
    archive: Archive, start_gateway: StartGateway
) -> None:
    s = _fill(archive)
    gateway = start_gateway(archive.storage)
    scu = GetSCU({CTImageStorage: [ExplicitVRLittleEndian]})  # no MR context
    answer = scu.get(
        gateway, StudyRootQueryRetrieveInformationModelGet, _identifier("STUDY", StudyInstanceUID=s.p1_study)
    )
    assert answer.status == SOME_FAILED
    assert _counts(answer.final) == (2, 1, 0)
    assert _failed_uids(answer.final_identifier) == [s.stored["mr1"].sop_instance_uid]
    assert len(scu.received) == 2


def test_get_nothing_matches_is_success(archive: Archive, start_gateway: StartGateway) -> None:
    _fill(archive)
    gateway = start_gateway(archive.storage)
    scu = GetSCU({CTImageStorage: [ExplicitVRLittleEndian]})
    answer = scu.get(
        gateway,
        StudyRootQueryRetrieveInformationModelGet,
        _identifier("STUDY", StudyInstanceUID="1.2.3.4.5.6"),
    )
    assert answer.statuses == [SUCCESS]
    assert _counts(answer.final) == (0, 0, 0)
    assert scu.received == []


def test_get_missing_unique_key_is_a900(archive: Archive, start_gateway: StartGateway) -> None:
    _fill(archive)
    gateway = start_gateway(archive.storage)
    scu = GetSCU({CTImageStorage: [ExplicitVRLittleEndian]})
    answer = scu.get(gateway, StudyRootQueryRetrieveInformationModelGet, _identifier("SERIES", Modality="CT"))
    assert answer.statuses == [IDENTIFIER_DOES_NOT_MATCH]
    assert "SeriesInstanceUID" in str(answer.final.ErrorComment)


def test_get_cancel(archive: Archive, start_gateway: StartGateway) -> None:
    _fill(archive)
    gateway = start_gateway(archive.storage)
    scu = GetSCU(
        {
            CTImageStorage: [ExplicitVRLittleEndian],
            MRImageStorage: [ExplicitVRLittleEndian],
            SecondaryCaptureImageStorage: [JPEGLosslessSV1],
        },
        delay=0.3,
    )
    answer = scu.get(
        gateway,
        PatientRootQueryRetrieveInformationModelGet,
        _identifier("PATIENT", PatientID="P1"),
        cancel_after=1,
    )
    assert answer.status == CANCEL
    completed, failed, warning = _counts(answer.final)
    remaining = int(answer.final.NumberOfRemainingSuboperations)
    assert completed >= 1 and remaining >= 1
    assert completed + failed + warning + remaining == 4
    assert len(scu.received) == completed
