"""The hsm-migrator as a service: its HTTP face in-process (readiness per
tier, metrics), and as a real process killed with SIGKILL in the middle
of a migration, then a rerun that leaves the index and the tiers
consistent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry

from hsm_migrator.main import HsmServices, run
from hsm_migrator.metrics import HsmMetrics
from hsm_migrator.runner import Runner
from pacs_common.hsm.policy import selections_for_rules
from pacs_common.hsm.settings import HsmSettings, MigrationRule
from pacs_common.hsm.testing import build_test_tiers, consistency_problems, seed_instances
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import AzuriteServer, MotoServer, free_port

HOT_TO_WARM = MigrationRule(from_tier="hot", to_tier="warm", min_study_age_days=0)


@pytest.fixture
def tiers(tmp_path: Path, moto_server: MotoServer, azurite: AzuriteServer) -> Iterator[StorageRegistry]:
    registry = build_test_tiers(
        tmp_path / "hot", s3_endpoint=moto_server.url, azure_connection_string=azurite.connection_string
    )
    try:
        yield registry
    finally:
        registry.close()


async def _wait_for(check: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_service_readiness_and_metrics(
    db_pool: asyncpg.Pool, database_settings: DatabaseSettings, tiers: StorageRegistry
) -> None:
    seeded = await seed_instances(db_pool, tiers.hot, instances_per_series=4)
    settings = HsmSettings(
        http_host="127.0.0.1", http_port=0, rules=[HOT_TO_WARM], interval_seconds=0.2, job_poll_seconds=0.1
    )
    stop = asyncio.Event()
    services = HsmServices(registry=CollectorRegistry())
    task = asyncio.create_task(run(settings, database_settings, storage=tiers, stop=stop, services=services))
    try:

        async def port_known() -> bool:
            return services.http_port is not None

        await _wait_for(port_known)
        base = f"http://127.0.0.1:{services.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:

            async def ready() -> bool:
                return (await http.get("/health/ready")).status_code == 200

            await _wait_for(ready)
            checks = (await http.get("/health/ready")).json()["checks"]
            assert checks == {
                "database": "ok",
                "storage:hot": "ok",
                "storage:warm": "ok",
                "storage:cold": "ok",
            }

            async def migrated() -> bool:
                text = (await http.get("/metrics")).text
                return 'pacs_hsm_tier_instances{tier="warm"} 4.0' in text

            await _wait_for(migrated)
            text = (await http.get("/metrics")).text
            assert 'pacs_hsm_migrated_instances_total{source="hot",target="warm"} 4.0' in text
            total = sum(i.size for i in seeded)
            assert f'pacs_hsm_migrated_bytes_total{{source="hot",target="warm"}} {float(total)}' in text
            assert 'pacs_hsm_tier_instances{tier="hot"} 0.0' in text
            assert f'pacs_hsm_tier_bytes{{tier="warm"}} {float(total)}' in text
            assert 'pacs_hsm_migration_duration_seconds_count{source="hot",target="warm"} 4.0' in text

            # A tier that stops working makes the migrator not ready.
            warm = tiers.get("warm")
            assert isinstance(warm, S3Storage)
            for key in list(warm.iter_keys()):
                warm.delete(key)
            warm.client.delete_bucket(Bucket=warm.bucket)
            response = await http.get("/health/ready")
            assert response.status_code == 503
            assert response.json()["checks"]["storage:warm"] == "failing"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _process_env(
    tiers: StorageRegistry, database_settings: DatabaseSettings, moto_url: str, azure: str
) -> dict[str, str]:
    hot, warm, cold = tiers.get("hot"), tiers.get("warm"), tiers.get("cold")
    assert (
        isinstance(hot, FilesystemStorage)
        and isinstance(warm, S3Storage)
        and isinstance(cold, AzureBlobStorage)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    env.update(
        {
            "PACS_DB_URL": database_settings.url,
            "PACS_STORAGE_TIERS": "hot,warm,cold",
            "PACS_STORAGE_HOT_BACKEND": "filesystem",
            "PACS_STORAGE_HOT_PATH": str(hot.root),
            "PACS_STORAGE_HOT_FSYNC": "false",
            "PACS_STORAGE_WARM_BACKEND": "s3",
            "PACS_STORAGE_WARM_S3_ENDPOINT_URL": moto_url,
            "PACS_STORAGE_WARM_S3_BUCKET": warm.bucket,
            "PACS_STORAGE_WARM_S3_ACCESS_KEY_ID": "testing",
            "PACS_STORAGE_WARM_S3_SECRET_ACCESS_KEY": "testing",
            "PACS_STORAGE_WARM_S3_STORAGE_CLASS": "STANDARD_IA",
            "PACS_STORAGE_COLD_BACKEND": "azure",
            "PACS_STORAGE_COLD_AZURE_CONNECTION_STRING": azure,
            "PACS_STORAGE_COLD_AZURE_CONTAINER": cold.container.container_name,
            "PACS_STORAGE_COLD_AZURE_ACCESS_TIER": "Archive",
            "PACS_HSM_HTTP_HOST": "127.0.0.1",
            "PACS_HSM_HTTP_PORT": str(free_port()),
            "PACS_HSM_RULES": "[" + HOT_TO_WARM.model_dump_json() + "]",
            "PACS_HSM_BATCH_SIZE": "4",
            "PACS_HSM_CONCURRENCY": "2",
            "PACS_HSM_LEASE_SECONDS": "1",
            "PACS_TELEMETRY_LOG_LEVEL": "WARNING",
        }
    )
    return env


async def test_sigkill_mid_migration_then_rerun(  # noqa: PLR0917 - fixtures
    db_pool: asyncpg.Pool,
    database_settings: DatabaseSettings,
    tiers: StorageRegistry,
    moto_server: MotoServer,
    azurite: AzuriteServer,
    tmp_path: Path,
) -> None:
    seeded = await seed_instances(db_pool, tiers.hot, studies=8, instances_per_series=25, pixel_bytes=50_000)
    total = len(seeded)
    env = _process_env(tiers, database_settings, moto_server.url, azurite.connection_string)
    log = (tmp_path / "hsm-migrator.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hsm_migrator", env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:

        async def some_moved() -> bool:
            assert process.returncode is None, (tmp_path / "hsm-migrator.log").read_text()[-3000:]
            done = await db_pool.fetchval("SELECT count(*) FROM hsm_move WHERE state = 'done'")
            return int(done) >= 20

        await _wait_for(some_moved, seconds=60)
        process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()
    done_at_kill = int(await db_pool.fetchval("SELECT count(*) FROM hsm_move WHERE state = 'done'"))
    assert done_at_kill < total, "the migration finished before the kill; make it bigger"
    # Killed mid-way: every location still names a valid object.
    problems = [
        p for p in await consistency_problems(db_pool, tiers) if "leftover" not in p and "open" not in p
    ]
    assert problems == []

    await asyncio.sleep(1.1)  # the dead process's leases expire
    settings = HsmSettings(rules=[HOT_TO_WARM], batch_size=20, concurrency=4)
    runner = Runner(db_pool, tiers, settings, owner="rerun", metrics=HsmMetrics(CollectorRegistry()))
    result = await runner.run_pass(selections_for_rules(settings.rules), trigger="policy")
    assert result.failed == 0
    assert await consistency_problems(db_pool, tiers) == []
    tiers_now = {r["tier"] for r in await db_pool.fetch("SELECT tier FROM instance_location")}
    assert tiers_now == {"warm"}
    once = await db_pool.fetch(
        "SELECT instance_fk, count(*) AS n FROM hsm_move WHERE state = 'done' GROUP BY instance_fk"
    )
    assert len(once) == total and {int(r["n"]) for r in once} == {1}
