"""Prior-study prefetch end to end: the whole PACS as processes with two
prefetch-scheduler replicas, Orthanc as the remote PACS holding the
priors, and the priors checked the way a user would: a C-FIND at our
gateway finds them.

A worklist item → the chosen priors arrive and are queryable, the one
outside the lookback is not fetched; a second item for the same patient
moves nothing again; items created at once for several patients → each
study moved once although two replicas run; on demand with ``pacs prefetch``
and ``POST /api/v1/prefetch``; a remote PACS that is down → retried, then
reported failed with the reason."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.bench_prefetch import (
    PREFETCH_ENV,
    REMOTE_AE,
    local_studies,
    prefetch_jobs,
    remote_pacs,
    schedule,
    upload_priors,
    wait_for_prefetch_jobs,
    years_ago,
)
from pacs_e2e.dicomweb import create_api_token
from pacs_e2e.index import IndexReader
from pacs_e2e.metrics import total
from pacs_e2e.orthanc import OrthancServer, orthanc_binary
from pacs_e2e.system import pacs_cli, running_system

pytestmark = pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with running_system(
        tmp_path_factory.mktemp("pacs-prefetch"), prefetch_schedulers=2, extra_env=PREFETCH_ENV
    ) as system:
        yield system


@pytest.fixture(scope="module")
def index(pacs: LocalSystem) -> IndexReader:
    return IndexReader(pacs.database_url)


@pytest.fixture(scope="module")
def orthanc(pacs: LocalSystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with remote_pacs(tmp_path_factory.mktemp("orthanc"), pacs) as server:
        yield server


def stored(pacs: LocalSystem) -> float:
    """Instances our gateway accepted (C-STORE success) so far."""
    return total(pacs, "gateway", "pacs_dimse_operations_total", operation="C-STORE", status="0x0000")


def outcomes(job: dict[str, object]) -> dict[str, str]:
    params = job["params"]
    assert isinstance(params, dict)
    return {s["study_instance_uid"]: s["outcome"] for s in params["studies"]}


def test_worklist_item_brings_the_priors_and_a_second_item_moves_nothing(
    pacs: LocalSystem, orthanc: OrthancServer, index: IndexReader, tmp_path: Path
) -> None:
    ct, mr, ancient = upload_priors(
        orthanc,
        tmp_path,
        "PF-E2E-1",
        [(years_ago(1), "CT", 3), (years_ago(3), "MR", 2), ("20050101", "CT", 1)],
    )
    before = stored(pacs)
    added = pacs_cli(pacs, "worklist", "add", "--patient-id", "PF-E2E-1", "--modality", "CT")
    assert added.returncode == 0, added.stderr
    [job] = wait_for_prefetch_jobs(index, 1)
    assert job["state"] == "done", job["error"]
    assert outcomes(job) == {ct.study_instance_uid: "moved", mr.study_instance_uid: "moved"}
    # Queryable here, with all their instances; the one outside the lookback was not fetched.
    assert local_studies(pacs, "PF-E2E-1") == {ct.study_instance_uid: 3, mr.study_instance_uid: 2}
    assert ancient.study_instance_uid not in local_studies(pacs, "PF-E2E-1")
    assert stored(pacs) - before == 5

    schedule(pacs, "PF-E2E-1", modality="MR")
    jobs = wait_for_prefetch_jobs(index, 2)
    second = jobs[-1]
    assert second["state"] == "done", second["error"]
    assert outcomes(second) == {
        ct.study_instance_uid: "skipped-local",
        mr.study_instance_uid: "skipped-local",
    }
    assert stored(pacs) - before == 5


def test_two_replicas_move_each_study_once(
    pacs: LocalSystem, orthanc: OrthancServer, index: IndexReader, tmp_path: Path
) -> None:
    patients = [f"PF-E2E-R{n}" for n in range(4)]
    studies = {
        patient: upload_priors(orthanc, tmp_path, patient, [(years_ago(1), "CT", 2), (years_ago(2), "CT", 1)])
        for patient in patients
    }
    already = len(prefetch_jobs(index))
    before = stored(pacs)
    # Five items at once (one patient twice) while both replicas scan.
    schedule(pacs, *patients, patients[0])
    jobs = wait_for_prefetch_jobs(index, already + 5)[already:]
    assert len(jobs) == 5
    assert all(j["state"] == "done" and j["attempts"] == 1 for j in jobs), jobs
    moves: Counter[str] = Counter()
    for job in jobs:
        for study in job["params"]["studies"]:
            moves[study["study_instance_uid"]] += study["moves"]
    every_study = [s for patient_studies in studies.values() for s in patient_studies]
    assert moves == Counter({s.study_instance_uid: 1 for s in every_study})
    assert stored(pacs) - before == sum(len(s.paths) for s in every_study)
    for patient, patient_studies in studies.items():
        assert local_studies(pacs, patient) == {s.study_instance_uid: len(s.paths) for s in patient_studies}


def test_on_demand_with_the_cli_and_the_rest_api(
    pacs: LocalSystem, orthanc: OrthancServer, index: IndexReader, tmp_path: Path
) -> None:
    [by_cli] = upload_priors(orthanc, tmp_path, "PF-E2E-CLI", [(years_ago(1), "CR", 1)])
    result = pacs_cli(pacs, "prefetch", "PF-E2E-CLI", "--source", REMOTE_AE, "--wait", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": done" in result.stdout
    assert f"moved          {by_cli.study_instance_uid}" in result.stdout
    assert by_cli.study_instance_uid in local_studies(pacs, "PF-E2E-CLI")

    [by_rest] = upload_priors(orthanc, tmp_path, "PF-E2E-REST", [(years_ago(2), "MR", 2)])
    technologist = create_api_token(pacs, "pf-tech", "technologist")
    (web,) = pacs.dicomweb_services
    with httpx.Client(
        base_url=f"{web.base_url}/api/v1", headers={"Authorization": f"Bearer {technologist}"}, timeout=30
    ) as http:
        created = http.post("/prefetch", json={"patient_id": "PF-E2E-REST", "source": REMOTE_AE})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        assert created.json()["state"] == "queued"
        unknown = http.post("/prefetch", json={"patient_id": "X", "source": "NOT-REGISTERED"})
        assert unknown.status_code == 422
        wait_for_prefetch_jobs(index, len(prefetch_jobs(index)))
        job = http.get(f"/prefetch/{job_id}").json()
    assert job["state"] == "done", job
    assert outcomes(job) == {by_rest.study_instance_uid: "moved"}
    assert local_studies(pacs, "PF-E2E-REST") == {by_rest.study_instance_uid: 2}


def test_remote_down_is_retried_then_reported_failed(pacs: LocalSystem, tmp_path: Path) -> None:
    with remote_pacs(tmp_path / "orthanc", pacs, aet="DOWNPACS") as down:
        upload_priors(down, tmp_path / "priors", "PF-E2E-DOWN", [(years_ago(1), "CT", 1)])
    # Orthanc has stopped.
    result = pacs_cli(pacs, "prefetch", "PF-E2E-DOWN", "--source", "DOWNPACS", "--wait", "--timeout", "120")
    assert result.returncode == 1
    assert ": failed" in result.stdout
    assert "association refused by DOWNPACS" in result.stdout
    assert "connection refused" in result.stdout
    assert "after 3 attempts" in result.stdout
    [job] = [
        j for j in prefetch_jobs(IndexReader(pacs.database_url)) if j["params"].get("source") == "DOWNPACS"
    ]
    assert (job["state"], job["attempts"]) == ("failed", 3)
