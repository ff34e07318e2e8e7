"""Timing of InstanceIndex.index_batch on synthetic instances (not a test).

    uv run python libs/common/tests/bench_index_batch.py [--instances 2000] [--batch 100] [--workers 2]

Clones the parsed header of pydicom's CT_small.dcm (257 elements, ~12 kB of
DICOM JSON) under fresh UIDs: 20 studies x 2 series x 50 instances per 2,000,
indexed in batches by concurrent tasks, each with its own connection, into a
throwaway database.  Prints instances/s.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import os
import time
import uuid
import warnings
from datetime import UTC, datetime

from pydicom.data import get_testdata_file

from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.db.migrate import drop_database, upgrade
from pacs_common.db.pool import create_pool
from pacs_common.dicom.metadata import ParsedInstance, parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.settings import DatabaseSettings, DuplicatePolicy


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def synthetic_items(count: int, per_series: int = 50, series_per_study: int = 2) -> list[IndexItem]:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None
    with open(path, "rb") as f:
        template = parse_for_index(f, bulk_data_threshold=1024)
    items: list[IndexItem] = []
    study_uid = series_uid = ""
    patient_id = ""
    for n in range(count):
        if n % (per_series * series_per_study) == 0:
            study_uid, patient_id = _uid(), f"P{n // (per_series * series_per_study):06d}"
        if n % per_series == 0:
            series_uid = _uid()
        parsed: ParsedInstance = copy.deepcopy(template)
        sop_uid = _uid()
        parsed.patient.patient_id = patient_id
        parsed.study.study_instance_uid = study_uid
        parsed.series.series_instance_uid = series_uid
        parsed.instance.sop_instance_uid = sop_uid
        parsed.instance.instance_number = n % per_series + 1
        parsed.metadata["00080018"] = {"vr": "UI", "Value": [sop_uid]}
        parsed.metadata["0020000D"] = {"vr": "UI", "Value": [study_uid]}
        parsed.metadata["0020000E"] = {"vr": "UI", "Value": [series_uid]}
        digest = hashlib.sha256(sop_uid.encode()).hexdigest()
        location = StorageLocation(
            tier="hot",
            backend="filesystem",
            key=f"{study_uid}/{series_uid}/{sop_uid}.dcm",
            size=39206,
            sha256=digest,
        )
        items.append(IndexItem.build(parsed, location, datetime.now(UTC), "BENCH"))
    return items


async def run(instances: int, batch: int, workers: int) -> None:
    base = os.environ.get("PACS_TEST_DB_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    settings = DatabaseSettings(
        url=base.rsplit("/", 1)[0] + f"/pacs_bench_{uuid.uuid4().hex[:8]}", pool_max_size=workers
    )
    upgrade(settings)
    try:
        pool = await create_pool(settings)
        index = InstanceIndex(pool)
        items = synthetic_items(instances)
        batches = [items[i : i + batch] for i in range(0, len(items), batch)]
        queue: asyncio.Queue[list[IndexItem]] = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)

        async def worker() -> None:
            while not queue.empty():
                b = queue.get_nowait()
                await index.index_batch(b, duplicate_policy=DuplicatePolicy.KEEP_FIRST)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - started
        print(
            f"index_batch: {instances} instances, batch {batch}, {workers} concurrent: "
            f"{elapsed:.2f} s, {instances / elapsed:.0f} instances/s"
        )
        started = time.perf_counter()
        for b in batches:
            await index.index_batch(b, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
        elapsed = time.perf_counter() - started
        print(f"redelivery (all unchanged), 1 task: {instances / elapsed:.0f} instances/s")
        await pool.close()
    finally:
        drop_database(settings)


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(run(args.instances, args.batch, args.workers))


if __name__ == "__main__":
    main()
