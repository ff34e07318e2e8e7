"""Instances for tests and benchmarks of tier migration: real Part 10
objects written to a storage tier and indexed through the real index
writer (:class:`~pacs_common.db.index.InstanceIndex`), as the ingest worker
would have.  Not used by any service."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.settings import DuplicatePolicy
from pacs_common.storage import ObjectArchivedError, ObjectStorage, StorageRegistry, sha256_of

__all__ = [
    "SeededInstance",
    "build_test_tiers",
    "consistency_problems",
    "instance_bytes",
    "seed_instances",
]

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True, slots=True)
class SeededInstance:
    pk: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    key: str
    size: int
    sha256: str


def instance_bytes(
    study: str,
    series: str,
    sop: str,
    *,
    modality: str = "CT",
    study_date: str | None = None,
    pixel_bytes: int = 1024,
    seed: int = 0,
) -> bytes:
    """A Part 10 secondary capture of about ``pixel_bytes`` of 8-bit pixels."""
    columns = 256
    rows = max(1, pixel_bytes // columns)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "HSM-TEST"
    ds.PatientName = "HSM^TEST"
    if study_date is not None:
        ds.StudyDate = study_date
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 256, size=rows * columns, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _store(
    storage: ObjectStorage, tier: str, key: str, data: bytes, received_at: datetime
) -> tuple[IndexItem, StorageLocation]:
    stored = storage.put(key, io.BytesIO(data), size=len(data))
    location = StorageLocation(
        tier=tier, backend=stored.backend, key=key, size=stored.size, sha256=stored.sha256
    )
    parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=1024)
    return IndexItem.build(parsed, location, received_at, "HSMTEST"), location


async def seed_instances(
    pool: asyncpg.Pool,
    storage: ObjectStorage,
    *,
    studies: int = 1,
    series_per_study: int = 1,
    instances_per_series: int = 1,
    modality: str = "CT",
    study_date: str | None = None,
    received_at: datetime | None = None,
    pixel_bytes: int = 1024,
    tier: str = "hot",
    study_instance_uids: Sequence[str] | None = None,
) -> list[SeededInstance]:
    """Write and index instances; their objects go to ``storage`` as ``tier``
    under ``{study}/{series}/{sop}.dcm``."""
    received = received_at or datetime.now(UTC)
    uids = list(study_instance_uids or [generate_uid() for _ in range(studies)])
    items: list[tuple[IndexItem, StorageLocation]] = []
    number = 0
    for study in uids:
        for _ in range(series_per_study):
            series = generate_uid()
            for _ in range(instances_per_series):
                sop = generate_uid()
                number += 1
                data = instance_bytes(
                    study, series, sop, modality=modality, study_date=study_date,
                    pixel_bytes=pixel_bytes, seed=number,
                )  # fmt: skip
                key = f"{study}/{series}/{sop}.dcm"
                items.append(await asyncio.to_thread(_store, storage, tier, key, data, received))
    index = InstanceIndex(pool)
    for start in range(0, len(items), 100):
        chunk = [item for item, _ in items[start : start + 100]]
        await index.index_batch(chunk, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
    rows = await pool.fetch(
        "SELECT pk, sop_instance_uid FROM instance WHERE sop_instance_uid = ANY($1::text[])",
        [item.sop_instance_uid for item, _ in items],
    )
    pks = {row["sop_instance_uid"]: int(row["pk"]) for row in rows}
    return [
        SeededInstance(
            pk=pks[item.sop_instance_uid],
            study_instance_uid=item.study_instance_uid,
            series_instance_uid=item.series_instance_uid,
            sop_instance_uid=item.sop_instance_uid,
            key=location.key,
            size=location.size,
            sha256=location.sha256,
        )
        for item, location in items
    ]


def build_test_tiers(
    hot_path: Path,
    *,
    s3_endpoint: str,
    azure_connection_string: str,
    warm_storage_class: str = "STANDARD_IA",
    cold_access_tier: str = "Archive",
) -> StorageRegistry:
    """hot = a directory, warm = a fresh S3 bucket (``warm_storage_class``),
    cold = a fresh Azure container (``cold_access_tier``): the example
    policy's tiers, against a moto server and Azurite."""
    from pacs_common.storage.azure import AzureBlobStorage
    from pacs_common.storage.filesystem import FilesystemStorage
    from pacs_common.storage.s3 import S3Storage, make_s3_client

    bucket = f"hsm{uuid.uuid4().hex[:20]}"
    warm = S3Storage(
        bucket,
        client=make_s3_client(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing"),
        storage_class=warm_storage_class,
        multipart_threshold=5 * 1024 * 1024,
        multipart_chunk=5 * 1024 * 1024,
    )
    warm.ensure_bucket()
    cold = AzureBlobStorage.from_connection_string(
        azure_connection_string,
        f"hsm{uuid.uuid4().hex[:20]}",
        access_tier=cold_access_tier,
        block_size=4 * 1024 * 1024,
        single_put_threshold=5 * 1024 * 1024,
    )
    return StorageRegistry({"hot": FilesystemStorage(hot_path), "warm": warm, "cold": cold})


def _object_problem(storage: ObjectStorage, tier: str, key: str, size: int, sha256: str) -> str | None:
    info = storage.stat(key)
    if info is None:
        return f"{tier}:{key} is referenced but missing"
    if info.size != size:
        return f"{tier}:{key} has {info.size} bytes, the index says {size}"
    try:
        digest = sha256_of(storage, key)
    except ObjectArchivedError:
        digest = info.sha256 or ""
    if digest != sha256:
        return f"{tier}:{key} has sha256 {digest}, the index says {sha256}"
    return None


def _keys(storage: ObjectStorage) -> set[str]:
    return set(storage.iter_keys())


async def consistency_problems(pool: asyncpg.Pool, storage: StorageRegistry) -> list[str]:
    """What is wrong between the index and the tiers: a location whose
    object is missing or differs, an object no location names (a leftover
    copy), a move still open.  Empty when all is well."""
    problems: list[str] = []
    rows = await pool.fetch("SELECT instance_fk, tier, key, size, sha256 FROM instance_location")
    referenced: dict[str, set[str]] = {tier: set() for tier in storage.names}
    for row in rows:
        tier, key = row["tier"], row["key"]
        if tier not in storage:
            problems.append(f"instance {row['instance_fk']} is in unknown tier {tier}")
            continue
        referenced[tier].add(key)
        problem = await asyncio.to_thread(
            _object_problem, storage.get(tier), tier, key, int(row["size"]), row["sha256"]
        )
        if problem:
            problems.append(problem)
    for tier in storage.names:
        keys = await asyncio.to_thread(_keys, storage.get(tier))
        problems.extend(f"{tier}:{key} is a leftover copy" for key in sorted(keys - referenced[tier]))
    open_moves = await pool.fetchval(
        "SELECT count(*) FROM hsm_move WHERE state IN ('pending', 'copied', 'verified', 'switched')"
    )
    if open_moves:
        problems.append(f"{open_moves} move(s) still open")
    return problems
