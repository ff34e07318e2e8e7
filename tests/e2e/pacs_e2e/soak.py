"""Soak test: mixed DIMSE/DICOMweb load from many clients while PostgreSQL,
RabbitMQ, a worker, a gateway and the object store restart one at a time;
then a consistency check of index against acknowledgements and storage.

``make soak`` (``python -m pacs_e2e.soak --minutes 5``).  The whole PACS
runs on throwaway PostgreSQL/RabbitMQ and a hot tier on Azurite persisted on
disk, all under a temporary directory removed at the end.  Prints operations
by kind, failures by kind and status, the restarts and the consistency
result; exits 1 when anything was a violation (a non-retryable failure, an
acknowledged instance lost, duplicated or altered, an orphan or a dangling
index row).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, Field, field_validator

from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.topology import Topology
from pacs_common.settings import BrokerSettings
from pacs_common.storage.azure import AzureBlobStorage
from pacs_e2e.dcmtk import DCMTK_ENV, echoscu, tool
from pacs_e2e.dicomweb import create_api_token
from pacs_e2e.index import IndexReader
from pacs_e2e.soak_clients import Endpoints, SoakClient
from pacs_e2e.soak_consistency import Consistency, check_consistency
from pacs_e2e.soak_faults import FAULT_KINDS, FaultScheduler, PersistentAzurite, Restart
from pacs_e2e.soak_records import OPERATION_KINDS, Ledger, Verdict
from pacs_e2e.system import pacs_cli, running_system

HOT_CONTAINER = "soak-hot"
MOVE_DESTINATION = "SOAKDEST"
_PROGRESS_SECONDS = 30.0


class SoakConfig(BaseModel):
    minutes: float = Field(default=5.0, gt=0)
    clients: int = Field(default=8, ge=1)
    seed: int = 0
    faults: list[str] = Field(default_factory=lambda: list(FAULT_KINDS))
    fault_interval_seconds: float = Field(default=15.0, gt=0)
    gateways: int = Field(default=2, ge=1)
    workers: int = Field(default=2, ge=1)
    drain_timeout_seconds: float = Field(default=180.0, gt=0)
    keep: bool = False  # keep the work directory (service logs) for a post-mortem

    @field_validator("faults")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = set(value) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        return value


@dataclass
class SoakReport:
    config: SoakConfig
    ledger: Ledger
    restarts: list[Restart]
    consistency: Consistency
    generated: int
    started: float  # time.monotonic() when the load began
    seconds: float
    backlog_drained: bool
    dead_letters: int | None
    notes: list[str] = field(default_factory=list)

    def client_violations(self) -> Counter[tuple[str, Verdict, str]]:
        return Counter({k: n for k, n in self.ledger.failures().items() if k[1] == Verdict.VIOLATION})

    def violations(self) -> list[str]:
        found = [
            f"{kind} non-retryable failure {detail}: {n}"
            for (kind, _, detail), n in self.client_violations().items()
        ]
        found += [f"restart of {r.what} failed: {r.error}" for r in self.restarts if r.error]
        if self.ledger.given_up:
            found.append(f"never acknowledged after recovery: {len(self.ledger.given_up)} instances")
        if not self.backlog_drained:
            found.append("the ingest backlog did not drain within the timeout")
        return found + self.consistency.violations()

    def _violating_operations(self, limit: int = 20) -> list[str]:
        bad = [op for op in self.ledger.snapshot() if op.verdict == Verdict.VIOLATION]
        if not bad:
            return []
        lines = [f"violating operations (first {min(limit, len(bad))} of {len(bad)}):"]
        for op in bad[:limit]:
            lines.append(
                f"  t={op.at - self.started:6.1f}s {op.kind:<8} {op.detail:<40} {self._context(op.at)}"
            )
        return lines

    def _context(self, at: float) -> str:
        """The restart running at ``at``, or the last one before it."""
        before = [r for r in self.restarts if r.began <= at]
        if not before:
            return "before any restart"
        last = before[-1]
        began = last.began - self.started
        if at <= last.began + last.seconds:
            return f"during {last.what} restart (t={began:.1f}s..{began + last.seconds:.1f}s)"
        return f"{at - last.began - last.seconds:.1f}s after {last.what} restart"

    def render(self) -> str:
        c = self.config
        counts = self.ledger.counts()
        lines = [
            f"soak: {self.seconds / 60:.1f} min of load, {c.clients} clients, seed {c.seed}, "
            f"{c.gateways} gateways, {c.workers} workers; restarts every {c.fault_interval_seconds:g}s "
            f"of {', '.join(c.faults) or 'nothing'}",
            "operations (total: ok / retryable / not-yet-indexed / violation):",
        ]
        for kind in OPERATION_KINDS:
            by = [
                counts[(kind, v)] for v in (Verdict.OK, Verdict.RETRYABLE, Verdict.NOT_YET, Verdict.VIOLATION)
            ]
            lines.append(f"  {kind:<8} {sum(by):>6}: {by[0]} / {by[1]} / {by[2]} / {by[3]}")
        lines.append("failures by kind and status:")
        failures = self.ledger.failures()
        for (kind, verdict, detail), n in sorted(failures.items(), key=lambda item: (item[0][0], -item[1])):
            lines.append(f"  {kind:<8} {verdict.value:<16} {detail:<40} {n}")
        if not failures:
            lines.append("  none")
        all_retryable = not any(v == Verdict.VIOLATION for (_, v, _) in failures)
        lines.append(f"  all failures retryable: {'yes' if all_retryable else 'NO'}")
        lines.append(f"restarts ({len(self.restarts)}):")
        for restart in self.restarts:
            status = f"FAILED {restart.error}" if restart.error else "ok"
            lines.append(f"  {restart.what:<12} {restart.seconds:6.1f}s  {status}")
        ledger, k = self.ledger, self.consistency
        via = Counter(ledger.acknowledged_via.values())
        retried = sum(1 for uid in ledger.failed_attempts if uid in ledger.acknowledged)
        lines += [
            f"instances: generated {self.generated}, acknowledged {len(ledger.acknowledged)} "
            f"({', '.join(f'{n} by {v}' for v, n in sorted(via.items()))}), acknowledged after a failed "
            f"attempt {retried}, never acknowledged {len(ledger.given_up)}",
            f"consistency: acknowledged {k.acknowledged}, indexed {k.indexed} "
            f"(indexed but never acknowledged {k.indexed_not_acknowledged}), hot objects {k.objects}, "
            f"set-aside rows {k.superseded_rows}",
            f"  lost {len(k.lost)}, indexed twice {len(k.duplicated)}, dataset byte-identical "
            f"{k.byte_identical}/{k.acknowledged - len(k.lost)}, rewritten {len(k.rewritten)}, corrupted "
            f"{len(k.corrupted)}, sha256 != index {len(k.digest_mismatch)}",
            f"  orphans {len(k.orphans)} (plus {len(k.orphans_from_failed_attempts)} left by failed attempts, "
            f"allowed), dangling rows {len(k.dangling)}",
            f"  backlog drained: {'yes' if self.backlog_drained else 'NO'}; dead letters: "
            f"{'unknown' if self.dead_letters is None else self.dead_letters}",
        ]
        lines += self._violating_operations()
        lines += [f"note: {n}" for n in self.notes]
        violations = self.violations()
        lines.append("violations: " + ("none" if not violations else ""))
        lines += [f"  {v}" for v in violations]
        return "\n".join(lines)


def run_soak(config: SoakConfig, out: TextIO | None = sys.stdout) -> SoakReport:
    base = Path(tempfile.mkdtemp(prefix="pacs-soak-"))
    objectstore = PersistentAzurite(base / "azurite")
    try:
        objectstore.start()
        env = {
            "PACS_STORAGE_HOT_BACKEND": "azure",
            "PACS_STORAGE_HOT_AZURE_CONNECTION_STRING": objectstore.connection_string,
            "PACS_STORAGE_HOT_AZURE_CONTAINER": HOT_CONTAINER,
        }
        _say(out, f"soak: starting the PACS under {base}")
        with running_system(
            base / "pacs",
            gateways=config.gateways,
            workers=config.workers,
            throwaway_infra=True,
            extra_env=env,
        ) as system:
            report = _soak(system, objectstore, config, base, out)
        _say(out, "soak: PACS stopped")
        return report
    finally:
        objectstore.stop()
        if not config.keep:
            shutil.rmtree(base, ignore_errors=True)


def _soak(
    system: LocalSystem, objectstore: PersistentAzurite, config: SoakConfig, base: Path, out: TextIO | None
) -> SoakReport:
    (web,) = system.dicomweb_services[:1]
    # The token and the move destination's registration are commands against
    # the system (seconds each): side by side.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    token = pool.submit(create_api_token, system, "soak", "administrator")
    pool.shutdown(wait=False)
    with _MoveDestination(system, base / "moved"):
        endpoints = Endpoints(
            gateway_port=system.gateway_port,
            called_ae_title=system.ae_title,
            move_destination=MOVE_DESTINATION,
            dicomweb_url=f"{web.base_url}/dicom-web",
            token=token.result(),
        )
        _say(out, "soak: PACS ready; load starts")
        ledger = Ledger()
        stop = threading.Event()
        rng = random.Random(config.seed)
        clients = [
            SoakClient(n, endpoints, ledger, base / "sent", random.Random(rng.random()), stop)
            for n in range(config.clients)
        ]
        faults = FaultScheduler(
            system, objectstore, config.faults, config.fault_interval_seconds, random.Random(rng.random())
        )
        drain_deadline: list[float] = []

        def client_main(client: SoakClient) -> None:
            client.run()
            client.drain(drain_deadline[0] if drain_deadline else time.monotonic())

        threads = [threading.Thread(target=client_main, args=(c,), name=f"soak-{c.number}") for c in clients]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        faults.start()
        end = started + config.minutes * 60
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, _PROGRESS_SECONDS))
            _say(out, f"  {time.monotonic() - started:5.0f}s: {_progress(ledger, faults.restarts)}")
        faults.stop()  # the load goes on until every chosen restart happened once
        drain_deadline.append(time.monotonic() + config.drain_timeout_seconds)
        stop.set()
        seconds = time.monotonic() - started
        _say(out, "soak: load stopped; retrying unacknowledged stores and draining the backlog")
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()
        _say(out, "soak: waiting for the ingest backlog")
        drained = _wait_for_backlog(system, ledger, drain_deadline[0])
        _say(out, "soak: checking consistency")
        index = IndexReader(system.database_url)
        storage = AzureBlobStorage.from_connection_string(
            objectstore.connection_string, HOT_CONTAINER, create_container=False
        )
        try:
            failed = {uid for uid, n in ledger.failed_attempts.items() if n}
            consistency = check_consistency(index, storage, ledger.acknowledged_instances(), failed)
        finally:
            storage.close()
        _say(out, "soak: consistency checked; stopping the PACS")
        generated = len(ledger.acknowledged) + len(ledger.given_up)
        return SoakReport(
            config,
            ledger,
            faults.restarts,
            consistency,
            generated,
            started,
            seconds,
            drained,
            _dead_letters(system),
            notes=[f"work directory kept: {base}"] if config.keep else [],
        )


class _MoveDestination:
    """DCMTK storescp (forking) as the C-MOVE destination, registered as a node."""

    def __init__(self, system: LocalSystem, directory: Path) -> None:
        self._system = system
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _MoveDestination:
        self._directory.mkdir(parents=True)
        port = find_free_port()
        self._process = subprocess.Popen(
            [tool("storescp"), "--fork", "-od", str(self._directory), "-aet", MOVE_DESTINATION, str(port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while echoscu(port, called=MOVE_DESTINATION).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start")
            time.sleep(0.1)
        added = pacs_cli(
            self._system, "node", "add", MOVE_DESTINATION, "--host", "127.0.0.1", "--port", str(port)
        )
        if added.returncode != 0:
            raise RuntimeError(f"cannot register {MOVE_DESTINATION}: {added.stdout}{added.stderr}")
        return self

    def __exit__(self, *exc: object) -> None:
        import os
        import signal

        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(10)


def _wait_for_backlog(system: LocalSystem, ledger: Ledger, deadline: float) -> bool:
    """Wait until every acknowledged instance is indexed and the ingest queues are empty."""
    index = IndexReader(system.database_url)
    wanted = set(ledger.acknowledged_instances())
    while time.monotonic() < deadline:
        try:
            indexed = index.count_instances(wanted)
        except OSError:
            indexed = -1
        if indexed >= len(wanted) and _ingest_backlog(system) == 0:
            return True
        time.sleep(1.0)
    return False


def _queue_depths(system: LocalSystem) -> dict[str, int] | None:
    """Messages ready in the ingest, retry and dead-letter queues (None: broker unreachable)."""
    settings = BrokerSettings(url=system.broker_url, namespace=system.namespace)
    topology = Topology.from_settings(settings)
    names = {
        "ingest": topology.ingest_queue,
        "ingest.dead": topology.dead_letter_queue,
        **{f"ingest.retry.{i}": name for i, name in enumerate(topology.retry_queues)},
    }

    async def depths() -> dict[str, int]:
        broker = await Broker.connect(settings, declare=False)
        try:
            return {label: await broker.queue_depth(name) for label, name in names.items()}
        finally:
            await broker.close()

    try:
        return asyncio.run(depths())
    except Exception:
        return None


def _ingest_backlog(system: LocalSystem) -> int | None:
    found = _queue_depths(system)
    return None if found is None else sum(n for name, n in found.items() if name != "ingest.dead")


def _dead_letters(system: LocalSystem) -> int | None:
    found = _queue_depths(system)
    return None if found is None else found.get("ingest.dead", 0)


def _progress(ledger: Ledger, restarts: Sequence[Restart]) -> str:
    counts = ledger.counts()
    ok = sum(n for (_, v), n in counts.items() if v == Verdict.OK)
    retryable = sum(n for (_, v), n in counts.items() if v == Verdict.RETRYABLE)
    bad = sum(n for (_, v), n in counts.items() if v == Verdict.VIOLATION)
    last = restarts[-1].what if restarts else "-"
    return (
        f"{ok} ok, {retryable} retryable, {bad} violations; {len(ledger.acknowledged)} acknowledged; "
        f"{len(restarts)} restarts (last {last})"
    )


def _say(out: TextIO | None, message: str) -> None:
    if out is not None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=out, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> SoakConfig:
    parser = argparse.ArgumentParser(prog="python -m pacs_e2e.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help="how long the load runs (default 5; it goes on until each chosen restart happened once)",
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of operation and restart choices")
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated dependencies to restart, in turn (default {','.join(FAULT_KINDS)}; '' for none)",
    )
    parser.add_argument(
        "--fault-interval", type=float, default=15.0, help="seconds between one restart's end and the next"
    )
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="seconds to wait for the backlog")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args(argv)
    return SoakConfig(
        minutes=args.minutes,
        clients=args.clients,
        seed=args.seed,
        faults=[f for f in args.faults.split(",") if f],
        fault_interval_seconds=args.fault_interval,
        gateways=args.gateways,
        workers=args.workers,
        drain_timeout_seconds=args.drain_timeout,
        keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("pynetdicom", "azure"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    report = run_soak(config)
    print(report.render(), flush=True)
    return 1 if report.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
