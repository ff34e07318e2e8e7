"""Import of DICOM media through the normal ingest path: the receiver writes
to storage and publishes to the real broker, a real ingest worker (in-process)
indexes; broken records, non-DICOM and damaged files are reported."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import subprocess
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydicom.fileset import FileSet

from ingest_worker.main import WorkerServices, run
from pacs_common.dicom.signature_settings import Signer
from pacs_common.media.importing import ImportReport, ImportStatus, MediaImporter
from pacs_common.media.testing import DCMMKDIR, image, part10
from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.messaging.models import IngestMessage, IngestSource
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import BrokerSettings, DatabaseSettings, DuplicatePolicy, WorkerSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage

STUDY = "1.2.826.0.1.3680043.8.498.81"
SOURCE = IngestSource(protocol="import", peer="test")


def _sop(series: int, number: int) -> str:
    return f"{STUDY}.{series}.{number}"


def _image_bytes(series: int, number: int) -> bytes:
    return part10(image(STUDY, f"{STUDY}.{series}", _sop(series, number), number=number, StudyID="1"))


@contextlib.asynccontextmanager
async def _ingest_worker(
    broker_settings: BrokerSettings, database_settings: DatabaseSettings, hot: FilesystemStorage
) -> AsyncIterator[None]:
    settings = WorkerSettings(
        http_host="127.0.0.1",
        http_port=0,
        batch_size=20,
        batch_wait_ms=50,
        prefetch=40,
        study_stable_seconds=0.5,
        stable_check_interval_seconds=0.2,
        duplicate_policy=DuplicatePolicy.KEEP_FIRST,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        run(
            settings,
            database_settings,
            broker_settings,
            storage=StorageRegistry({"hot": hot}),
            stop=stop,
            services=WorkerServices(),
        )
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def publisher(broker_settings: BrokerSettings) -> Iterator[BlockingPublisher]:
    started = BlockingPublisher(broker_settings)
    started.start()
    try:
        yield started
    finally:
        started.stop()


async def _indexed(pool: asyncpg.Pool, expected: set[str]) -> set[str]:
    """The SOP Instance UIDs of the study in the index once ``expected`` are there (20 s at most)."""
    found: set[str] = set()
    for _ in range(200):
        rows = await pool.fetch(
            "SELECT i.sop_instance_uid FROM instance i JOIN series se ON se.pk = i.series_fk "
            "JOIN study st ON st.pk = se.study_fk WHERE st.study_instance_uid = $1",
            STUDY,
        )
        found = {r["sop_instance_uid"] for r in rows}
        if found >= expected:
            await asyncio.sleep(0.3)  # anything more would arrive with them
            rows = await pool.fetch("SELECT sop_instance_uid FROM instance")
            return {r["sop_instance_uid"] for r in rows}
        await asyncio.sleep(0.1)
    return found


def _by_status(report: ImportReport) -> dict[ImportStatus, list[str]]:
    result: dict[ImportStatus, list[str]] = {}
    for item in report.files:
        result.setdefault(item.status, []).append(item.path)
    return result


def _dcmtk_file_set(root: Path, files: dict[str, bytes]) -> None:
    """A File-set made by DCMTK (an independent writer) over ``files`` (File ID → bytes)."""
    for file_id, data in files.items():
        path = root / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    subprocess.run(
        [DCMMKDIR, "--log-level", "error", "+D", str(root / "DICOMDIR"), "+id", str(root), *files],
        check=True,
        capture_output=True,
    )


async def test_file_set_is_ingested_and_missing_files_are_reported(
    tmp_path: Path,
    db_pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    database_settings: DatabaseSettings,
    publisher: BlockingPublisher,
) -> None:
    hot = FilesystemStorage(tmp_path / "hot", fsync=False)
    media = tmp_path / "cd"
    _dcmtk_file_set(
        media,
        {
            "DICOM/S1/IMG1": _image_bytes(1, 1),
            "DICOM/S1/IMG2": _image_bytes(1, 2),
            "DICOM/S2/IMG1": _image_bytes(2, 1),
            "DICOM/S2/IMG2": _image_bytes(2, 2),
        },
    )
    (media / "DICOM" / "S2" / "IMG2").unlink()  # a record whose file is gone
    (media / "README.TXT").write_text("a viewer would be here")  # not referenced: ignored
    receiver = InstanceReceiver(hot, "hot", publisher.publish_ingest)

    async with _ingest_worker(broker_settings, database_settings, hot):
        report = await asyncio.to_thread(MediaImporter(receiver, SOURCE).import_paths, [media])
        indexed = await _indexed(db_pool, {_sop(1, 1), _sop(1, 2), _sop(2, 1)})

    statuses = _by_status(report)
    assert set(statuses) == {ImportStatus.STORED, ImportStatus.BROKEN_RECORD}
    assert sorted(statuses[ImportStatus.STORED]) == [
        f"{media}/DICOM/S1/IMG1",
        f"{media}/DICOM/S1/IMG2",
        f"{media}/DICOM/S2/IMG1",
    ]
    assert statuses[ImportStatus.BROKEN_RECORD] == [f"{media}/DICOM/S2/IMG2"]
    assert report.files[-1].sop_instance_uid == _sop(2, 2)
    assert indexed == {_sop(1, 1), _sop(1, 2), _sop(2, 1)}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


async def test_zip_good_files_are_ingested_bad_ones_reported(
    tmp_path: Path,
    db_pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    database_settings: DatabaseSettings,
    publisher: BlockingPublisher,
) -> None:
    hot = FilesystemStorage(tmp_path / "hot", fsync=False)
    truncated = _image_bytes(3, 1)
    upload = _zip(
        tmp_path / "upload.zip",
        {
            "a/one.dcm": _image_bytes(1, 1),
            "a/two.dcm": _image_bytes(1, 2),
            "notes.txt": b"not an image",
            "a/cut.dcm": truncated[: len(truncated) - 40],  # cut in the pixel data
            "a/header.dcm": truncated[:300],  # cut in the middle of the header
        },
    )
    receiver = InstanceReceiver(hot, "hot", publisher.publish_ingest)

    async with _ingest_worker(broker_settings, database_settings, hot):
        report = await asyncio.to_thread(
            MediaImporter(receiver, SOURCE, spool_dir=tmp_path / "spool").import_paths, [upload]
        )
        indexed = await _indexed(db_pool, {_sop(1, 1), _sop(1, 2)})

    by_path = {item.path: item for item in report.files}
    assert {p: i.status for p, i in by_path.items()} == {
        f"{upload}:a/one.dcm": ImportStatus.STORED,
        f"{upload}:a/two.dcm": ImportStatus.STORED,
        f"{upload}:notes.txt": ImportStatus.NOT_DICOM,
        f"{upload}:a/cut.dcm": ImportStatus.REFUSED,
        f"{upload}:a/header.dcm": ImportStatus.REFUSED,
    }
    assert "truncated" in (by_path[f"{upload}:a/cut.dcm"].reason or "")
    assert report.summary() == {"stored": 2, "not_dicom": 1, "broken_record": 0, "refused": 2}
    assert indexed == {_sop(1, 1), _sop(1, 2)}
    assert not list((tmp_path / "spool").iterdir())  # the extraction is cleaned up


def _recording_receiver(tmp_path: Path) -> tuple[InstanceReceiver, list[IngestMessage]]:
    messages: list[IngestMessage] = []
    publish: Callable[[IngestMessage], None] = messages.append
    return InstanceReceiver(FilesystemStorage(tmp_path / "hot", fsync=False), "hot", publish), messages


def test_an_exported_file_set_round_trips_and_a_broken_dicomdir_is_reported(tmp_path: Path) -> None:
    receiver, messages = _recording_receiver(tmp_path)
    # A File-set written by pydicom, zipped with its DICOMDIR.
    file_set = FileSet()
    staged = tmp_path / "staged"
    staged.mkdir()
    for number in (1, 2):
        path = staged / f"{number}.dcm"
        path.write_bytes(_image_bytes(1, number))
        file_set.add(path)
    file_set.write(tmp_path / "set")
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as archive:
        for path in sorted((tmp_path / "set").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(tmp_path / "set").as_posix())
    # A folder whose DICOMDIR is garbage: its files are imported all the same.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "set", broken)
    (broken / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)

    importer = MediaImporter(receiver, SOURCE, spool_dir=tmp_path / "spool")
    zipped = importer.import_paths([tmp_path / "set.zip"])
    assert [i.status for i in zipped.files] == [ImportStatus.STORED] * 2
    assert {m.sop_instance_uid for m in messages} == {_sop(1, 1), _sop(1, 2)}

    fallback = importer.import_paths([broken])
    statuses = _by_status(fallback)
    assert statuses[ImportStatus.BROKEN_RECORD] == [f"{broken}/DICOMDIR"]
    assert len(statuses[ImportStatus.STORED]) == 2
    missing = importer.import_paths([tmp_path / "nothing-here"])
    assert [(i.status, i.reason) for i in missing.files] == [
        (ImportStatus.REFUSED, "no such file or directory")
    ]


def test_zip_names_cannot_escape_and_a_damaged_entry_is_refused(tmp_path: Path) -> None:
    receiver, messages = _recording_receiver(tmp_path)
    good, damaged = _image_bytes(1, 1), _image_bytes(1, 2)
    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zipped:
        zipped.writestr("../../escape.dcm", good)
        zipped.writestr("bad.dcm", damaged)
    data = bytearray(archive.read_bytes())
    at = data.rindex(damaged[-64:])  # flip a byte of the second entry: its CRC no longer matches
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))

    report = MediaImporter(receiver, SOURCE, spool_dir=tmp_path / "spool").import_paths([archive])
    assert [(i.path, i.status) for i in report.files] == [
        (f"{archive}:bad.dcm", ImportStatus.REFUSED),
        (f"{archive}:escape.dcm", ImportStatus.STORED),
    ]
    assert "damaged entry" in (report.files[0].reason or "")
    assert [m.sop_instance_uid for m in messages] == [_sop(1, 1)]
    assert not (tmp_path / "escape.dcm").exists()


def _signer(name: str) -> Signer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return Signer(key=key, certificate=certificate)


def test_signatures_of_imported_files_are_verified_and_reported(tmp_path: Path) -> None:
    receiver, messages = _recording_receiver(tmp_path)
    trusted, stranger = _signer("Trusted site"), _signer("Unknown site")
    folder = tmp_path / "signed"
    folder.mkdir()
    for number, signer, tamper in ((1, trusted, False), (2, trusted, True), (3, stranger, False)):
        dataset = pydicom.dcmread(io.BytesIO(_image_bytes(1, number)))
        signer.sign(dataset)
        if tamper:
            dataset.PatientName = "CHANGED^AFTER^SIGNING"
        dataset.save_as(folder / f"{number}.dcm", enforce_file_format=True)
    (folder / "4.dcm").write_bytes(_image_bytes(1, 4))  # not signed

    report = MediaImporter(receiver, SOURCE, trust_anchors=[trusted.certificate]).import_paths([folder])

    assert [(Path(i.path).name, i.status, i.signatures) for i in report.files] == [
        ("1.dcm", ImportStatus.STORED, ["valid"]),
        ("2.dcm", ImportStatus.STORED, ["invalid"]),
        ("3.dcm", ImportStatus.STORED, ["untrusted-certificate"]),
        ("4.dcm", ImportStatus.STORED, []),
    ]
    assert len(messages) == 4
