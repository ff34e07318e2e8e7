"""Storage tier migration, the whole system as processes: hot = the local
directory, warm = S3 STANDARD_IA (moto server), cold = Azure Archive
(Azurite), two hsm-migrator replicas.

A study arrives over storescu; the policy (hot → warm at once) moves it
while both replicas run, each instance exactly once; WADO-RS serves it from
warm.  An administrator moves it to cold through the REST API; the index
says NEARLINE, the objects are archived; a WADO-RS request asks for a
restore, which a migrator carries out, and the instance is served again.
``pacs hsm status`` and the migrators' metrics agree with the index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from pacs_common.db.pool import create_pool
from pacs_common.hsm.testing import consistency_problems
from pacs_common.localrun.runner import LocalSystem
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import (
    MOTO_ACCESS_KEY,
    MOTO_SECRET_KEY,
    AzuriteServer,
    MotoServer,
    unique_name,
)
from pacs_e2e.corpus import SeriesSpec, write_study
from pacs_e2e.dcmtk import storescu
from pacs_e2e.dicomweb import bearer_session, create_api_token
from pacs_e2e.index import IndexReader
from pacs_e2e.metrics import scrape
from pacs_e2e.system import pacs_cli, running_system

IMAGES = 40


@pytest.fixture(scope="module")
def names(moto_server: MotoServer) -> dict[str, str]:
    bucket = unique_name("warm")
    moto_server.create_bucket(bucket)
    return {"bucket": bucket, "container": unique_name("cold")}


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory,
    moto_server: MotoServer,
    azurite: AzuriteServer,
    names: dict[str, str],
) -> Iterator[LocalSystem]:
    env = {
        "PACS_STORAGE_TIERS": "hot,warm,cold",
        "PACS_STORAGE_WARM_BACKEND": "s3",
        "PACS_STORAGE_WARM_S3_ENDPOINT_URL": moto_server.url,
        "PACS_STORAGE_WARM_S3_BUCKET": names["bucket"],
        "PACS_STORAGE_WARM_S3_ACCESS_KEY_ID": MOTO_ACCESS_KEY,
        "PACS_STORAGE_WARM_S3_SECRET_ACCESS_KEY": MOTO_SECRET_KEY,
        "PACS_STORAGE_WARM_S3_STORAGE_CLASS": "STANDARD_IA",
        "PACS_STORAGE_COLD_BACKEND": "azure",
        "PACS_STORAGE_COLD_AZURE_CONNECTION_STRING": azurite.connection_string,
        "PACS_STORAGE_COLD_AZURE_CONTAINER": names["container"],
        "PACS_STORAGE_COLD_AZURE_ACCESS_TIER": "Archive",
        "PACS_HSM_RULES": '[{"from_tier": "hot", "to_tier": "warm", "min_study_age_days": 0}]',
        "PACS_HSM_INTERVAL_SECONDS": "1",
        "PACS_HSM_JOB_POLL_SECONDS": "0.2",
        "PACS_HSM_BATCH_SIZE": "5",
        "PACS_RESTORE_CHECK_INTERVAL_SECONDS": "0",
    }
    with running_system(tmp_path_factory.mktemp("pacs-hsm"), hsm_migrators=2, extra_env=env) as system:
        yield system


@pytest.fixture(scope="module")
def tiers(
    pacs: LocalSystem, moto_server: MotoServer, azurite: AzuriteServer, names: dict[str, str]
) -> Iterator[StorageRegistry]:
    registry = StorageRegistry(
        {
            "hot": FilesystemStorage(pacs.storage_path),
            "warm": S3Storage(names["bucket"], client=moto_server.client()),
            "cold": AzureBlobStorage.from_connection_string(azurite.connection_string, names["container"]),
        }
    )
    yield registry
    registry.close()


def _wait(check: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _problems(pacs: LocalSystem, tiers: StorageRegistry) -> list[str]:
    async def run() -> list[str]:
        pool = await create_pool(DatabaseSettings(url=pacs.database_url, pool_min_size=0, pool_max_size=2))
        try:
            return await consistency_problems(pool, tiers)
        finally:
            await pool.close()

    return asyncio.run(run())


def _migrated(pacs: LocalSystem, source: str, target: str) -> float:
    total = 0.0
    for service in (s for s in pacs.services if s.kind.key == "hsm"):
        for (name, labels), value in scrape(service.metrics_url).items():
            if name == "pacs_hsm_migrated_instances_total" and dict(labels) == {
                "source": source,
                "target": target,
            }:
                total += value
    return total


def test_policy_then_rest_job_then_restore(pacs: LocalSystem, tiers: StorageRegistry, tmp_path: Path) -> None:
    index = IndexReader(pacs.database_url)
    study = write_study(
        tmp_path / "corpus",
        patient_id="HSM-1",
        patient_name="Tier^Tom",
        study_date="20200101",
        accession_number="HSM-A1",
        series=[SeriesSpec("CT", IMAGES // 2), SeriesSpec("MR", IMAGES // 2)],
    )
    sent = storescu(pacs.gateway_port, study.paths)
    assert sent.returncode == 0, sent.output
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in study.paths}
    index.wait_for_instances(uids)

    def locations() -> dict[str, dict[str, Any]]:
        rows = index.fetch(
            """
            SELECT i.sop_instance_uid, l.tier, l.backend, i.availability FROM instance i
            JOIN instance_location l ON l.instance_fk = i.pk
            """
        )
        return {r["sop_instance_uid"]: r for r in rows}

    # The policy: both replicas move the study to warm, each instance once.
    _wait(lambda: {r["tier"] for r in locations().values()} == {"warm"}, "the policy to move the study")
    moves = index.fetch(
        "SELECT instance_fk, count(*) AS n FROM hsm_move WHERE state = 'done' GROUP BY instance_fk"
    )
    assert len(moves) == IMAGES and {m["n"] for m in moves} == {1}
    assert _wait(lambda: _migrated(pacs, "hot", "warm") == IMAGES, "the migrators' counters")
    assert _problems(pacs, tiers) == []
    assert list(tiers.hot.iter_keys()) == []

    (web,) = pacs.dicomweb_services
    with bearer_session(create_api_token(pacs, "e2e-hsm", "administrator")) as session:
        series_uid, series_paths = next(iter(study.series.items()))
        path = series_paths[0]
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        instance_url = (
            f"{web.base_url}/dicom-web/studies/{study.study_instance_uid}/series/{series_uid}/instances/{sop}"
        )
        served = session.get(instance_url, timeout=30)
        assert served.status_code == 200
        assert dcmread(path).PixelData in served.content

        # An administrator sends it to the archive.
        created = session.post(
            f"{web.base_url}/api/v1/hsm/runs", json={"from_tier": "warm", "to_tier": "cold"}, timeout=30
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]

        def finished() -> dict[str, Any] | None:
            job: dict[str, Any] = session.get(f"{web.base_url}/api/v1/jobs/{job_id}", timeout=30).json()
            return job if job["state"] in ("done", "failed") else None

        job = _wait(finished, "the migration job")
        assert (job["state"], job["progress_done"], job["progress_total"]) == ("done", IMAGES, IMAGES)
        rows = locations()
        assert {(r["tier"], r["backend"], r["availability"]) for r in rows.values()} == {
            ("cold", "azure", "NEARLINE")
        }
        [study_row] = index.fetch("SELECT availability FROM study")
        assert study_row["availability"] == "NEARLINE"
        tiers_body = session.get(f"{web.base_url}/api/v1/hsm/tiers", timeout=30).json()
        assert {t["tier"]: t["instances"] for t in tiers_body} == {"hot": 0, "warm": 0, "cold": IMAGES}
        assert _problems(pacs, tiers) == []
        status = pacs_cli(pacs, "hsm", "status")
        assert status.returncode == 0, status.stderr
        assert any(line.split()[:2] == ["cold", str(IMAGES)] for line in status.stdout.splitlines())

        # Archived: a read asks for a restore, a migrator carries it out.
        refused = session.get(instance_url, timeout=30)
        assert refused.status_code == 503
        _wait(lambda: session.get(instance_url, timeout=30).status_code == 200, "the restore", timeout=60)
        assert locations()[sop]["availability"] == "ONLINE"
    assert _migrated(pacs, "warm", "cold") == IMAGES
