"""PACS-to-PACS sync end to end: the whole PACS as processes, Orthanc as the
remote node, and the sync loop of the prefetch-scheduler started in-process
against the system's database and storage.

Pull brings a study only Orthanc has (queryable here with all its
instances); push sends a study only we have (Orthanc's REST API then lists
it); a modality filter leaves the excluded study where it is; a second run
moves nothing; the run history and metrics say what happened."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from pacs_common.db.pool import create_pool
from pacs_common.localrun.runner import LocalSystem
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.sync import (
    ConflictPolicy,
    Direction,
    RunState,
    SyncFilter,
    SyncRelationCreate,
    SyncRepository,
    SyncRun,
)
from pacs_e2e.bench_prefetch import REMOTE_AE, remote_pacs, upload_priors
from pacs_e2e.corpus import SeriesSpec, StudyFiles, write_study
from pacs_e2e.dcmtk import dcmtk_available, storescu
from pacs_e2e.orthanc import OrthancServer, orthanc_binary
from pacs_e2e.system import pacs_cli, running_system
from prefetch_scheduler.sync import SyncSettings, run_sync

PEER_AE = "PACSPEER"

pytestmark = pytest.mark.skipif(
    orthanc_binary() is None or not dcmtk_available(), reason="needs Orthanc and DCMTK"
)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with running_system(tmp_path_factory.mktemp("pacs-sync")) as system:
        yield system


@pytest.fixture(scope="module")
def orthanc(pacs: LocalSystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with remote_pacs(tmp_path_factory.mktemp("orthanc-sync"), pacs) as server:
        yield server


@contextlib.asynccontextmanager
async def syncing(pacs: LocalSystem) -> AsyncIterator[tuple[asyncpg.Pool, CollectorRegistry]]:
    """The sync loop of one prefetch-scheduler replica, running until the block ends."""
    pool = await create_pool(DatabaseSettings(url=pacs.database_url, pool_min_size=1, pool_max_size=4))
    storage = StorageRegistry({"hot": FilesystemStorage(pacs.storage_path)})
    settings = SyncSettings(
        move_destination=pacs.ae_title,
        calling_ae_title="SYNC",
        poll_interval_seconds=0.2,
        connect_timeout_seconds=5,
    )
    registry = CollectorRegistry()
    stop = asyncio.Event()
    task = asyncio.create_task(run_sync(pool, storage, registry, stop, settings=settings))
    try:
        yield pool, registry
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await pool.close()


async def run_once(pool: asyncpg.Pool, name: str, within: float = 120) -> SyncRun:
    """Ask for a run of ``name`` and wait until it has ended."""
    repository = SyncRepository(pool)
    before = await repository.history(name, limit=1)
    last = before[0].id if before else 0
    await repository.request_run(name)
    deadline = time.monotonic() + within
    while True:
        run = await repository.latest_run_after(name, last)
        if run is not None and run.state is not RunState.RUNNING:
            return run
        assert time.monotonic() < deadline, f"no run of {name} ended"
        await asyncio.sleep(0.2)


async def local_counts(pool: asyncpg.Pool, patient_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        """
        SELECT s.study_instance_uid, count(i.pk) AS n
        FROM study s JOIN patient p ON p.pk = s.patient_fk
        JOIN series se ON se.study_fk = s.pk JOIN instance i ON i.series_fk = se.pk
        WHERE p.patient_id = $1 GROUP BY s.study_instance_uid
        """,
        patient_id,
    )
    return {r["study_instance_uid"]: r["n"] for r in rows}


async def wait_local(
    pool: asyncpg.Pool, patient_id: str, expected: dict[str, int], within: float = 60
) -> None:
    deadline = time.monotonic() + within
    while (got := await local_counts(pool, patient_id)) != expected:
        assert time.monotonic() < deadline, f"index holds {got}, expected {expected}"
        await asyncio.sleep(0.3)


def orthanc_studies(orthanc: OrthancServer) -> dict[str, int]:
    """StudyInstanceUID → instances, from Orthanc's REST API."""
    result = {}
    for orthanc_id in orthanc.get("/studies"):
        study = orthanc.get(f"/studies/{orthanc_id}")
        instances = orthanc.get(f"/studies/{orthanc_id}/instances")
        result[study["MainDicomTags"]["StudyInstanceUID"]] = len(instances)
    return result


