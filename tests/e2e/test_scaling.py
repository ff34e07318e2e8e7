"""Several gateway processes share one DICOM port (SO_REUSEPORT) and several
workers share the ingest queue: parallel senders, nothing indexed twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import BackgroundStore, echoscu, store_outcomes
from pacs_e2e.index import IndexReader
from pacs_e2e.metrics import scrape, wait_until_drained
from pacs_e2e.system import running_system

ASSOCIATIONS = 16


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with running_system(tmp_path_factory.mktemp("pacs-scaling"), gateways=2, workers=2) as system:
        yield system


@pytest.fixture(scope="module")
def index(pacs: LocalSystem) -> IndexReader:
    return IndexReader(pacs.database_url)


def _accepted(url: str) -> float:
    return scrape(url).get(("pacs_dimse_associations_total", (("outcome", "accepted"),)), 0.0)


def test_gateways_share_the_port(pacs: LocalSystem) -> None:
    for _ in range(ASSOCIATIONS):
        assert echoscu(pacs.gateway_port, called=pacs.ae_title).returncode == 0
    served = [_accepted(g.metrics_url) for g in pacs.gateways]
    assert sum(served) == ASSOCIATIONS
    # the kernel spreads connections over the listeners; with 16 that all land
    # on one process has a chance of 1 in 32768
    assert all(n > 0 for n in served), served


def test_parallel_senders_are_indexed_exactly_once(
    pacs: LocalSystem, index: IndexReader, tmp_path: Path
) -> None:
    paths = write_ct_series(tmp_path / "ct", 240, rows=128, columns=128, patient_id="PARALLEL", seed=31)
    senders = [BackgroundStore(pacs.gateway_port, paths[i::4], called=pacs.ae_title) for i in range(4)]
    outcomes: dict[str, str] = {}
    for sender in senders:
        outcomes.update(store_outcomes(sender.wait()))
    assert len(outcomes) == 240 and set(outcomes.values()) == {"Success"}

    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    rows = index.wait_for_instances(uids)
    wait_until_drained(pacs)
    assert len(rows) == 240
    study = index.fetch(
        "SELECT number_of_study_related_instances AS n FROM study WHERE study_instance_uid = $1",
        next(iter(rows.values()))["study_instance_uid"],
    )
    assert study[0]["n"] == 240
    handled = [
        sum(v for (name, _), v in scrape(w.metrics_url).items() if name == "pacs_ingest_instances_total")
        for w in pacs.workers
    ]
    assert sum(handled) == 240, "an instance was handled twice or not at all"
