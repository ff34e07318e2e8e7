"""The prefetch in-process against real peers: PostgreSQL, Orthanc (the
remote PACS holding the priors) and DCMTK's storescp as the C-MOVE
destination (standing in for our gateway; the e2e tests use the real one).

Covers: a worklist item → the chosen priors are moved, the one outside
the lookback is not; studies the index holds are skipped; an unreachable
remote → retried with backoff, then failed with the reason; two replicas
→ every job runs once; the process wiring (health, metrics, a crashed part
takes the process down)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from pacs_common.db.pool import create_pool
from pacs_common.jobs import Job, JobKind, JobRepository, JobState
from pacs_common.localrun.infra import find_free_port
from pacs_common.nodes import RemoteNodeCreate, RemoteNodeRepository
from pacs_common.settings import BrokerSettings, DatabaseSettings, StorageTiersSettings
from pacs_common.workflow.worklist import add_item
from pacs_e2e.corpus import SeriesSpec, StudyFiles, write_study
from pacs_e2e.dcmtk import ReferenceReceiver, dcmtk_available
from pacs_e2e.orthanc import OrthancServer, orthanc_binary
from prefetch_scheduler.main import PartCrashedError, SchedulerServices, run, run_parts
from prefetch_scheduler.prefetch.service import run_prefetch
from prefetch_scheduler.prefetch.settings import PrefetchSettings

pytestmark = pytest.mark.skipif(
    orthanc_binary() is None or not dcmtk_available(), reason="needs Orthanc and DCMTK"
)

REMOTE = "ORTHANC"
DESTINATION = "REFERENCE"  # ReferenceReceiver's AE title
THIS_YEAR = date.today().year


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReferenceReceiver]:
    with ReferenceReceiver(tmp_path_factory.mktemp("received"), find_free_port()) as reference:
        yield reference


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, receiver: ReferenceReceiver) -> Iterator[OrthancServer]:
    modalities = {DESTINATION: ("127.0.0.1", receiver.port)}
    with OrthancServer(tmp_path_factory.mktemp("orthanc"), aet=REMOTE, modalities=modalities) as server:
        yield server


def received_uids(receiver: ReferenceReceiver) -> Counter[str]:
    """SOP Instance UID → how many times the destination received it."""
    return Counter(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in receiver.received())


def priors(
    orthanc: OrthancServer, directory: Path, patient_id: str, specs: list[tuple[str, str, int]]
) -> list[StudyFiles]:
    """Studies of ``patient_id`` at the remote: (date, modality, images) each."""
    studies = []
    for number, (day, modality, images) in enumerate(specs):
        study = write_study(
            directory,
            patient_id=patient_id,
            patient_name=f"PRIOR^{patient_id}",
            study_date=day,
            accession_number=f"{patient_id[-6:]}{number}",
            series=[SeriesSpec(modality, images)],
        )
        for path in study.paths:
            orthanc.upload(path)
        studies.append(study)
    return studies


def sop_uids(study: StudyFiles) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.paths}


def worklist_item(patient_id: str, modality: str = "CT") -> dict[str, Any]:
    return {
        "00100020": {"vr": "LO", "Value": [patient_id]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"PRIOR^{patient_id}"}]},
        "00400100": {
            "vr": "SQ",
            "Value": [
                {
                    "00080060": {"vr": "CS", "Value": [modality]},
                    "00400002": {"vr": "DA", "Value": [date.today().strftime("%Y%m%d")]},
                }
            ],
        },
    }


def settings(**overrides: Any) -> PrefetchSettings:
    values: dict[str, Any] = {
        "sources": [REMOTE],
        "move_destination": DESTINATION,
        "calling_ae_title": "PREFETCH",
        "lookback_years": 5,
        "max_studies": 3,
        "poll_interval_seconds": 0.2,
        "retry_base_seconds": 0.2,
        "retry_max_seconds": 0.5,
        "max_attempts": 3,
        "index_wait_seconds": 0,
        "remote_min_move_interval_seconds": 0,
        "connect_timeout_seconds": 3,
        "http_port": 0,
    }
    return PrefetchSettings(**{**values, **overrides})


async def register(pool: asyncpg.Pool, ae_title: str, port: int) -> None:
    await RemoteNodeRepository(pool).add(RemoteNodeCreate(ae_title=ae_title, host="127.0.0.1", port=port))


@contextlib.asynccontextmanager
async def prefetching(pool: asyncpg.Pool, config: PrefetchSettings) -> AsyncIterator[CollectorRegistry]:
    """The prefetch loop of one replica, running until the block ends."""
    stop = asyncio.Event()
    registry = CollectorRegistry()
    task = asyncio.create_task(run_prefetch(pool, config, registry, stop))
    try:
        yield registry
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_for_jobs(pool: asyncpg.Pool, count: int, within: float = 60) -> list[Job]:
    """Wait until ``count`` prefetch jobs exist and every one has ended."""
    jobs = JobRepository(pool)
    deadline = time.monotonic() + within
    while True:
        _, found = await jobs.list(kinds=frozenset({JobKind.PREFETCH}))
        ended = [j for j in found if j.state in {JobState.DONE, JobState.FAILED, JobState.CANCELLED}]
        if len(found) >= count and len(ended) == len(found):
            return sorted(found, key=lambda j: j.id)
        if time.monotonic() > deadline:
            raise AssertionError(f"prefetch jobs not finished: {[(j.id, j.state) for j in found]}")
        await asyncio.sleep(0.1)


def outcomes(job: Job) -> dict[str, str]:
    return {s["study_instance_uid"]: s["outcome"] for s in job.params["studies"]}


async def test_worklist_item_moves_the_chosen_priors(
    db_pool: asyncpg.Pool, orthanc: OrthancServer, receiver: ReferenceReceiver, tmp_path: Path
) -> None:
    ct_recent, mr_older, ct_ancient = priors(
        orthanc,
        tmp_path,
        "PF-SVC-1",
        [(f"{THIS_YEAR - 1}0301", "CT", 2), (f"{THIS_YEAR - 3}0601", "MR", 1), ("20050101", "CT", 1)],
    )
    await register(db_pool, REMOTE, orthanc.dicom_port)
    async with prefetching(db_pool, settings()):
        [item] = await add_item(db_pool, worklist_item("PF-SVC-1"))
        [job] = await wait_for_jobs(db_pool, 1)

    assert job.state is JobState.DONE, job.error
    assert (job.params["worklist_item"], job.params["trigger"], job.attempts) == (item.pk, "created", 1)
    assert outcomes(job) == {ct_recent.study_instance_uid: "moved", mr_older.study_instance_uid: "moved"}
    assert [s["study_instance_uid"] for s in job.params["studies"]] == [
        ct_recent.study_instance_uid,  # same modality first
        mr_older.study_instance_uid,
    ]
    assert (job.progress_done, job.progress_total) == (2, 2)
    got = received_uids(receiver)
    assert all(got[uid] == 1 for uid in sop_uids(ct_recent) | sop_uids(mr_older))
    assert not sop_uids(ct_ancient) & set(got)  # outside the lookback


async def test_priors_held_locally_are_not_moved_again(
    db_pool: asyncpg.Pool, orthanc: OrthancServer, receiver: ReferenceReceiver, tmp_path: Path
) -> None:
    [held, missing] = priors(
        orthanc, tmp_path, "PF-SVC-2", [(f"{THIS_YEAR - 1}0101", "CT", 2), (f"{THIS_YEAR - 2}0101", "CT", 1)]
    )
    # The index holds the first one whole already.
    patient_pk = await db_pool.fetchval("INSERT INTO patient (patient_id) VALUES ('PF-SVC-2') RETURNING pk")
    await db_pool.execute(
        "INSERT INTO study (patient_fk, study_instance_uid, number_of_study_related_instances) VALUES ($1, $2, 2)",
        patient_pk,
        held.study_instance_uid,
    )
    await register(db_pool, REMOTE, orthanc.dicom_port)
    async with prefetching(db_pool, settings()):
        await add_item(db_pool, worklist_item("PF-SVC-2"))
        [job] = await wait_for_jobs(db_pool, 1)
    assert job.state is JobState.DONE, job.error
    assert outcomes(job) == {held.study_instance_uid: "skipped-local", missing.study_instance_uid: "moved"}
    got = received_uids(receiver)
    assert not sop_uids(held) & set(got)
    assert all(got[uid] == 1 for uid in sop_uids(missing))


async def test_unreachable_remote_is_retried_then_reported_failed(db_pool: asyncpg.Pool) -> None:
    await register(db_pool, "DOWN", find_free_port())  # nothing listens there
    job = await JobRepository(db_pool).create(
        JobKind.PREFETCH, {"patient_id": "PF-SVC-3", "source": "DOWN", "trigger": "on-demand"}
    )
    async with prefetching(db_pool, settings(sources=[])) as registry:
        [ended] = await wait_for_jobs(db_pool, 1)
    assert ended.id == job.id
    assert ended.state is JobState.FAILED
    assert ended.attempts == 3
    assert ended.error is not None
    assert "association refused by DOWN" in ended.error and "connection refused" in ended.error
    assert "after 3 attempts" in ended.error
    assert registry.get_sample_value("pacs_prefetch_jobs_total", {"outcome": "retried"}) == 2
    assert registry.get_sample_value("pacs_prefetch_jobs_total", {"outcome": "failed"}) == 1


async def test_unregistered_source_fails_with_the_reason(db_pool: asyncpg.Pool) -> None:
    await JobRepository(db_pool).create(JobKind.PREFETCH, {"patient_id": "PF-SVC-4"})
    async with prefetching(db_pool, settings(sources=["NOWHERE"], max_attempts=1)):
        [job] = await wait_for_jobs(db_pool, 1)
    assert job.state is JobState.FAILED
    assert job.error is not None and "NOWHERE is not a registered node" in job.error


async def test_two_replicas_run_every_job_once(
    db_pool: asyncpg.Pool,
    database_settings: DatabaseSettings,
    orthanc: OrthancServer,
    receiver: ReferenceReceiver,
    tmp_path: Path,
) -> None:
    patients = [f"PF-SVC-R{n}" for n in range(4)]
    studies = [
        study
        for patient in patients
        for study in priors(
            orthanc, tmp_path, patient, [(f"{THIS_YEAR - 1}0101", "CT", 1), (f"{THIS_YEAR - 2}0101", "CT", 1)]
        )
    ]
    await register(db_pool, REMOTE, orthanc.dicom_port)
    other_pool = await create_pool(database_settings, application_name="prefetch-replica-2")
    try:
        config = settings(max_concurrent_jobs=2)
        async with prefetching(db_pool, config) as one, prefetching(other_pool, config) as two:
            for patient in patients:
                await add_item(db_pool, worklist_item(patient))
            jobs = await wait_for_jobs(db_pool, len(patients))
    finally:
        await other_pool.close()
    assert len(jobs) == len(patients)
    assert all(j.state is JobState.DONE and j.attempts == 1 for j in jobs)
    assert await db_pool.fetchval("SELECT count(*) FROM prefetch_request") == len(patients)
    moves = Counter(
        s["study_instance_uid"] for j in jobs for s in j.params["studies"] for _ in range(s["moves"])
    )
    assert moves == Counter({s.study_instance_uid: 1 for s in studies})
    got = received_uids(receiver)
    assert all(got[uid] == 1 for s in studies for uid in sop_uids(s))
    ran = [r.get_sample_value("pacs_prefetch_jobs_total", {"outcome": "done"}) or 0 for r in (one, two)]
    assert sum(ran) == len(patients)


async def test_process_reports_health_and_metrics(
    database_settings: DatabaseSettings, db_pool: asyncpg.Pool
) -> None:
    stop = asyncio.Event()
    services = SchedulerServices()
    task = asyncio.create_task(
        run(
            settings(),
            database_settings,
            BrokerSettings(),
            StorageTiersSettings(),
            stop=stop,
            services=services,
            parts=("prefetch",),
        )
    )
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 30
            while True:
                if services.http_port is not None:
                    with contextlib.suppress(httpx.HTTPError):
                        ready = await http.get(f"http://127.0.0.1:{services.http_port}/health/ready")
                        if ready.status_code == 200:
                            break
                assert time.monotonic() < deadline, "not ready"
                await asyncio.sleep(0.1)
            metrics = (await http.get(f"http://127.0.0.1:{services.http_port}/metrics")).text
        assert "pacs_prefetch_duration_seconds" in metrics
        assert services.parts == ["prefetch"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_part_that_fails_stops_the_others_and_the_process() -> None:
    stopped_cleanly: list[str] = []

    async def steady(stop: asyncio.Event) -> None:
        await stop.wait()
        stopped_cleanly.append("steady")

    async def broken(stop: asyncio.Event) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    with pytest.raises(PartCrashedError, match="broken failed"):
        await run_parts({"steady": steady, "broken": broken}, asyncio.Event())
    assert stopped_cleanly == ["steady"]

    async def quits(stop: asyncio.Event) -> None:
        return

    with pytest.raises(PartCrashedError, match="quits ended"):
        await run_parts({"steady": steady, "quits": quits}, asyncio.Event())


def scheduled_at(patient_id: str, start: datetime, status: str = "SCHEDULED") -> dict[str, Any]:
    item = worklist_item(patient_id)
    step = item["00400100"]["Value"][0]
    step["00400002"] = {"vr": "DA", "Value": [start.strftime("%Y%m%d")]}
    step["00400003"] = {"vr": "TM", "Value": [start.strftime("%H%M%S")]}
    step["00400020"] = {"vr": "CS", "Value": [status]}
    return item


async def test_items_are_prefetched_once_due(db_pool: asyncpg.Pool, orthanc: OrthancServer) -> None:
    await register(db_pool, REMOTE, orthanc.dicom_port)
    now = datetime.now()
    [soon] = await add_item(db_pool, scheduled_at("PF-SVC-DUE-1", now + timedelta(hours=1)))
    await add_item(db_pool, scheduled_at("PF-SVC-DUE-2", now + timedelta(days=10)))
    await add_item(db_pool, scheduled_at("PF-SVC-DUE-3", now + timedelta(hours=1), status="COMPLETED"))
    async with prefetching(db_pool, settings(on_create=False, lead_time_hours=4)):
        [job] = await wait_for_jobs(db_pool, 1)
        await asyncio.sleep(0.5)  # a few more scans: still nothing for the others
    assert (job.params["worklist_item"], job.params["trigger"], job.state) == (soon.pk, "due", JobState.DONE)
    assert job.params["studies"] == []  # no priors at the remote
    _, jobs = await JobRepository(db_pool).list(kinds=frozenset({JobKind.PREFETCH}))
    assert len(jobs) == 1


async def test_a_job_left_running_by_a_dead_replica_is_taken_over(
    db_pool: asyncpg.Pool, orthanc: OrthancServer, receiver: ReferenceReceiver, tmp_path: Path
) -> None:
    [prior] = priors(orthanc, tmp_path, "PF-SVC-5", [(f"{THIS_YEAR - 1}0101", "CT", 1)])
    await register(db_pool, REMOTE, orthanc.dicom_port)
    job = await JobRepository(db_pool).create(JobKind.PREFETCH, {"patient_id": "PF-SVC-5"})
    # Claimed by a replica that then died: running, silent for a minute.
    await db_pool.execute(
        "UPDATE job SET state = 'running', attempts = 1, params = params || '{\"attempt\": 1}', "
        "updated_at = now() - interval '1 minute' WHERE id = $1",
        job.id,
    )
    async with prefetching(db_pool, settings(stale_after_seconds=5)):
        [ended] = await wait_for_jobs(db_pool, 1)
    assert (ended.state, ended.attempts) == (JobState.DONE, 2)
    assert outcomes(ended) == {prior.study_instance_uid: "moved"}
    assert all(received_uids(receiver)[uid] == 1 for uid in sop_uids(prior))


async def test_without_sources_nothing_is_queried(db_pool: asyncpg.Pool) -> None:
    await add_item(db_pool, worklist_item("PF-SVC-6"))
    job = await JobRepository(db_pool).create(JobKind.PREFETCH, {"patient_id": "PF-SVC-6"})
    async with prefetching(db_pool, settings(sources=[])):
        [ended] = await wait_for_jobs(db_pool, 1)
        await asyncio.sleep(0.5)  # a few scans: the worklist item calls for nothing
    assert (ended.id, ended.state, ended.attempts) == (job.id, JobState.FAILED, 1)
    assert ended.error is not None and ended.error.startswith("no remote PACS to query")
    assert await db_pool.fetchval("SELECT count(*) FROM prefetch_request") == 0


async def test_a_cancelled_job_stops_moving(
    db_pool: asyncpg.Pool, orthanc: OrthancServer, receiver: ReferenceReceiver, tmp_path: Path
) -> None:
    studies = priors(orthanc, tmp_path, "PF-SVC-7", [(f"{THIS_YEAR - n}0101", "CT", 1) for n in (1, 2, 3)])
    await register(db_pool, REMOTE, orthanc.dicom_port)
    jobs = JobRepository(db_pool)
    job = await jobs.create(JobKind.PREFETCH, {"patient_id": "PF-SVC-7"})
    # Moves to the remote are spaced 3 s apart: time to cancel after the first
    # (two start side by side; the first to get its turn goes first).
    config = settings(remote_min_move_interval_seconds=3, stale_after_seconds=2.5)
    async with prefetching(db_pool, config):
        deadline = time.monotonic() + 30
        while (current := await jobs.get(job.id)) is not None and current.progress_done < 1:
            assert time.monotonic() < deadline, current
            await asyncio.sleep(0.05)
        await jobs.cancel(job.id)
        await asyncio.sleep(4)  # past the second move's turn
    ended = await jobs.get(job.id)
    assert ended is not None and ended.state is JobState.CANCELLED
    [moved] = [s["study_instance_uid"] for s in ended.params["studies"] if s["moves"]]
    got = received_uids(receiver)
    for study in studies:
        expected = 1 if study.study_instance_uid == moved else 0
        assert all(got[uid] == expected for uid in sop_uids(study))
