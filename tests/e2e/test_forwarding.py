"""Routing / auto-forward, the whole system as processes.

A DCMTK ``storescp`` (bit-preserving) is registered with ``pacs node add``,
a rule "CT → storescp" is added over the REST API, a study with a CT and an
MR series arrives over ``storescu`` at our gateway; the prefetch-scheduler's
forwarder sends the CT instances, byte for byte, and not the MR ones, and
the forward job is listed done in ``/api/v1/jobs``.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from pydicom import dcmread

from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import SeriesSpec, dataset_bytes, write_study
from pacs_e2e.dcmtk import DCMTK_ENV, echoscu, storescu, tool
from pacs_e2e.dicomweb import bearer_session, create_api_token
from pacs_e2e.system import SERVER_AMQP_URL, pacs_cli, running_system

DESTINATION = "FWDSCP"
FORWARD_ENV = {
    "PACS_FORWARD_AE_TITLE": "PACS",
    "PACS_FORWARD_POLL_INTERVAL_SECONDS": "0.2",
    "PACS_FORWARD_RETRY_BASE_DELAY_SECONDS": "0.5",
    "PACS_FORWARD_RETRY_MAX_DELAY_SECONDS": "2",
}


async def _delete_queue(namespace: str) -> None:
    """The forwarding queue is not in pacs_common's Topology, so the system's teardown leaves it."""
    connection = await aio_pika.connect(SERVER_AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(f"{namespace}forwarding")
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with running_system(
        tmp_path_factory.mktemp("pacs-forward"), prefetch_schedulers=1, extra_env=FORWARD_ENV
    ) as system:
        namespace = system.namespace
        yield system
    asyncio.run(_delete_queue(namespace))


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, directory = find_free_port(), tmp_path / "received"
    directory.mkdir()
    proc = subprocess.Popen(
        [tool("storescp"), "+B", "+uf", "+xa", "-od", str(directory), "-aet", DESTINATION, str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while echoscu(port, called=DESTINATION).returncode != 0:
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)
        yield port, directory
    finally:
        proc.terminate()
        proc.wait(10)


def _received(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in directory.iterdir():
        try:
            found[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
        except Exception:  # still being written
            continue
    return found


def test_received_ct_is_forwarded_to_storescp(
    pacs: LocalSystem, storescp: tuple[int, Path], tmp_path: Path
) -> None:
    port, directory = storescp
    added = pacs_cli(pacs, "node", "add", DESTINATION, "--host", "127.0.0.1", "--port", str(port))
    assert added.returncode == 0, added.stdout + added.stderr
    [web] = pacs.dicomweb_services
    api = f"{web.base_url}/api/v1"
    with bearer_session(create_api_token(pacs, "e2e-forward", "administrator")) as http:
        rule = http.post(
            f"{api}/routing-rules",
            json={"name": "CT to storescp", "condition": {"modality": "CT"}, "destinations": [DESTINATION]},
            timeout=30,
        )
        assert rule.status_code == 201, rule.text

        study = write_study(
            tmp_path / "study",
            patient_id="FWD-E2E",
            patient_name="Forward^E2E",
            study_date="20261204",
            accession_number="FWD1",
            series=[SeriesSpec("CT", 3), SeriesSpec("MR", 2)],
        )
        ct = [p for p in study.paths if dcmread(p, stop_before_pixels=True).Modality == "CT"]
        sent = storescu(pacs.gateway_port, study.paths, calling="MODALITY")
        assert sent.returncode == 0, sent.output

        ct_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct}
        deadline = time.monotonic() + 120
        while set(_received(directory)) != ct_uids:
            assert time.monotonic() < deadline, f"forwarded: {sorted(_received(directory))}"
            time.sleep(0.2)
        received = _received(directory)
        for path in ct:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(received[uid]) == dataset_bytes(path)

        def forward_jobs() -> list[dict[str, object]]:
            listed = http.get(f"{api}/jobs", params={"kind": "forward"}, timeout=30)
            assert listed.status_code == 200, listed.text
            items: list[dict[str, object]] = listed.json()["items"]
            return items

        deadline = time.monotonic() + 60
        while not (jobs := forward_jobs()) or any(j["state"] != "done" for j in jobs):
            assert time.monotonic() < deadline, jobs
            time.sleep(0.2)
        assert sum(int(str(j["progress_done"])) for j in jobs) == len(ct)
        assert {j["params"]["destination"] for j in jobs} == {DESTINATION}  # type: ignore[index]
    assert len(list(directory.iterdir())) == len(ct)  # the MR series stayed home
