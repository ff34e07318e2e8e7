"""Export of stored studies as a DICOM File-set: checked by DCMTK (dcmdump
reads the DICOMDIR; dcmmkdir accepts every file and builds the same records
over them) and read back with pydicom's FileSet."""

from __future__ import annotations

import io
import re
import subprocess
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import numpy as np
import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from pacs_common.dicom.deidentify import Deidentifier
from pacs_common.dicom.signature_settings import Signer
from pacs_common.dicom.signatures import SignatureStatus, verify
from pacs_common.media.export import (
    ExportCancelledError,
    ExportOptions,
    FileSetExporter,
    MissingStudiesError,
    find_export_sources,
)
from pacs_common.media.testing import (
    Stored,
    dcmtk_build,
    dcmtk_records,
    image,
    part10,
    store_and_index,
)
from pacs_common.media.zipstream import iter_zip
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage

STUDIES = ("1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72")
SALT = b"a-test-salt-of-enough-bytes"
FILE_ID_COMPONENT = re.compile(r"^[A-Z0-9_]{1,8}$")


def _studies() -> list[pydicom.Dataset]:
    """Two studies of two patients, two series of two images each."""
    datasets = []
    for p, study in enumerate(STUDIES, start=1):
        for s in (1, 2):
            series = f"{study}.{s}"
            for n in (1, 2):
                datasets.append(
                    image(study, series, f"{series}.{n}", number=n, patient_id=f"PAT-{p}", StudyID=str(p))
                )
    return datasets


@pytest.fixture
async def stored(db_pool: asyncpg.Pool, fs_storage: FilesystemStorage) -> list[Stored]:
    return await store_and_index(db_pool, fs_storage, _studies())


def _exporter(storage: FilesystemStorage, **options: bool) -> FileSetExporter:
    deidentifier = Deidentifier(SALT) if options.get("deidentify") else None
    return FileSetExporter(
        StorageRegistry({"hot": storage}), ExportOptions(**options), deidentifier=deidentifier
    )


def _content(path: str) -> bytes:
    return Path(path).read_bytes()


def _unzip_test(path: Path) -> str:
    tested = subprocess.run(["/usr/bin/unzip", "-tq", str(path)], capture_output=True, text=True, check=False)
    return "" if tested.returncode == 0 else tested.stdout + tested.stderr


def _read_back(root: Path) -> FileSet:
    return FileSet(pydicom.dcmread(root / "DICOMDIR"))


async def test_export_is_a_valid_file_set_with_the_stored_bytes(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, stored: list[Stored], tmp_path: Path
) -> None:
    sources = await find_export_sources(db_pool, list(STUDIES))
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> bool:
        seen.append((done, total))
        return True

    target = tmp_path / "media"
    result = _exporter(fs_storage).export(sources, target, progress)

    assert result.failures == []
    assert seen[-1] == (8, 8)
    # DCMTK reads the DICOMDIR without a complaint and finds every record.
    records = dcmtk_records(target / "DICOMDIR")
    assert records.count("PATIENT") == 2
    assert records.count("STUDY") == 2
    assert records.count("SERIES") == 4
    assert records.count("IMAGE") == 8
    # dcmmkdir (General Purpose CD-R profile, strict) accepts every file and
    # builds the same hierarchy over them.
    file_ids = sorted(result.file_ids.values())
    assert dcmtk_build(target, file_ids, tmp_path / "DCMTKDIR") == ""
    assert sorted(dcmtk_records(tmp_path / "DCMTKDIR")) == sorted(records)
    # pydicom finds every instance, under conformant File IDs, byte-identical to what is stored.
    file_set = _read_back(target)
    assert len(file_set) == 8
    by_sop = {s.sop_instance_uid: s for s in stored}
    for instance in file_set:
        parts = Path(instance.FileID).parts
        assert len(parts) <= 8
        assert all(FILE_ID_COMPONENT.match(part) for part in parts), instance.FileID
        assert _content(instance.path) == by_sop[instance.SOPInstanceUID].data
    patients = {str(i.PatientID) for i in file_set}
    assert patients == {"PAT-1", "PAT-2"}
    assert {str(i.StudyInstanceUID) for i in file_set} == set(STUDIES)
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no spool left