def ours(pacs: LocalSystem, directory: Path, patient_id: str, modality: str, images: int) -> StudyFiles:
    """A study sent to our gateway (only we have it)."""
    study = write_study(
        directory,
        patient_id=patient_id,
        patient_name=f"SYNC^{patient_id}",
        study_date="20240110",
        accession_number=f"{patient_id[-8:]}L",
        series=[SeriesSpec(modality, images)],
    )
    sent = storescu(pacs.gateway_port, study.paths, calling="MODALITY")
    assert sent.returncode == 0, sent.output
    return study


async def add_relation(pool: asyncpg.Pool, name: str, direction: Direction, where: SyncFilter) -> None:
    await SyncRepository(pool).add(
        SyncRelationCreate(name=name, remote_ae_title=REMOTE_AE, direction=direction, filter=where)
    )


async def test_pull_brings_a_study_only_the_remote_has_and_a_second_run_moves_nothing(
    pacs: LocalSystem, orthanc: OrthancServer, tmp_path: Path
) -> None:
    [study] = upload_priors(orthanc, tmp_path, "SYNC-PULL", [("20230301", "CT", 3)])
    async with syncing(pacs) as (pool, registry):
        await add_relation(pool, "pull-1", Direction.PULL, SyncFilter(patient_ids=("SYNC-PULL",)))
        first = await run_once(pool, "pull-1")
        assert first.state is RunState.SUCCEEDED, first.error
        assert (first.studies_different, first.instances_pulled, first.instances_pushed) == (1, 3, 0)
        await wait_local(pool, "SYNC-PULL", {study.study_instance_uid: 3})

        second = await run_once(pool, "pull-1")
        assert second.state is RunState.SUCCEEDED, second.error
        assert (second.studies_compared, second.studies_different) == (1, 0)
        assert (second.instances_pulled, second.instances_pushed) == (0, 0)
        assert (
            registry.get_sample_value(
                "pacs_sync_instances_total", {"relation": "pull-1", "direction": "pull"}
            )
            == 3
        )
        assert (
            registry.get_sample_value("pacs_sync_runs_total", {"relation": "pull-1", "outcome": "succeeded"})
            == 2
        )
        history = await SyncRepository(pool).history("pull-1")
        assert [r.id for r in history] == [second.id, first.id]


async def test_pull_fetches_only_the_instances_missing_here(
    pacs: LocalSystem, orthanc: OrthancServer, tmp_path: Path
) -> None:
    study = write_study(
        tmp_path,
        patient_id="SYNC-PART",
        patient_name="SYNC^PART",
        study_date="20230401",
        accession_number="PART1",
        series=[SeriesSpec("MR", 4)],
    )
    for path in study.paths:
        orthanc.upload(path)
    # We hold two of the four already.
    sent = storescu(pacs.gateway_port, study.paths[:2], calling="MODALITY")
    assert sent.returncode == 0, sent.output
    async with syncing(pacs) as (pool, _):
        await wait_local(pool, "SYNC-PART", {study.study_instance_uid: 2})
        await add_relation(pool, "pull-part", Direction.PULL, SyncFilter(patient_ids=("SYNC-PART",)))
        run = await run_once(pool, "pull-part")
        assert run.state is RunState.SUCCEEDED, run.error
        assert run.instances_pulled == 2
        await wait_local(pool, "SYNC-PART", {study.study_instance_uid: 4})


async def test_push_sends_a_study_only_we_have(
    pacs: LocalSystem, orthanc: OrthancServer, tmp_path: Path
) -> None:
    mine = ours(pacs, tmp_path, "SYNC-PUSH", "CT", 2)
    [theirs] = upload_priors(orthanc, tmp_path, "SYNC-PUSH", [("20220101", "MR", 1)])
    async with syncing(pacs) as (pool, registry):
        await wait_local(pool, "SYNC-PUSH", {mine.study_instance_uid: 2})
        await add_relation(pool, "push-1", Direction.PUSH, SyncFilter(patient_ids=("SYNC-PUSH",)))
        run = await run_once(pool, "push-1")
        assert run.state is RunState.SUCCEEDED, run.error
        assert (run.instances_pushed, run.instances_pulled) == (2, 0)
        at_orthanc = orthanc_studies(orthanc)
        assert at_orthanc[mine.study_instance_uid] == 2
        # Push only: the study only Orthanc has stays there.
        assert await local_counts(pool, "SYNC-PUSH") == {mine.study_instance_uid: 2}
        assert theirs.study_instance_uid in at_orthanc

        again = await run_once(pool, "push-1")
        assert (again.state, again.instances_pushed, again.studies_different) == (RunState.SUCCEEDED, 0, 0)
        assert (
            registry.get_sample_value(
                "pacs_sync_instances_total", {"relation": "push-1", "direction": "push"}
            )
            == 2
        )


