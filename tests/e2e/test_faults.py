"""Faults during ingest, each with zero instances lost or duplicated.

These start their own PostgreSQL and RabbitMQ (throwaway, own ports and data
directories) so they can stop and restart them without touching anything
else on the machine.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import BackgroundStore, store_outcomes, storescu
from pacs_e2e.index import IndexReader
from pacs_e2e.system import running_system

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with running_system(tmp_path_factory.mktemp("pacs-faults"), throwaway_infra=True) as system:
        yield system


def _series(tmp_path: Path, count: int, seed: int) -> tuple[Path, dict[str, Path]]:
    directory = tmp_path / f"series{seed}"
    paths = write_ct_series(directory, count, rows=64, columns=64, patient_id=f"FAULT{seed}", seed=seed)
    return directory, {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def _wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _assert_exactly_once(index: IndexReader, uids: dict[str, Path]) -> None:
    rows = index.wait_for_instances(uids, timeout=180)
    assert len(rows) == len(uids)
    series = {r["series_instance_uid"] for r in rows.values()}
    assert len(series) == 1
    counts = index.fetch(
        "SELECT number_of_series_related_instances AS n FROM series WHERE series_instance_uid = $1",
        series.pop(),
    )
    assert counts[0]["n"] == len(uids), "series aggregate counts an instance twice or misses one"


def test_worker_killed_mid_send(pacs: LocalSystem, index: IndexReader, tmp_path: Path) -> None:
    directory, uids = _series(tmp_path, 500, seed=101)
    send = BackgroundStore(pacs.gateway_port, [directory], called=pacs.ae_title, extra=["+sd"])
    _wait_until(lambda: index.count_instances(uids) >= 50, 120, "the first instances to be indexed")
    pacs.kill_worker(0, signal.SIGKILL)
    time.sleep(1.0)  # the gateway keeps accepting while no worker runs
    pacs.start_worker(0)
    result = send.wait()
    assert result.returncode == 0, result.output[-2000:]
    assert set(store_outcomes(result).values()) == {"Success"}
    _assert_exactly_once(index, uids)


def test_broker_stopped_during_send(pacs: LocalSystem, index: IndexReader, tmp_path: Path) -> None:
    assert pacs.rabbitmq is not None
    _, uids = _series(tmp_path, 300, seed=102)
    send = BackgroundStore(pacs.gateway_port, sorted(uids.values()), called=pacs.ae_title)
    _wait_until(lambda: index.count_instances(uids) >= 30, 120, "the first instances to be indexed")
    pacs.rabbitmq.stop()
    result = send.wait()
    outcomes = store_outcomes(result)
    succeeded = {uid for uid, path in uids.items() if outcomes.get(str(path)) == "Success"}
    failed = {uid for uid, path in uids.items() if outcomes.get(str(path)) not in (None, "Success")}
    assert failed, "storescu saw no failure although the broker was down"
    assert all(
        "Refused" in outcomes[str(uids[uid])] or "Failed" in outcomes[str(uids[uid])] for uid in failed
    )

    pacs.rabbitmq.start()
    # everything acknowledged before the outage is indexed; nothing acknowledged was lost
    index.wait_for_instances(succeeded, timeout=180)
    # the sender retries: now everything succeeds
    _wait_until(lambda: _gateway_ready(pacs), 60, "the gateway to reconnect to the broker")
    result = storescu(pacs.gateway_port, sorted(uids.values()), called=pacs.ae_title)
    assert set(store_outcomes(result).values()) == {"Success"}, result.output[-2000:]
    _assert_exactly_once(index, uids)


def _gateway_ready(pacs: LocalSystem) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(pacs.gateways[0].ready_url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_storage_unwritable(pacs: LocalSystem, index: IndexReader, tmp_path: Path) -> None:
    _, uids = _series(tmp_path, 5, seed=103)
    hot = pacs.storage_path
    away = hot.with_name(hot.name + ".away")
    hot.rename(away)
    hot.write_bytes(b"not a directory")  # every write below the tier root now fails
    try:
        result = storescu(pacs.gateway_port, sorted(uids.values()), called=pacs.ae_title)
        outcomes = store_outcomes(result)
        assert len(outcomes) == 5
        assert all(v.startswith("Refused: OutOfResources") for v in outcomes.values()), outcomes
    finally:
        hot.unlink()
        away.rename(hot)
    assert index.count_instances(uids) == 0
    result = storescu(pacs.gateway_port, sorted(uids.values()), called=pacs.ae_title)
    assert set(store_outcomes(result).values()) == {"Success"}
    _assert_exactly_once(index, uids)


def test_postgres_restarted_while_worker_runs(pacs: LocalSystem, index: IndexReader, tmp_path: Path) -> None:
    assert pacs.postgres is not None
    directory, uids = _series(tmp_path, 300, seed=104)
    send = BackgroundStore(pacs.gateway_port, [directory], called=pacs.ae_title, extra=["+sd"])
    _wait_until(lambda: index.count_instances(uids) >= 30, 120, "the first instances to be indexed")
    pacs.postgres.restart()
    result = send.wait()
    assert set(store_outcomes(result).values()) == {"Success"}, result.output[-2000:]
    _assert_exactly_once(index, uids)
    assert all(w.alive() for w in pacs.workers), "a worker died instead of riding out the restart"


@pytest.fixture(scope="module")
def index(pacs: LocalSystem) -> IndexReader:
    return IndexReader(pacs.database_url)
