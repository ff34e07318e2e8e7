"""SIGTERM, as Kubernetes stops a pod: every service stops taking work,
finishes (or hands back) what it holds, and exits 0 within
PACS_SHUTDOWN_GRACE_SECONDS — and nothing is lost or stored twice.

One system for the module (all seven services); the last test stops them all.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from pacs_common.localrun.runner import LocalSystem, ServiceProcess
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import BackgroundStore, echoscu, store_outcomes
from pacs_e2e.index import IndexReader
from pacs_e2e.system import running_system

GRACE_SECONDS = 10.0
# Waiting for an exit: the grace period plus what a loaded CI machine needs to
# notice it; an exit after the grace period still fails the test below.
EXIT_WAIT_SECONDS = GRACE_SECONDS + 10.0
STOW_BOUNDARY = "graceful-shutdown-boundary"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    env = {
        "PACS_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
        "PACS_AUTH_ANONYMOUS_ROLE": "administrator",
        # Small batches: the worker still has a backlog when it is stopped.
        "PACS_WORKER_BATCH_SIZE": "8",
        "PACS_WORKER_PREFETCH": "8",
    }
    with running_system(
        tmp_path_factory.mktemp("pacs-shutdown"),
        hsm_migrators=1,
        prefetch_schedulers=1,
        ai_connectors=1,
        extra_env=env,
    ) as system:
        yield system


@pytest.fixture(scope="module")
def index(pacs: LocalSystem) -> IndexReader:
    return IndexReader(pacs.database_url)


def _service(pacs: LocalSystem, name: str) -> ServiceProcess:
    return next(s for s in pacs.services if s.name == name)


def _sigterm_and_wait(pacs: LocalSystem, name: str) -> tuple[int, float]:
    """SIGTERM one service; its exit code and how long it took."""
    service = _service(pacs, name)
    assert service.process is not None
    started = time.monotonic()
    pacs.kill_service(name, signal.SIGTERM, wait=False)
    code = service.process.wait(EXIT_WAIT_SECONDS)
    return code, time.monotonic() - started


def _series(tmp_path: Path, count: int, seed: int, rows: int = 64) -> tuple[Path, dict[str, Path]]:
    directory = tmp_path / f"series{seed}"
    paths = write_ct_series(directory, count, rows=rows, columns=rows, patient_id=f"STOP{seed}", seed=seed)
    return directory, {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def _wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _assert_indexed_once_with_intact_objects(pacs: LocalSystem, index: IndexReader, uids: set[str]) -> None:
    rows = index.wait_for_instances(uids, timeout=120)
    counted = index.fetch(
        "SELECT sop_instance_uid, count(*) AS n FROM instance WHERE sop_instance_uid = ANY($1::text[])"
        " GROUP BY sop_instance_uid",
        sorted(uids),
    )
    assert {r["sop_instance_uid"]: r["n"] for r in counted} == dict.fromkeys(uids, 1)
    located = index.fetch(
        "SELECT i.sop_instance_uid, count(l.*) AS n FROM instance i JOIN instance_location l"
        " ON l.instance_fk = i.pk WHERE i.sop_instance_uid = ANY($1::text[]) GROUP BY i.sop_instance_uid",
        sorted(uids),
    )
    assert {r["sop_instance_uid"]: r["n"] for r in located} == dict.fromkeys(uids, 1)
    hot = FilesystemStorage(pacs.storage_path)
    for uid, row in rows.items():
        with hot.open(row["key"]) as stream:
            content = stream.read()
        assert len(content) == row["size"], uid
        assert hashlib.sha256(content).hexdigest() == row["sha256"] == row["content_sha256"], uid


# -- (a) the gateway ------------------------------------------------------------


def test_gateway_finishes_the_open_association_and_takes_no_new_one(
    pacs: LocalSystem, index: IndexReader, tmp_path: Path
) -> None:
    directory, uids = _series(tmp_path, 100, seed=1)
    gateway = _service(pacs, "gateway-0")
    send = BackgroundStore(pacs.gateway_port, [directory], called=pacs.ae_title, extra=["+sd"])
    _wait_until(lambda: index.count_instances(uids) >= 5, 60, "the association to be under way")
    assert gateway.process is not None
    started = time.monotonic()
    pacs.kill_service("gateway-0", signal.SIGTERM, wait=False)
    # Not ready from the signal on (the HTTP port answers while it drains).
    _wait_until(
        lambda: httpx.get(gateway.ready_url, timeout=2).json().get("status") == "stopping",
        5,
        "readiness to say stopping",
    )
    late = echoscu(pacs.gateway_port, called=pacs.ae_title)
    result = send.wait(timeout=60)
    code = gateway.process.wait(EXIT_WAIT_SECONDS)
    elapsed = time.monotonic() - started
    print(f"gateway: exit {code} {elapsed:.2f}s after SIGTERM")

    assert late.returncode != 0, "a new association was accepted after SIGTERM"
    outcomes = store_outcomes(result)
    assert len(outcomes) == len(uids), result.output[-2000:]
    succeeded = {uid for uid, path in uids.items() if outcomes.get(str(path)) == "Success"}
    # The association in progress was allowed to finish: every file stored.
    assert succeeded == set(uids), {p: o for p, o in outcomes.items() if o != "Success"}
    assert code == 0
    assert elapsed < GRACE_SECONDS
    _assert_indexed_once_with_intact_objects(pacs, index, succeeded)
    pacs.start_service("gateway-0")


# -- (b) the ingest worker ------------------------------------------------------


def test_worker_stopped_mid_backlog_loses_and_duplicates_nothing(
    pacs: LocalSystem, index: IndexReader, tmp_path: Path
) -> None:
    directory, uids = _series(tmp_path, 200, seed=2)
    code, _ = _sigterm_and_wait(pacs, "worker-0")  # the backlog builds while no worker runs
    assert code == 0
    result = BackgroundStore(pacs.gateway_port, [directory], called=pacs.ae_title, extra=["+sd"]).wait(120)
    assert set(store_outcomes(result).values()) == {"Success"}, result.output[-2000:]
    pacs.start_service("worker-0")
    _wait_until(lambda: index.count_instances(uids) >= 1, 60, "indexing to start")
    code, elapsed = _sigterm_and_wait(pacs, "worker-0")
    indexed_at_stop = index.count_instances(uids)
    print(f"worker: exit {code} {elapsed:.2f}s after SIGTERM; {indexed_at_stop}/{len(uids)} indexed then")
    assert code == 0
    assert elapsed < GRACE_SECONDS
    pacs.start_service("worker-0")
    _assert_indexed_once_with_intact_objects(pacs, index, set(uids))


# -- (c) dicomweb-api during a STOW upload --------------------------------------


def _multipart(paths: list[Path]) -> bytes:
    parts = [
        f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
        for p in paths
    ]
    return b"".join(parts) + f"--{STOW_BOUNDARY}--\r\n".encode()


def test_dicomweb_answers_a_stow_in_flight_truthfully(
    pacs: LocalSystem, index: IndexReader, tmp_path: Path
) -> None:
    _, uids = _series(tmp_path, 8, seed=3, rows=512)  # ~4 MB
    body = _multipart(sorted(uids.values()))
    (service,) = pacs.dicomweb_services
    half_sent = threading.Event()
    outcome: dict[str, object] = {}

    def slow_body() -> Iterator[bytes]:
        chunk = 256 * 1024
        for offset in range(0, len(body), chunk):
            if offset >= len(body) // 2:
                half_sent.set()
                time.sleep(0.05)  # the rest arrives while the service is stopping
            yield body[offset : offset + chunk]

    def upload() -> None:
        try:
            response = httpx.post(
                f"{service.base_url}/dicom-web/studies",
                content=slow_body(),
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}',
                    "Accept": "application/dicom+json",
                },
                timeout=60,
            )
            outcome["status"] = response.status_code
            outcome["body"] = response.json() if response.status_code == 200 else response.text
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    client = threading.Thread(target=upload)
    client.start()
    assert half_sent.wait(60)
    code, elapsed = _sigterm_and_wait(pacs, service.name)
    client.join(60)
    print(f"dicomweb-api: exit {code} {elapsed:.2f}s after SIGTERM; STOW outcome {outcome.get('status')}")
    assert code == 0
    assert elapsed < GRACE_SECONDS
    if outcome.get("status") == 200:
        answer = outcome["body"]
        assert isinstance(answer, dict)
        referenced = {item["00081155"]["Value"][0] for item in answer["00081199"]["Value"]}
        assert "00081198" not in answer, answer  # no failures reported
        assert referenced == set(uids)
        # Success was said: every instance is stored and indexed, once.
        _assert_indexed_once_with_intact_objects(pacs, index, referenced)
    else:
        # A failure was said: fine, as long as it was not a success.
        assert "error" in outcome or outcome.get("status") != 200
    pacs.start_service(service.name)


# -- (d) every service ------------------------------------------------------------


def test_every_service_exits_zero_within_the_grace_period(pacs: LocalSystem) -> None:
    running = [s for s in pacs.services if s.alive()]
    assert {s.kind.label for s in running} == {
        "dimse-gateway",
        "ingest-worker",
        "query-service",
        "dicomweb-api",
        "hsm-migrator",
        "prefetch-scheduler",
        "ai-connector",
    }
    started = time.monotonic()
    for service in running:
        pacs.kill_service(service.name, signal.SIGTERM, wait=False)
    exits: dict[str, tuple[int, float]] = {}
    for service in running:
        assert service.process is not None
        code = service.process.wait(EXIT_WAIT_SECONDS)
        exits[service.kind.label] = (code, time.monotonic() - started)
    print("exits after SIGTERM: " + ", ".join(f"{k} {c} in {t:.2f}s" for k, (c, t) in exits.items()))
    assert {label: code for label, (code, _) in exits.items()} == dict.fromkeys(exits, 0)
    slow = {label: seconds for label, (_, seconds) in exits.items() if seconds >= GRACE_SECONDS}
    assert not slow, f"exited after the {GRACE_SECONDS:g}s grace period: {slow}"
