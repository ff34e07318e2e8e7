"""AI end to end: the whole PACS as processes with two ai-connector replicas
and the reference inference service as a process of its own.

An administrator adds an AI rule over the REST API; a CT series sent with
DCMTK's storescu becomes stable; the connector calls the reference service,
which fetches the study over WADO-RS and answers with a DICOM Segmentation
and a measurement SR; both are stored through the ingest path into the same
study, found by findscu and retrieved with dicomweb-client — once, although
two connectors run.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import highdicom as hd
import httpx
import pytest

from ai_reference.phantom import CubePhantom
from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.dcmtk import findscu, store_outcomes, storescu
from pacs_e2e.dicomweb import create_api_token, web_client
from pacs_e2e.index import IndexReader
from pacs_e2e.system import running_system

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")
WAIT_SECONDS = 120.0


@pytest.fixture(scope="module")
def reference_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m ai_reference`` on a free port."""
    port = find_free_port()
    log = tmp_path_factory.mktemp("ai-reference") / "reference.log"
    env = {**os.environ, "AI_REFERENCE_HOST": "127.0.0.1", "AI_REFERENCE_PORT": str(port)}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "ai_reference"], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the reference service did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, reference_url: str) -> Iterator[LocalSystem]:
    # Inference services read the study as anonymous viewers; everything
    # else (the REST API, WADO-RS here) uses an administrator's API token.
    with running_system(
        tmp_path_factory.mktemp("pacs"),
        ai_connectors=2,
        extra_env={"PACS_AUTH_ANONYMOUS_ROLE": "viewer"},
    ) as system:
        yield system


def _dicomweb_url(pacs: LocalSystem) -> str:
    return pacs.dicomweb_services[0].base_url


def test_ct_study_gets_seg_and_sr_from_the_reference_service(
    pacs: LocalSystem, reference_url: str, tmp_path: Path
) -> None:
    token = create_api_token(pacs, "ai-admin", "administrator")
    api = httpx.Client(base_url=f"{_dicomweb_url(pacs)}/api/v1", headers={"Authorization": f"Bearer {token}"})
    created = api.post(
        "/ai/rules",
        json={
            "name": "bone-ct",
            "modality": "CT",
            "body_part_examined": "CHEST",
            "endpoint_url": f"{reference_url}/v1/infer",
            "timeout_seconds": 60,
            "max_attempts": 3,
        },
    )
    assert created.status_code == 201, created.text
    phantom = CubePhantom(patient_id="E2E-AI", rows=48, columns=40)
    paths = phantom.write(tmp_path / "ct")
    result = storescu(pacs.gateway_port, paths)
    assert result.returncode == 0, result.output
    assert set(store_outcomes(result).values()) == {"Success"}

    index = IndexReader(pacs.database_url)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        requests = api.get("/ai/requests").json()["items"]
        classes = {
            row["sop_class_uid"]
            for row in index.fetch(
                """SELECT i.sop_class_uid FROM instance i JOIN series se ON se.pk = i.series_fk
                   JOIN study st ON st.pk = se.study_fk WHERE st.study_instance_uid = $1""",
                phantom.study_instance_uid,
            )
        }
        if requests and requests[0]["state"] == "succeeded" and {SEG_CLASS, SR_CLASS} <= classes:
            break
        assert not (requests and requests[0]["state"] == "failed"), requests
        assert time.monotonic() < deadline, f"no results after {WAIT_SECONDS}s: {requests}"
        time.sleep(0.5)
    [request] = requests
    assert (request["rule_name"], request["study_instance_uid"]) == ("bone-ct", phantom.study_instance_uid)
    assert request["attempts"] == 1
    results = set(request["result_sop_instance_uids"])
    assert len(results) == 2
    job = api.get(f"/jobs/{request['job_id']}").json()
    assert (job["kind"], job["state"]) == ("ai", "done")

    # C-FIND: a SEG and an SR series beside the CT series, and the instances.
    _, series = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={phantom.study_instance_uid}",
            "SeriesInstanceUID",
            "Modality",
        ],
        tmp_path / "find-series",
    )
    assert sorted(str(ds.Modality) for ds in series) == ["CT", "SEG", "SR"]
    by_modality = {str(ds.Modality): str(ds.SeriesInstanceUID) for ds in series}
    _, images = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={phantom.study_instance_uid}",
            f"SeriesInstanceUID={by_modality['SEG']}",
            "SOPInstanceUID",
            "SOPClassUID",
        ],
        tmp_path / "find-images",
    )
    assert [(str(ds.SOPClassUID), str(ds.SOPInstanceUID) in results) for ds in images] == [(SEG_CLASS, True)]

    # WADO-RS with dicomweb-client: the objects read back with highdicom.
    web = web_client(_dicomweb_url(pacs), token)
    seg_ds = web.retrieve_series(phantom.study_instance_uid, by_modality["SEG"])[0]
    sr_ds = web.retrieve_series(phantom.study_instance_uid, by_modality["SR"])[0]
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.PatientID == "E2E-AI"
    source_uids = [str(ds.SOPInstanceUID) for ds in phantom.images(shuffle_seed=None)]
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[1])
    assert int(mask.sum()) == phantom.cube_voxels
    buffer = io.BytesIO()
    sr_ds.save_as(buffer, enforce_file_format=True)
    sr = hd.sr.srread(io.BytesIO(buffer.getvalue()))
    [group] = cast(hd.sr.MeasurementReport, sr.content).get_volumetric_roi_measurement_groups()
    [volume] = group.get_measurements(name=VOLUME)
    assert float(volume.value) == pytest.approx(phantom.cube_voxels * phantom.voxel_mm3)

    # The study became stable again when the results arrived: still one run.
    time.sleep(5)
    assert api.get("/ai/requests").json()["total"] == 1
    succeeded = 0.0
    for connector in (s for s in pacs.services if s.kind.key == "ai"):
        for line in httpx.get(connector.metrics_url).text.splitlines():
            if line.startswith('pacs_ai_jobs_total{outcome="succeeded"'):
                succeeded += float(line.split()[-1])
    assert succeeded == 1