async def test_unknown_study_is_refused(db_pool: asyncpg.Pool, stored: list[Stored]) -> None:
    with pytest.raises(MissingStudiesError) as caught:
        await find_export_sources(db_pool, [STUDIES[0], "1.2.3.404"])
    assert caught.value.study_uids == ["1.2.3.404"]


async def test_deidentified_export_has_no_phi_and_consistent_uids(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, stored: list[Stored], tmp_path: Path
) -> None:
    sources = await find_export_sources(db_pool, list(STUDIES))
    target = tmp_path / "media"
    result = _exporter(fs_storage, deidentify=True).export(sources, target)
    assert result.failures == []

    for path in target.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"DOE" not in data and b"PAT-1" not in data and b"ACC123" not in data, path
    file_set = _read_back(target)
    assert len(file_set) == 8
    originals = {s.sop_instance_uid for s in stored}
    studies: dict[str, set[str]] = {}
    for instance in file_set:
        ds = instance.load()
        assert str(ds.PatientName) != "DOE^JOHN"
        assert ds.PatientIdentityRemoved == "YES"
        # The records describe the files, whose UIDs are all remapped.
        assert ds.SOPInstanceUID == instance.SOPInstanceUID
        assert ds.StudyInstanceUID == instance.StudyInstanceUID
        assert ds.SeriesInstanceUID == instance.SeriesInstanceUID
        assert ds.SOPInstanceUID not in originals and ds.StudyInstanceUID not in STUDIES
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        studies.setdefault(ds.StudyInstanceUID, set()).add(ds.FrameOfReferenceUID)
    # Two studies stay two, and references inside a study stay consistent.
    assert len(studies) == 2
    assert all(len(frames) == 1 for frames in studies.values())
    assert dcmtk_records(target / "DICOMDIR").count("IMAGE") == 8
    # De-identification empties the Study ID, which DICOMDIR records need: invented as DCMTK would.
    assert dcmtk_build(target, sorted(result.file_ids.values()), tmp_path / "DCMTKDIR", invent=True) == ""


def _jpeg_lossless(ds: pydicom.Dataset, tmp_path: Path) -> bytes:
    plain, compressed = tmp_path / "plain.dcm", tmp_path / "jpeg.dcm"
    plain.write_bytes(part10(ds))
    subprocess.run(["/usr/bin/dcmcjpeg", str(plain), str(compressed)], check=True, capture_output=True)
    data = compressed.read_bytes()
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    return data


async def test_explicit_le_export_decodes_compressed_instances(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, tmp_path: Path
) -> None:
    study = "1.2.826.0.1.3680043.8.498.73"
    original = image(study, f"{study}.1", f"{study}.1.1", StudyID="3")
    original.PixelData = np.arange(64, dtype=np.uint16).reshape(8, 8).tobytes()
    expected = original.pixel_array.copy()
    plain = image(study, f"{study}.1", f"{study}.1.2", number=2, StudyID="3")
    await store_and_index(db_pool, fs_storage, [_jpeg_lossless(original, tmp_path), plain])
    sources = await find_export_sources(db_pool, [study])

    target = tmp_path / "media"
    result = _exporter(fs_storage, explicit_vr_little_endian=True).export(sources, target)
    assert result.failures == []
    file_set = _read_back(target)
    assert len(file_set) == 2
    for instance in file_set:
        ds = instance.load()
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert instance.ReferencedTransferSyntaxUIDInFile == ExplicitVRLittleEndian
        if ds.SOPInstanceUID == f"{study}.1.1":
            assert np.array_equal(ds.pixel_array, expected)
    # Now every file fits the General Purpose CD-R profile (Explicit VR Little Endian only).
    assert dcmtk_build(target, sorted(result.file_ids.values()), tmp_path / "DCMTKDIR") == ""


