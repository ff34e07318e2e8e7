"""End-to-end fixtures: the PACS started as processes, driven by DCMTK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.dcmtk import dcmtk_available
from pacs_e2e.index import IndexReader
from pacs_e2e.system import running_system


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def _dcmtk() -> None:
    if not dcmtk_available():
        pytest.fail("DCMTK is not installed: run deploy/local/bootstrap.sh --test (apt package dcmtk)")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    """One gateway and two workers against the shared PostgreSQL/RabbitMQ."""
    with running_system(tmp_path_factory.mktemp("pacs"), gateways=1, workers=2) as system:
        yield system


@pytest.fixture(scope="module")
def index(pacs: LocalSystem) -> IndexReader:
    return IndexReader(pacs.database_url)
