"""The whole of deploy/compose.yaml, built and started with Docker, driven by
real clients: DCMTK (C-ECHO, C-STORE, C-FIND) against the gateway replicas,
dicomweb-client (QIDO-RS, WADO-RS) against the dicomweb-api, and the
Prometheus and Grafana the file provisions.

Needs a Docker engine with Compose v2 (``make e2e-compose``); elsewhere the
module skips at once, before building anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import requests
from pydicom import dcmread

from pacs_e2e.compose import DEPLOY_DIR, ComposeStack, docker_engine_problem, running_compose_stack
from pacs_e2e.corpus import SeriesSpec, StudyFiles, write_study
from pacs_e2e.dcmtk import echoscu, findscu, storescu
from pacs_e2e.dicomweb import web_client

pytestmark = [pytest.mark.compose]

_problem = docker_engine_problem()
if _problem is not None:
    pytest.skip(_problem, allow_module_level=True)

AE_TITLE = "PACS"  # PACS_GATEWAY_AE_TITLE in compose.yaml
INSTANCES_PER_SERIES = 3
INDEX_TIMEOUT_SECONDS = 120.0
SCRAPE_TIMEOUT_SECONDS = 120.0
T = TypeVar("T")


def _eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """The first non-None answer of ``probe`` (ingest and scraping are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    with running_compose_stack(tmp_path_factory.mktemp("compose")) as running:
        yield running


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    return write_study(
        tmp_path_factory.mktemp("study"),
        patient_id="COMPOSE-1",
        patient_name="COMPOSE^STACK",
        study_date="20240105",
        accession_number="CMP0001",
        series=[SeriesSpec("CT", INSTANCES_PER_SERIES), SeriesSpec("MR", INSTANCES_PER_SERIES)],
    )


@pytest.fixture(scope="module")
def stored(stack: ComposeStack, study: StudyFiles) -> StudyFiles:
    """The study sent with storescu to the first gateway replica."""
    port = stack.gateway_ports()[0]
    result = storescu(port, study.paths, called=AE_TITLE)
    assert result.returncode == 0, result.output
    return study


@pytest.fixture(scope="module")
def token(stack: ComposeStack) -> str:
    return stack.create_api_token("compose-e2e", "administrator")


def test_every_gateway_replica_answers_c_echo(stack: ComposeStack) -> None:
    ports = stack.gateway_ports()
    assert len(ports) == 2, f"two dimse-gateway replicas on their own host ports, got {ports}"
    for port in ports:
        result = echoscu(port, called=AE_TITLE)
        assert result.returncode == 0, result.output


def test_c_find_finds_the_stored_study(stack: ComposeStack, stored: StudyFiles, tmp_path: Path) -> None:
    def probe() -> int | None:
        result, responses = findscu(
            stack.gateway_ports()[-1],  # the other replica: the index is shared
            "-S",
            [
                "QueryRetrieveLevel=STUDY",
                f"StudyInstanceUID={stored.study_instance_uid}",
                "NumberOfStudyRelatedInstances",
            ],
            tmp_path,
            called=AE_TITLE,
        )
        assert result.returncode == 0, result.output
        counts = [int(r.NumberOfStudyRelatedInstances) for r in responses]
        return counts[0] if counts and counts[0] == len(stored.paths) else None

    assert _eventually(probe, INDEX_TIMEOUT_SECONDS, "C-FIND of the stored study") == len(stored.paths)


def test_qido_finds_every_stored_instance(stack: ComposeStack, stored: StudyFiles, token: str) -> None:
    client = web_client(stack.dicomweb_url, token)
    sent = {dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in stored.paths}

    def probe() -> set[str] | None:
        found = client.search_for_instances(study_instance_uid=stored.study_instance_uid)
        uids = {str(item["00080018"]["Value"][0]) for item in found}
        return uids if uids == sent else None

    assert _eventually(probe, INDEX_TIMEOUT_SECONDS, "QIDO-RS of the stored instances") == sent


def test_wado_returns_what_was_stored(stack: ComposeStack, stored: StudyFiles, token: str) -> None:
    client = web_client(stack.dicomweb_url, token)
    path = stored.paths[-1]
    original = dcmread(path)
    _eventually(
        lambda: (
            client.search_for_instances(
                study_instance_uid=stored.study_instance_uid,
                search_filters={"SOPInstanceUID": original.SOPInstanceUID},
            )
            or None
        ),
        INDEX_TIMEOUT_SECONDS,
        "the instance in the index",
    )
    retrieved = client.retrieve_instance(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    )
    assert retrieved.SOPInstanceUID == original.SOPInstanceUID
    assert retrieved.PixelData == original.PixelData


def test_prometheus_scrapes_every_replica_of_every_service(stack: ComposeStack) -> None:
    expected = {
        name: len(stack.containers(name))
        for name in (
            "dimse-gateway",
            "ingest-worker",
            "query-service",
            "dicomweb-api",
            "hsm-migrator",
            "prefetch-scheduler",
            "ai-connector",
        )
    }
    assert expected["ingest-worker"] == 2 and expected["dimse-gateway"] == 2

    def probe() -> dict[str, int] | None:
        answer = requests.get(f"{stack.prometheus_url}/api/v1/query", params={"query": "up == 1"}, timeout=10)
        answer.raise_for_status()
        up: dict[str, int] = {}
        for sample in answer.json()["data"]["result"]:
            job = sample["metric"]["job"]
            up[job] = up.get(job, 0) + 1
        return up if all(up.get(job, 0) == count for job, count in expected.items()) else None

    _eventually(probe, SCRAPE_TIMEOUT_SECONDS, "every PACS target up in Prometheus")


def test_grafana_serves_the_repository_dashboards(stack: ComposeStack) -> None:
    dashboards = sorted((DEPLOY_DIR / "observability" / "dashboards").glob("*.json"))
    assert dashboards, "no dashboards in the repository"

    def probe() -> int | None:
        answer = requests.get(
            f"{stack.grafana_url}/api/search", params={"type": "dash-db"}, auth=("admin", "admin"), timeout=10
        )
        answer.raise_for_status()
        found = len(answer.json())
        return found if found == len(dashboards) else None

    # Grafana provisions on start and rescans the folder every 30 s.
    _eventually(probe, SCRAPE_TIMEOUT_SECONDS, f"{len(dashboards)} dashboards in Grafana")
