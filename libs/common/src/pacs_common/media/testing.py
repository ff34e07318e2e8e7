"""Test helpers for media export and import (used by the tests of
pacs-common, the dicomweb-api and the e2e tests): small image instances,
objects stored and indexed as the ingest worker indexes them, and the DCMTK
checks of a File-set.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.settings import DuplicatePolicy
from pacs_common.storage import ObjectStorage

__all__ = [
    "CT_IMAGE_STORAGE",
    "DCMDUMP",
    "DCMMKDIR",
    "Stored",
    "dcmtk_build",
    "dcmtk_records",
    "image",
    "part10",
    "store_and_index",
]

CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
DCMDUMP: Final = "/usr/bin/dcmdump"
DCMMKDIR: Final = "/usr/bin/dcmmkdir"
ROWS: Final = 8
_RECORD_TYPE: Final = re.compile(r"\(0004,1430\) CS \[([A-Z ]+?)\s*\]")


def image(
    study: str,
    series: str,
    sop: str,
    *,
    number: int = 1,
    patient_id: str = "PAT-4711",
    patient_name: str = "DOE^JOHN",
    **attributes: Any,
) -> Dataset:
    """A small CT image (8x8, 16 bit) in Explicit VR Little Endian."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC123"
    ds.StudyDescription = "CT chest DOE"
    ds.Modality = "CT"
    ds.SeriesNumber = int(series.rsplit(".", 1)[-1])
    ds.InstanceNumber = number
    ds.FrameOfReferenceUID = f"{study}.99"
    ds.Rows = ds.Columns = ROWS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = bytes((number * 7 + i) % 16 for i in range(ROWS * ROWS * 2))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True, slots=True)
class Stored:
    study_instance_uid: str
    sop_instance_uid: str
    data: bytes
    key: str


def _prepare(
    storage: ObjectStorage, tier: str, objects: Iterable[Dataset | bytes]
) -> tuple[list[Stored], list[IndexItem]]:
    stored: list[Stored] = []
    items: list[IndexItem] = []
    for obj in objects:
        data = part10(obj) if isinstance(obj, Dataset) else obj
        parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=1024)
        study = parsed.study.study_instance_uid or ""
        series = parsed.series.series_instance_uid or ""
        sop = parsed.instance.sop_instance_uid or ""
        put = storage.put(f"{study}/{series}/{sop}.dcm", io.BytesIO(data), size=len(data))
        location = StorageLocation(
            tier=tier,
            backend=put.backend,
            key=put.key,
            size=put.size,
            sha256=put.sha256 or hashlib.sha256(data).hexdigest(),
        )
        items.append(IndexItem.build(parsed, location, datetime.now(UTC), "TEST"))
        stored.append(Stored(study, sop, data, put.key))
    return stored, items


async def store_and_index(
    pool: asyncpg.Pool, storage: ObjectStorage, objects: Iterable[Dataset | bytes], *, tier: str = "hot"
) -> list[Stored]:
    """Write each object to ``storage`` and index it as the ingest worker would."""
    stored, items = await asyncio.to_thread(_prepare, storage, tier, list(objects))
    await InstanceIndex(pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
    return stored


def dcmtk_records(dicomdir: Path) -> list[str]:
    """The directory record types of a DICOMDIR as DCMTK's ``dcmdump`` reads
    them; raises AssertionError when DCMTK reports any problem."""
    done = subprocess.run(
        [DCMDUMP, "--log-level", "warn", str(dicomdir)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), done.stderr
    return _RECORD_TYPE.findall(done.stdout)


def dcmtk_build(
    root: Path, file_ids: Iterable[str], output: Path, *, general_purpose: bool = True, invent: bool = False
) -> str:
    """Build a DICOMDIR over the same files with DCMTK's ``dcmmkdir`` into
    ``output`` and return its errors ('' when none).  ``general_purpose``:
    the STD-GEN-CD profile strictly (Explicit VR Little Endian only), else
    any transfer syntax; ``invent``: Type 1 record values the files lack are
    invented (else they are errors)."""
    command = [DCMMKDIR, "--log-level", "error", "+D", str(output), "+id", str(root)]
    if not general_purpose:
        command += ["-Nxc", "-Nec"]
    if invent:
        command.append("+I")
    done = subprocess.run([*command, *file_ids], capture_output=True, text=True, check=False)
    return "" if done.returncode == 0 else (done.stderr or done.stdout or f"exit {done.returncode}")
