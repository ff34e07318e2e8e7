"""The sync loop in-process against real peers: PostgreSQL, Orthanc (the
remote node) and DCMTK's storescp as the C-MOVE destination (standing in
for our gateway, which the e2e tests use; nothing reaches our index here,
so every pull run moves again).

Covers: a pull moves exactly the remote's studies within the filter (a
modality and a date range leave the others); a relation to a node that is
not registered, or that does not answer, fails with the reason; an
interval relation runs by itself; the loop stops when asked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from pacs_common.localrun.infra import find_free_port
from pacs_common.nodes import RemoteNodeCreate, RemoteNodeRepository
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.sync import RunState, SyncRelationCreate, SyncRepository, SyncRun
from pacs_e2e.corpus import SeriesSpec, StudyFiles, write_study
from pacs_e2e.dcmtk import ReferenceReceiver, dcmtk_available
from pacs_e2e.orthanc import OrthancServer, orthanc_binary
from prefetch_scheduler.sync import SyncSettings, run_sync

pytestmark = pytest.mark.skipif(
    orthanc_binary() is None or not dcmtk_available(), reason="needs Orthanc and DCMTK"
)

REMOTE = "ORTHANC"
DESTINATION = "REFERENCE"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReferenceReceiver]:
    with ReferenceReceiver(tmp_path_factory.mktemp("sync-received"), find_free_port()) as reference:
        yield reference


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, receiver: ReferenceReceiver) -> Iterator[OrthancServer]:
    modalities = {DESTINATION: ("127.0.0.1", receiver.port)}
    with OrthancServer(tmp_path_factory.mktemp("sync-orthanc"), aet=REMOTE, modalities=modalities) as server:
        yield server


@contextlib.asynccontextmanager
async def syncing(pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[CollectorRegistry]:
    settings = SyncSettings(
        move_destination=DESTINATION,
        calling_ae_title="SYNC",
        poll_interval_seconds=0.1,
        connect_timeout_seconds=3,
    )
    storage = StorageRegistry({"hot": FilesystemStorage(tmp_path / "hot")})
    registry = CollectorRegistry()
    stop = asyncio.Event()
    task = asyncio.create_task(run_sync(pool, storage, registry, stop, settings=settings))
    try:
        yield registry
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def ended_run(pool: asyncpg.Pool, name: str, within: float = 60) -> SyncRun:
    deadline = time.monotonic() + within
    while True:
        runs = await SyncRepository(pool).history(name, limit=1)
        if runs and runs[0].state is not RunState.RUNNING:
            return runs[0]
        assert time.monotonic() < deadline, f"no run of {name} ended"
        await asyncio.sleep(0.1)


def at_remote(
    orthanc: OrthancServer, directory: Path, patient_id: str, *, day: str, modality: str, n: int
) -> StudyFiles:
    study = write_study(
        directory,
        patient_id=patient_id,
        patient_name=f"SYNC^{patient_id}",
        study_date=day,
        accession_number=f"{modality}{day}",
        series=[SeriesSpec(modality, n)],
    )
    for path in study.paths:
        orthanc.upload(path)
    return study


def received(receiver: ReferenceReceiver) -> Counter[str]:
    return Counter(str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in receiver.received())


async def test_pull_moves_the_studies_within_the_filter(
    db_pool: asyncpg.Pool, orthanc: OrthancServer, receiver: ReferenceReceiver, tmp_path: Path
) -> None:
    ct = at_remote(orthanc, tmp_path, "SYNC-SVC-1", day="20240105", modality="CT", n=2)
    mr = at_remote(orthanc, tmp_path, "SYNC-SVC-1", day="20240106", modality="MR", n=1)
    old_ct = at_remote(orthanc, tmp_path, "SYNC-SVC-1", day="20100101", modality="CT", n=1)
    at_remote(orthanc, tmp_path, "SYNC-SVC-OTHER", day="20240105", modality="CT", n=1)
    await RemoteNodeRepository(db_pool).add(
        RemoteNodeCreate(ae_title=REMOTE, host="127.0.0.1", port=orthanc.dicom_port)
    )
    before = received(receiver)
    async with syncing(db_pool, tmp_path) as registry:
        await SyncRepository(db_pool).add(
            SyncRelationCreate.model_validate(
                {
                    "name": "svc",
                    "remote_ae_title": REMOTE,
                    "filter": {
                        "modalities": ["CT"],
                        "study_date_from": "20200101",
                        "patient_ids": ["SYNC-SVC-1"],
                    },
                    "schedule_kind": "interval",
                    "interval_seconds": 3600,
                }
            )
        )
        run = await ended_run(db_pool, "svc")  # runs by itself: an interval relation is due at once
    assert run.state is RunState.SUCCEEDED, run.error
    assert (run.trigger, run.studies_compared, run.instances_pulled) == ("schedule", 1, 2)
    got = received(receiver) - before
    assert got == Counter({ct.study_instance_uid: 2})
    assert mr.study_instance_uid not in got and old_ct.study_instance_uid not in got
    assert registry.get_sample_value("pacs_sync_runs_total", {"relation": "svc", "outcome": "succeeded"}) == 1
    next_run = (await SyncRepository(db_pool).require("svc")).next_run_at
    assert next_run is not None and next_run > run.started_at


async def test_unregistered_or_unreachable_remote_fails_with_the_reason(
    db_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    repo = SyncRepository(db_pool)
    await RemoteNodeRepository(db_pool).add(
        RemoteNodeCreate(ae_title="DOWN", host="127.0.0.1", port=find_free_port())
    )
    async with syncing(db_pool, tmp_path) as registry:
        await repo.add(SyncRelationCreate(name="nobody", remote_ae_title="NOBODY"))
        await repo.request_run("nobody")
        unregistered = await ended_run(db_pool, "nobody")
        await repo.add(SyncRelationCreate(name="down", remote_ae_title="DOWN", direction="push"))
        await repo.request_run("down")
        down = await ended_run(db_pool, "down")
    assert unregistered.state is RunState.FAILED
    assert "NOBODY is not a registered node" in (unregistered.error or "")
    assert down.state is RunState.FAILED
    assert "connection refused" in (down.error or "")
    assert registry.get_sample_value("pacs_sync_runs_total", {"relation": "down", "outcome": "failed"}) == 1
