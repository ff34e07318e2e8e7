"""Retrieval from an archive tier, the whole system as processes.

The cold tier is an S3 bucket on the moto server whose objects are written
with storage class GLACIER (``PACS_STORAGE_COLD_S3_STORAGE_CLASS``).  A
study arrives over storescu; one of its instances is put on the cold tier
the way the hsm-migrator leaves it (object in GLACIER, the index's location
switched).  Then, with real clients: WADO-RS answers 503 with Retry-After
(never a hang or a cut body) and a restore job exists, QIDO-RS and findscu
show the instance NEARLINE, movescu gets the rest of the study with a
warning; after the restore processor ran the instance is ONLINE and served
byte for byte.  Retrievals record last access.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from pacs_common.archive.restore import RestoreProcessor
from pacs_common.archive.settings import RestoreSettings
from pacs_common.db.pool import create_pool
from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import MOTO_ACCESS_KEY, MOTO_SECRET_KEY, MotoServer, unique_name
from pacs_e2e.corpus import SeriesSpec, StudyFiles, write_study
from pacs_e2e.dcmtk import final_status, findscu, movescu, storescu
from pacs_e2e.dicomweb import bearer_session, create_api_token
from pacs_e2e.index import IndexReader
from pacs_e2e.system import pacs_cli, running_system

RETRY_AFTER = 30


@pytest.fixture(scope="module")
def bucket(moto_server: MotoServer) -> str:
    name = unique_name("cold")
    moto_server.create_bucket(name)
    return name


def _env(moto_server: MotoServer, bucket: str) -> dict[str, str]:
    return {
        "PACS_STORAGE_TIERS": "hot,cold",
        "PACS_STORAGE_COLD_BACKEND": "s3",
        "PACS_STORAGE_COLD_S3_ENDPOINT_URL": moto_server.url,
        "PACS_STORAGE_COLD_S3_BUCKET": bucket,
        "PACS_STORAGE_COLD_S3_ACCESS_KEY_ID": MOTO_ACCESS_KEY,
        "PACS_STORAGE_COLD_S3_SECRET_ACCESS_KEY": MOTO_SECRET_KEY,
        "PACS_STORAGE_COLD_S3_STORAGE_CLASS": "GLACIER",
        "PACS_RESTORE_RETRY_AFTER_SECONDS": str(RETRY_AFTER),
        "PACS_ACCESS_FLUSH_INTERVAL_SECONDS": "0.2",
    }


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, bucket: str
) -> Iterator[LocalSystem]:
    """Restores are run by the test (no hsm-migrator), so the pending state can be looked at."""
    with running_system(
        tmp_path_factory.mktemp("pacs-archive"), extra_env=_env(moto_server, bucket)
    ) as system:
        yield system


@pytest.fixture(scope="module")
def glacier(moto_server: MotoServer, bucket: str) -> Iterator[S3Storage]:
    storage = S3Storage(bucket, client=moto_server.client(), storage_class="GLACIER")
    yield storage
    storage.close()


@pytest.fixture(scope="module")
def session(pacs: LocalSystem) -> Iterator[requests.Session]:
    with bearer_session(create_api_token(pacs, "e2e-archive", "administrator")) as http:
        yield http


def _store_study(pacs: LocalSystem, index: IndexReader, directory: Path) -> tuple[StudyFiles, list[str]]:
    study = write_study(
        directory,
        patient_id="ARCH-1",
        patient_name="Glacier^Gus",
        study_date="20190101",
        accession_number="ARCH-A1",
        series=[SeriesSpec("CT", 3)],
    )
    sent = storescu(pacs.gateway_port, study.paths)
    assert sent.returncode == 0, sent.output
    uids = [_sop_uid(p) for p in study.paths]
    index.wait_for_instances(uids)
    return study, uids


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _to_cold(pacs: LocalSystem, index: IndexReader, glacier: S3Storage, sop_uid: str) -> None:
    """What the hsm-migrator does: copy to the cold tier, switch the index."""
    [row] = index.fetch(
        "SELECT l.key FROM instance_location l JOIN instance i ON i.pk = l.instance_fk WHERE i.sop_instance_uid = $1",
        sop_uid,
    )
    with FilesystemStorage(pacs.storage_path).open(row["key"]) as stream:
        glacier.put(row["key"], io.BytesIO(stream.read()))
    index.fetch(
        """
        UPDATE instance_location SET tier = 'cold', backend = 's3'
        WHERE instance_fk = (SELECT pk FROM instance WHERE sop_instance_uid = $1) RETURNING key
        """,
        sop_uid,
    )


def _restore(pacs: LocalSystem, glacier: S3Storage) -> int:
    async def run() -> int:
        pool = await create_pool(DatabaseSettings(url=pacs.database_url, pool_min_size=0))
        try:
            tiers = StorageRegistry({"hot": FilesystemStorage(pacs.storage_path), "cold": glacier})
            return await RestoreProcessor(pool, tiers, RestoreSettings(check_interval_seconds=0)).run_once()
        finally:
            await pool.close()

    return asyncio.run(run())


def _availability(pacs: LocalSystem, study: StudyFiles, tmp_path: Path) -> dict[str, str]:
    """InstanceAvailability of each instance of the (single-series) study, by findscu."""
    [series] = study.series
    result, responses = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study.study_instance_uid}",
            f"SeriesInstanceUID={series}",
            "SOPInstanceUID",
            "InstanceAvailability",
        ],
        tmp_path / "find",
    )
    assert result.returncode == 0, result.output
    return {str(r.SOPInstanceUID): str(r.InstanceAvailability) for r in responses}


def test_archived_instance_is_restored_then_retrieved(
    pacs: LocalSystem, glacier: S3Storage, session: requests.Session, tmp_path: Path
) -> None:
    index = IndexReader(pacs.database_url)
    study, uids = _store_study(pacs, index, tmp_path / "corpus")
    archived, online = uids[0], uids[1:]
    _to_cold(pacs, index, glacier, archived)
    (web,) = pacs.dicomweb_services
    [series] = study.series
    url = f"{web.base_url}/dicom-web/studies/{study.study_instance_uid}/series/{series}/instances/{archived}"

    refused = session.get(url, timeout=30)
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == str(RETRY_AFTER)
    [named] = refused.json()["detail"]["instances"]
    jobs = index.fetch(
        "SELECT id, state FROM job WHERE kind = 'restore' AND params->>'sop_instance_uid' = $1", archived
    )
    assert [(j["id"], j["state"]) for j in jobs] == [(named["restoreJobId"], "queued")]
    qido = session.get(
        f"{web.base_url}/dicom-web/studies/{study.study_instance_uid}/instances",
        params={"includefield": "00080056"},
        timeout=30,
    )
    assert {m["00080018"]["Value"][0]: m["00080056"]["Value"][0] for m in qido.json()} == {
        archived: "NEARLINE",
        **dict.fromkeys(online, "ONLINE"),
    }
    assert _availability(pacs, study, tmp_path) == {archived: "NEARLINE", **dict.fromkeys(online, "ONLINE")}
    study_retrieve = session.get(f"{web.base_url}/dicom-web/studies/{study.study_instance_uid}", timeout=30)
    assert study_retrieve.status_code == 503

    port = find_free_port()
    added = pacs_cli(pacs, "node", "add", "MOVESCU", "--host", "127.0.0.1", "--port", str(port))
    assert added.returncode == 0, added.stdout + added.stderr

    def move(into: Path) -> tuple[str, set[str]]:
        result = movescu(
            pacs.gateway_port,
            "-S",
            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}"],
            "MOVESCU",
            out_dir=into,
            receive_port=port,
            calling="MOVESCU",
        )
        return final_status(result, "Move"), {_sop_uid(p) for p in into.iterdir()}

    assert move(tmp_path / "before") == ("Warning: SubOperationsCompleteOneOrMoreFailures", set(online))

    assert _restore(pacs, glacier) == 1
    assert _availability(pacs, study, tmp_path) == dict.fromkeys(uids, "ONLINE")
    served = session.get(url, timeout=30)
    assert served.status_code == 200
    original = dcmread(study.paths[0])
    assert original.PixelData in served.content
    assert move(tmp_path / "after") == ("Success", set(uids))
    [job] = index.fetch("SELECT state FROM job WHERE kind = 'restore'")
    assert job["state"] == "done"

    # Both WADO-RS and C-MOVE recorded the access (written within a flush interval).
    for _ in range(100):
        rows = index.fetch(
            """
            SELECT i.sop_instance_uid, i.last_accessed_at, st.last_accessed_at AS study_at
            FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
            WHERE st.study_instance_uid = $1
            """,
            study.study_instance_uid,
        )
        if all(r["last_accessed_at"] is not None for r in rows):
            break
        time.sleep(0.1)
    assert all(r["last_accessed_at"] is not None and r["study_at"] is not None for r in rows)


def test_the_hsm_migrator_restores_what_a_retrieve_asked_for(
    tmp_path: Path, moto_server: MotoServer, bucket: str, glacier: S3Storage
) -> None:
    """The whole loop with the restore processor in the hsm-migrator process."""
    env = {
        **_env(moto_server, bucket),
        "PACS_HSM_INTERVAL_SECONDS": "0.5",
        "PACS_RESTORE_CHECK_INTERVAL_SECONDS": "0",
    }
    with running_system(tmp_path / "system", hsm_migrators=1, extra_env=env) as pacs:
        index = IndexReader(pacs.database_url)
        study, uids = _store_study(pacs, index, tmp_path / "corpus")
        _to_cold(pacs, index, glacier, uids[1])
        (web,) = pacs.dicomweb_services
        url = f"{web.base_url}/dicom-web/studies/{study.study_instance_uid}"
        with bearer_session(create_api_token(pacs, "e2e-hsm", "administrator")) as http:
            first = http.get(url, timeout=30)
            assert first.status_code == 503, first.text
            assert first.headers["Retry-After"] == str(RETRY_AFTER)
            for _ in range(300):
                answer = http.get(url, timeout=30)
                if answer.status_code != 503:
                    break
                time.sleep(0.2)
        assert answer.status_code == 200, answer.text
        assert all(dcmread(p).PixelData in answer.content for p in study.paths)
        for _ in range(100):
            jobs = index.fetch(
                "SELECT state, params->>'sop_instance_uid' AS uid FROM job WHERE kind = 'restore'"
            )
            if all(job["state"] == "done" for job in jobs):
                break
            time.sleep(0.1)
        assert [(job["state"], job["uid"]) for job in jobs] == [("done", uids[1])]