async def test_zip_stream_holds_the_directory(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, stored: list[Stored], tmp_path: Path
) -> None:
    sources = await find_export_sources(db_pool, [STUDIES[0]])
    target = tmp_path / "media"
    _exporter(fs_storage).export(sources, target)

    chunks = list(iter_zip(target, chunk_size=256))
    assert len(chunks) > 4
    archive_path = tmp_path / "media.zip"
    archive_path.write_bytes(b"".join(chunks))
    files = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with zipfile.ZipFile(archive_path) as archive:
        assert archive.namelist()[0] == "DICOMDIR"
        assert {name: archive.read(name) for name in archive.namelist()} == files
    # Info-ZIP agrees (sizes and CRCs in data descriptors).
    assert _unzip_test(archive_path) == ""


async def test_a_missing_object_is_reported_and_cancelling_stops(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, stored: list[Stored], tmp_path: Path
) -> None:
    sources = await find_export_sources(db_pool, [STUDIES[0]])
    fs_storage.delete(stored[0].key)
    result = _exporter(fs_storage).export(sources, tmp_path / "partial")
    assert [(f.sop_instance_uid, f.reason) for f in result.failures] == [
        (stored[0].sop_instance_uid, "the stored object is missing")
    ]
    assert len(_read_back(tmp_path / "partial")) == 3

    with pytest.raises(ExportCancelledError):
        _exporter(fs_storage).export(sources, tmp_path / "cancelled", lambda done, total: done < 2)
    assert not (tmp_path / "cancelled" / "DICOMDIR").exists()
    with pytest.raises(FileExistsError):
        _exporter(fs_storage).export(sources, tmp_path / "partial")


async def test_instances_on_other_tiers_are_exported_from_where_the_index_says(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, s3_storage: S3Storage, tmp_path: Path
) -> None:
    datasets = _studies()[:4]  # one study, two series
    on_hot = await store_and_index(db_pool, fs_storage, datasets[:2])
    on_warm = await store_and_index(db_pool, s3_storage, datasets[2:], tier="warm")
    sources = await find_export_sources(db_pool, [STUDIES[0]])
    assert {s.tier for s in sources} == {"hot", "warm"}

    registry = StorageRegistry({"hot": fs_storage, "warm": s3_storage})
    result = FileSetExporter(registry).export(sources, tmp_path / "media")
    assert result.failures == []
    expected = {s.sop_instance_uid: s.data for s in [*on_hot, *on_warm]}
    file_set = _read_back(tmp_path / "media")
    assert {i.SOPInstanceUID: _content(i.path) for i in file_set} == expected


def _self_signed() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PACS export signer")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, certificate


async def test_signed_export_verifies_and_a_changed_byte_is_caught(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, stored: list[Stored], tmp_path: Path
) -> None:
    key, certificate = _self_signed()
    exporter = FileSetExporter(
        StorageRegistry({"hot": fs_storage}),
        ExportOptions(sign=True, explicit_vr_little_endian=True),
        signer=Signer(key=key, certificate=certificate),
    )
    sources = await find_export_sources(db_pool, list(STUDIES))
    target = tmp_path / "signed"
    result = exporter.export(sources, target)

    assert result.failures == []
    assert dcmtk_records(target / "DICOMDIR").count("IMAGE") == 8
    file_set = _read_back(target)
    assert len(file_set) == 8
    for instance in file_set:
        reports = verify(pydicom.dcmread(instance.path), trust_anchors=[certificate])
        assert [r.status for r in reports] == [SignatureStatus.VALID], instance.FileID
    # A changed byte in a signed element: the copy no longer verifies.
    first = next(iter(file_set))
    dataset = pydicom.dcmread(first.path)
    dataset.PatientName = str(dataset.PatientName) + "X"
    assert [r.status for r in verify(dataset, trust_anchors=[certificate])] == [SignatureStatus.INVALID]


def test_signed_export_needs_a_signer(fs_storage: FilesystemStorage) -> None:
    with pytest.raises(ValueError, match="Signer"):
        FileSetExporter(StorageRegistry({"hot": fs_storage}), ExportOptions(sign=True))
