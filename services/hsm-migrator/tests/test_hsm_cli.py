"""``pacs hsm run|status`` against the real index, with a migrator running
the jobs the command queues."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from hsm_migrator.metrics import HsmMetrics
from hsm_migrator.runner import Runner
from hsm_migrator.service import HsmService
from pacs_common.cli.main import main as pacs
from pacs_common.hsm.settings import HsmSettings
from pacs_common.hsm.testing import build_test_tiers, seed_instances
from pacs_common.jobs import JobRepository, JobState
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.testing.storage_servers import AzuriteServer, MotoServer


@pytest.fixture
def tiers(tmp_path: Path, moto_server: MotoServer, azurite: AzuriteServer) -> Iterator[StorageRegistry]:
    registry = build_test_tiers(
        tmp_path / "hot", s3_endpoint=moto_server.url, azure_connection_string=azurite.connection_string
    )
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_settings: DatabaseSettings) -> None:
    monkeypatch.setenv("PACS_DB_URL", database_settings.url)
    monkeypatch.setenv("PACS_STORAGE_TIERS", "hot,warm,cold")


@pytest.fixture
async def migrator(db_pool: asyncpg.Pool, tiers: StorageRegistry) -> AsyncIterator[None]:
    """A migrator loop polling for jobs, in the test's event loop."""
    settings = HsmSettings(job_poll_seconds=0.05, interval_seconds=3600, restores_enabled=False)
    runner = Runner(db_pool, tiers, settings, owner="cli-test")
    service = HsmService(settings, db_pool, tiers, runner, HsmMetrics(CollectorRegistry()))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 30)


async def _pacs(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(pacs, ["-C", str(tmp_path), "hsm", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.usefixtures("cli_env")
async def test_run_queues_a_job(
    db_pool: asyncpg.Pool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.7"
    code, out, _ = await _pacs(
        tmp_path, capsys, "run", "--from", "hot", "--to", "cold", "--study", uid, "--json"
    )
    assert code == 0
    job = json.loads(out)
    assert (job["kind"], job["state"]) == ("migration", "queued")
    assert job["params"] == {
        "from_tier": "hot",
        "to_tier": "cold",
        "study_instance_uids": [uid],
        "dry_run": False,
    }
    code, _, err = await _pacs(tmp_path, capsys, "run", "--from", "warm", "--to", "warm")
    assert code == 1 and "from_tier and to_tier must differ" in err
    code, _, err = await _pacs(tmp_path, capsys, "run", "--to", "warm", "--study", "x.y")
    assert code == 1 and "not a UID" in err
    assert await db_pool.fetchval("SELECT count(*) FROM job") == 1


@pytest.mark.usefixtures("cli_env", "migrator")
async def test_run_wait_and_status(
    db_pool: asyncpg.Pool, tiers: StorageRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded = await seed_instances(db_pool, tiers.hot, studies=2, instances_per_series=2)
    study = seeded[0].study_instance_uid
    code, out, _ = await _pacs(tmp_path, capsys, "run", "--to", "warm", "--study", study, "--wait")
    assert code == 0, out
    assert "done: 2/2" in out.splitlines()[-1]
    code, out, _ = await _pacs(tmp_path, capsys, "status", "--json")
    assert code == 0
    status = json.loads(out)
    counts = {t["tier"]: t["instances"] for t in status["tiers"]}
    assert counts == {"hot": 2, "warm": 2, "cold": 0}
    assert status["runs"][0]["moved"] == 2
    code, out, _ = await _pacs(tmp_path, capsys, "status")
    assert code == 0 and "warm" in out and "moved 2" in out

    # A job that fails: --wait says so and exits 1.
    code, _, err = await _pacs(tmp_path, capsys, "run", "--to", "tape", "--wait", "--timeout", "30")
    assert code == 1 and "unknown storage tier 'tape'" in err
    jobs = await JobRepository(db_pool).list()
    assert {job.state for job in jobs[1]} == {JobState.DONE, JobState.FAILED}