async def test_two_way_sync_with_a_modality_filter(
    pacs: LocalSystem, orthanc: OrthancServer, tmp_path: Path
) -> None:
    ct_there, mr_there = upload_priors(
        orthanc, tmp_path, "SYNC-BOTH", [("20230101", "CT", 2), ("20230201", "MR", 2)]
    )
    ct_here = ours(pacs, tmp_path, "SYNC-BOTH", "CT", 1)
    mr_here = ours(pacs, tmp_path, "SYNC-BOTH", "MR", 1)
    async with syncing(pacs) as (pool, _):
        await wait_local(pool, "SYNC-BOTH", {ct_here.study_instance_uid: 1, mr_here.study_instance_uid: 1})
        await add_relation(
            pool, "both-ct", Direction.BOTH, SyncFilter(patient_ids=("SYNC-BOTH",), modalities=("CT",))
        )
        run = await run_once(pool, "both-ct")
        assert run.state is RunState.SUCCEEDED, run.error
        assert (run.instances_pulled, run.instances_pushed) == (2, 1)
        await wait_local(
            pool,
            "SYNC-BOTH",
            {ct_here.study_instance_uid: 1, mr_here.study_instance_uid: 1, ct_there.study_instance_uid: 2},
        )
        at_orthanc = orthanc_studies(orthanc)
        assert ct_here.study_instance_uid in at_orthanc
        # The MR studies are outside the filter: each stays where it was.
        assert mr_here.study_instance_uid not in at_orthanc
        assert mr_there.study_instance_uid not in await local_counts(pool, "SYNC-BOTH")

        again = await run_once(pool, "both-ct")
        assert (again.instances_pulled, again.instances_pushed) == (0, 0)


def sync_cli(pacs: LocalSystem, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs sync ...`` (through its module until ``pacs`` registers it)."""
    return subprocess.run(
        [sys.executable, "-m", "pacs_common.cli.sync", "sync", *args],
        env={**os.environ, **pacs.env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


async def test_the_remote_sending_different_content_for_a_uid_we_hold_is_a_conflict(
    pacs: LocalSystem, orthanc: OrthancServer, tmp_path: Path
) -> None:
    mine = ours(pacs, tmp_path, "SYNC-CONFLICT", "CT", 1)
    [path] = mine.paths
    theirs = dcmread(path)
    theirs.StudyDescription = "changed at the remote"
    theirs.save_as(tmp_path / "theirs.dcm")
    orthanc.upload(tmp_path / "theirs.dcm")
    uid = str(theirs.SOPInstanceUID)
    async with syncing(pacs) as (pool, registry):
        await wait_local(pool, "SYNC-CONFLICT", {mine.study_instance_uid: 1})
        await SyncRepository(pool).add(
            SyncRelationCreate(
                name="conflict",
                remote_ae_title=REMOTE_AE,
                direction=Direction.PULL,
                filter=SyncFilter(patient_ids=("SYNC-CONFLICT",)),
                conflict_policy=ConflictPolicy.KEEP_LOCAL,
            )
        )
        # The remote sends us its object under the UID we hold.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{orthanc.http_port}") as http:
            [found] = (await http.post("/tools/lookup", content=uid)).json()
            stored = await http.post(
                f"/modalities/{pacs.ae_title}/store", json={"Resources": [found["ID"]], "Synchronous": True}
            )
            stored.raise_for_status()
        deadline = time.monotonic() + 60
        while not await pool.fetchval(
            "SELECT count(*) FROM instance_superseded WHERE sop_instance_uid = $1", uid
        ):
            assert time.monotonic() < deadline, "the ingest recorded no superseded object"
            await asyncio.sleep(0.3)

        run = await run_once(pool, "conflict")
        assert run.state is RunState.SUCCEEDED, run.error
        assert (run.conflicts, run.instances_pulled) == (1, 0)
        [conflict] = await SyncRepository(pool).conflicts("conflict")
        kept = await pool.fetchval("SELECT content_sha256 FROM instance WHERE sop_instance_uid = $1", uid)
        assert (conflict.sop_instance_uid, conflict.resolution, conflict.local_sha256) == (
            uid,
            "kept-local",
            kept,
        )
        assert conflict.remote_sha256 not in (None, kept)
        assert registry.get_sample_value("pacs_sync_conflicts_total", {"relation": "conflict"}) == 1

        again = await run_once(pool, "conflict")
        assert again.conflicts == 0


async def test_the_cli_adds_runs_and_shows_a_relation(
    pacs: LocalSystem, orthanc: OrthancServer, tmp_path: Path
) -> None:
    [study] = upload_priors(orthanc, tmp_path, "SYNC-CLI", [("20210601", "DX", 2)])
    added = sync_cli(
        pacs, "add", "cli", "--remote", REMOTE_AE, "--patient-id", "SYNC-CLI", "--modality", "DX"
    )
    assert added.returncode == 0, added.stderr
    assert "added sync relation cli: pull with ORTHANC, manual" in added.stdout
    assert sync_cli(pacs, "add", "cli", "--remote", REMOTE_AE).returncode == 1
    async with syncing(pacs) as (pool, _):
        ran = await asyncio.to_thread(sync_cli, pacs, "run", "cli", "--wait", "--timeout", "120")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ": succeeded (manual)" in ran.stdout
        assert "pulled 2, pushed 0, failed 0" in ran.stdout
        await wait_local(pool, "SYNC-CLI", {study.study_instance_uid: 2})
    listed = sync_cli(pacs, "list")
    assert "cli" in listed.stdout and "modalities DX; patients SYNC-CLI" in listed.stdout
    shown = sync_cli(pacs, "show", "cli", "--json")
    assert json.loads(shown.stdout)["last_run"]["instances_pulled"] == 2
    history = sync_cli(pacs, "history", "cli", "--json")
    assert [r["state"] for r in json.loads(history.stdout)] == ["succeeded"]
    assert sync_cli(pacs, "remove", "cli").returncode == 0
    assert sync_cli(pacs, "show", "cli").returncode == 1


@pytest.fixture(scope="module")
def peer(pacs: LocalSystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    """A second instance of this PACS, on ports of its own, as the remote node
    (each registered in the other's node registry)."""
    with running_system(
        tmp_path_factory.mktemp("pacs-peer"), extra_env={"PACS_GATEWAY_AE_TITLE": PEER_AE}
    ) as system:
        register(pacs, PEER_AE, system.gateway_port)
        register(system, pacs.ae_title, pacs.gateway_port)  # the peer sends what we pull here
        yield system


def register(system: LocalSystem, ae_title: str, port: int) -> None:
    added = pacs_cli(system, "node", "add", ae_title, "--host", "127.0.0.1", "--port", str(port))
    assert added.returncode == 0, added.stderr


async def test_two_instances_of_this_pacs_sync_both_ways(
    pacs: LocalSystem, peer: LocalSystem, tmp_path: Path
) -> None:
    only_there = write_study(
        tmp_path,
        patient_id="SYNC-PEER",
        patient_name="SYNC^PEER",
        study_date="20240501",
        accession_number="PEER1",
        series=[SeriesSpec("CT", 2), SeriesSpec("SR", 1)],
    )
    sent = storescu(peer.gateway_port, only_there.paths, calling="MODALITY", called=PEER_AE)
    assert sent.returncode == 0, sent.output
    only_here = ours(pacs, tmp_path, "SYNC-PEER", "MR", 2)
    peer_pool = await create_pool(DatabaseSettings(url=peer.database_url, pool_min_size=1, pool_max_size=2))
    try:
        await wait_local(peer_pool, "SYNC-PEER", {only_there.study_instance_uid: 3})
        async with syncing(pacs) as (pool, _):
            await wait_local(pool, "SYNC-PEER", {only_here.study_instance_uid: 2})
            await SyncRepository(pool).add(
                SyncRelationCreate(
                    name="peer",
                    remote_ae_title=PEER_AE,
                    direction=Direction.BOTH,
                    filter=SyncFilter(patient_ids=("SYNC-PEER",)),
                )
            )
            run = await run_once(pool, "peer")
            assert run.state is RunState.SUCCEEDED, run.error
            assert (run.instances_pulled, run.instances_pushed) == (3, 2)
            both = {only_there.study_instance_uid: 3, only_here.study_instance_uid: 2}
            await wait_local(pool, "SYNC-PEER", both)
            await wait_local(peer_pool, "SYNC-PEER", both)

            again = await run_once(pool, "peer")
            assert (again.studies_compared, again.studies_different) == (2, 0)
            assert (again.instances_pulled, again.instances_pushed) == (0, 0)
    finally:
        await peer_pool.close()


async def test_comparing_content_with_another_instance_finds_a_conflict_once(
    pacs: LocalSystem, peer: LocalSystem, tmp_path: Path
) -> None:
    study = write_study(
        tmp_path,
        patient_id="SYNC-DIGEST",
        patient_name="SYNC^DIGEST",
        study_date="20240601",
        accession_number="DIGEST1",
        series=[SeriesSpec("CT", 2)],
    )
    first, second = study.paths
    changed = dcmread(first)
    changed.StudyDescription = "changed at the peer"
    changed.save_as(tmp_path / "changed.dcm")
    assert storescu(pacs.gateway_port, [first, second], calling="MODALITY").returncode == 0
    sent = storescu(peer.gateway_port, [tmp_path / "changed.dcm", second], calling="MODALITY", called=PEER_AE)
    assert sent.returncode == 0, sent.output
    peer_pool = await create_pool(DatabaseSettings(url=peer.database_url, pool_min_size=1, pool_max_size=2))
    try:
        await wait_local(peer_pool, "SYNC-DIGEST", {study.study_instance_uid: 2})
    finally:
        await peer_pool.close()
    async with syncing(pacs) as (pool, registry):
        await wait_local(pool, "SYNC-DIGEST", {study.study_instance_uid: 2})
        await SyncRepository(pool).add(
            SyncRelationCreate(
                name="digest",
                remote_ae_title=PEER_AE,
                direction=Direction.BOTH,
                filter=SyncFilter(patient_ids=("SYNC-DIGEST",)),
                compare_content=True,
            )
        )
        run = await run_once(pool, "digest")
        assert run.state is RunState.SUCCEEDED, run.error
        assert (run.conflicts, run.instances_pulled, run.instances_pushed) == (1, 0, 0)
        assert run.details["instances_not_compared"] == 0
        [conflict] = await SyncRepository(pool).conflicts("digest")
        assert conflict.sop_instance_uid == str(changed.SOPInstanceUID)
        assert conflict.resolution == "reported (both copies kept)"
        assert conflict.local_sha256 != conflict.remote_sha256
        assert registry.get_sample_value("pacs_sync_conflicts_total", {"relation": "digest"}) == 1

        again = await run_once(pool, "digest")
        assert (again.state, again.conflicts) == (RunState.SUCCEEDED, 0)


async def test_keep_remote_moves_the_remote_copy_here_once(
    pacs: LocalSystem, peer: LocalSystem, tmp_path: Path
) -> None:
    study = write_study(
        tmp_path,
        patient_id="SYNC-KEEP",
        patient_name="SYNC^KEEP",
        study_date="20240701",
        accession_number="KEEP1",
        series=[SeriesSpec("CT", 1)],
    )
    [path] = study.paths
    changed = dcmread(path)
    changed.StudyDescription = "the peer's version"
    changed.save_as(tmp_path / "peer.dcm")
    uid = str(changed.SOPInstanceUID)
    assert storescu(pacs.gateway_port, [path], calling="MODALITY").returncode == 0
    sent = storescu(peer.gateway_port, [tmp_path / "peer.dcm"], calling="MODALITY", called=PEER_AE)
    assert sent.returncode == 0, sent.output
    peer_pool = await create_pool(DatabaseSettings(url=peer.database_url, pool_min_size=1, pool_max_size=2))
    try:
        await wait_local(peer_pool, "SYNC-KEEP", {study.study_instance_uid: 1})
    finally:
        await peer_pool.close()
    async with syncing(pacs) as (pool, _):
        await wait_local(pool, "SYNC-KEEP", {study.study_instance_uid: 1})
        await SyncRepository(pool).add(
            SyncRelationCreate(
                name="keep-remote",
                remote_ae_title=PEER_AE,
                direction=Direction.PULL,
                filter=SyncFilter(patient_ids=("SYNC-KEEP",)),
                compare_content=True,
                conflict_policy=ConflictPolicy.KEEP_REMOTE,
            )
        )
        run = await run_once(pool, "keep-remote")
        assert (run.state, run.conflicts) == (RunState.SUCCEEDED, 1), run.error
        [conflict] = await SyncRepository(pool).conflicts("keep-remote")
        assert conflict.resolution == "remote copy moved here (our duplicate policy decides)"
        # The peer's copy arrived; our ingest (keep-first here) set it aside.
        deadline = time.monotonic() + 60
        while not (
            decision := await pool.fetchval(
                "SELECT decision FROM instance_superseded WHERE sop_instance_uid = $1 AND source_ae_title = $2",
                uid,
                PEER_AE,
            )
        ):
            assert time.monotonic() < deadline, "the peer's copy did not arrive"
            await asyncio.sleep(0.3)
        assert decision == "kept-first"
        again = await run_once(pool, "keep-remote")
        assert (again.state, again.conflicts) == (
            RunState.SUCCEEDED,
            0,
        )  # neither found again nor re-reported
