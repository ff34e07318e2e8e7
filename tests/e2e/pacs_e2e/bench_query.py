"""Query/retrieve benchmark (``python -m pacs_e2e.bench --only query``).

1. Synthesizes an index of ``--instances`` instances (default 1,000,000 in
   100,000 studies) straight into a fresh database (:mod:`pacs_e2e.synthetic_index`).
2. Starts the PACS on that database and times STUDY-level queries of seven
   kinds, ``--queries`` each (default 200), with values that exist: a
   surname prefix (``SMI*``), an infix (``*MIT*``), a PatientID, a one-month
   StudyDate range, an AccessionNumber, ModalitiesInStudy within one day,
   and ModalitiesInStudy alone — through C-FIND over ONE pynetdicom
   association, and through the query-service HTTP API (``QueryClient.find``).
   Latency is from the request to the final response (and, separately, to
   the first match).  A kind stops early when it has used ``--kind-budget``
   seconds (large result sets); the table says how many queries ran.
3. C-MOVE throughput: a 200-image CT study stored into the PACS by C-STORE
   (storescu), moved with DCMTK's movescu to DCMTK's storescp; then the same
   study stored into Orthanc and moved by Orthanc to the same storescp
   (when Orthanc is installed).

Prints figures; never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from pacs_common.db.migrate import drop_database, upgrade
from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_common.query import QueryClient
from pacs_common.query.models import QueryLevel, QueryRequest
from pacs_common.settings import DatabaseSettings
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import ReferenceReceiver, dcmtk_available, run, storescu
from pacs_e2e.index import IndexReader
from pacs_e2e.synthetic_index import SyntheticIndex, synthesize_index
from pacs_e2e.system import SERVER_AMQP_URL, SERVER_DB_URL, TEST_ENV, _delete_namespace

TARGET_P95_MS = 20.0
CALLING_AE = "QRBENCH"
DESTINATION_AE = "REFERENCE"  # ReferenceReceiver's AE title
MOVE_IMAGES = 200
MB = 1_000_000

# Study-level return keys asked for by every query (a typical viewer's list).
RETURN_KEYS = [
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]


# -- the queries ---------------------------------------------------------------


@dataclass(frozen=True)
class QueryKind:
    name: str
    # (rng, index) -> matching keys {keyword: value} for one query
    make: Callable[[random.Random, SyntheticIndex], dict[str, str]]


def _surname(rng: random.Random, index: SyntheticIndex, length: int) -> str:
    while True:
        study = index.studies[rng.randrange(len(index.studies))]
        surname = index.patient(study).surname.upper()
        if len(surname) >= length and surname.isascii() and surname.isalpha():
            return surname


def _day(value: str) -> date:
    return date(int(value[:4]), int(value[4:6]), int(value[6:]))


def _random_study(rng: random.Random, index: SyntheticIndex) -> Any:
    return index.studies[rng.randrange(len(index.studies))]


def _date_range(rng: random.Random, index: SyntheticIndex) -> dict[str, str]:
    start = _day(_random_study(rng, index).study_date)
    end = start + timedelta(days=30)
    return {"StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}"}


def _modality_day(rng: random.Random, index: SyntheticIndex) -> dict[str, str]:
    study = _random_study(rng, index)
    return {"ModalitiesInStudy": rng.choice(study.modalities), "StudyDate": study.study_date}


KINDS = [
    QueryKind("PatientName prefix SMI*", lambda rng, ix: {"PatientName": _surname(rng, ix, 3)[:3] + "*"}),
    QueryKind(
        "PatientName infix *MIT*", lambda rng, ix: {"PatientName": "*" + _surname(rng, ix, 5)[1:4] + "*"}
    ),
    QueryKind("PatientID", lambda rng, ix: {"PatientID": ix.patient(_random_study(rng, ix)).patient_id}),
    QueryKind("StudyDate 1-month range", _date_range),
    QueryKind(
        "AccessionNumber", lambda rng, ix: {"AccessionNumber": _random_study(rng, ix).accession_number}
    ),
    QueryKind("ModalitiesInStudy + 1 day", _modality_day),
    QueryKind(
        "ModalitiesInStudy alone",
        lambda rng, ix: {"ModalitiesInStudy": rng.choice(_random_study(rng, ix).modalities)},
    ),
]


def identifier(keys: dict[str, str]) -> Dataset:
    """A STUDY-level Study Root identifier: the return keys, then the matching keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def http_identifier(keys: dict[str, str]) -> dict[str, Any]:
    ds = identifier(keys)
    del ds.QueryRetrieveLevel
    del ds.SpecificCharacterSet
    return ds.to_json_dict()


# -- measuring -------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    first_seconds: float | None  # to the first match
    matches: int
    error: str | None = None
    truncated: bool = False  # the server's match cap cut the result


@dataclass
class KindResult:
    kind: str
    via: str
    samples: list[Sample] = field(default_factory=list)
    planned: int = 0

    def _ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self._ok())

    def median_ms(self) -> float | None:
        ok = self._ok()
        return statistics.median(s.seconds for s in ok) * 1000 if ok else None

    def p95_ms(self) -> float | None:
        return _percentile([s.seconds for s in self._ok()], 95)

    def first_p95_ms(self) -> float | None:
        return _percentile([s.first_seconds for s in self._ok() if s.first_seconds is not None], 95)

    def matches_avg(self) -> float | None:
        ok = self._ok()
        return statistics.fmean(s.matches for s in ok) if ok else None


def _percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile, in ms."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)] * 1000


def _nodelay(assoc: Association) -> None:
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextlib.contextmanager
def find_association(port: int, called: str) -> Iterator[Association]:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = 30
    ae.dimse_timeout = 300
    ae.network_timeout = 300
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"C-FIND association to {called}@{port} was not accepted (no Study Root C-FIND?)")
    if not any(
        c.abstract_syntax == StudyRootQueryRetrieveInformationModelFind for c in assoc.accepted_contexts
    ):
        assoc.release()
        raise RuntimeError(f"{called}@{port} does not accept Study Root C-FIND")
    _nodelay(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def cfind_once(assoc: Association, keys: dict[str, str]) -> Sample:
    if not assoc.is_established:
        return Sample(0.0, None, 0, "association no longer established")
    ds = identifier(keys)
    matches = 0
    first: float | None = None
    started = time.perf_counter()
    error: str | None = None
    for status, _ in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
        code = int(status.Status) if status is not None and "Status" in status else None
        if code in (0xFF00, 0xFF01):
            matches += 1
            if first is None:
                first = time.perf_counter() - started
        elif code != 0x0000:
            comment = status.get("ErrorComment", "") if status is not None else ""
            error = (
                f"status 0x{code:04X} {comment}" if code is not None else "no response (association aborted?)"
            )
    return Sample(time.perf_counter() - started, first, matches, error)


def http_once(client: QueryClient, keys: dict[str, str]) -> Sample:
    matches = 0
    first: float | None = None
    started = time.perf_counter()
    try:
        with client.find(QueryRequest(level=QueryLevel.STUDY, identifier=http_identifier(keys))) as stream:
            for _ in stream:
                matches += 1
                if first is None:
                    first = time.perf_counter() - started
        truncated = stream.completion is not None and stream.completion.truncated
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        return Sample(time.perf_counter() - started, first, matches, f"{type(exc).__name__}: {exc}")
    return Sample(time.perf_counter() - started, first, matches, truncated=truncated)


def measure_kind(
    kind: str,
    via: str,
    run_one: Callable[[dict[str, str]], Sample],
    queries: list[dict[str, str]],
    budget: float,
) -> KindResult:
    result = KindResult(kind, via, planned=len(queries))
    for keys in queries[:3]:  # warm-up, not counted
        run_one(keys)
    deadline = time.monotonic() + budget
    for keys in queries:
        result.samples.append(run_one(keys))
        if time.monotonic() > deadline:
            break
    return result


# -- C-MOVE ------------------------------------------------------------------------


@dataclass
class MoveResult:
    target: str
    instances: int
    megabytes: float
    seconds: list[float]
    received: int
    note: str = ""

    def row(self) -> str:
        if not self.seconds:
            return f"  {self.target:<28}{'-':>10}{'-':>10}   {self.note}"
        best = statistics.median(self.seconds)
        return (
            f"  {self.target:<28}{self.instances / best:>10.1f}{self.megabytes / best:>10.1f}"
            f"{best:>10.2f}   runs {', '.join(f'{s:.2f}' for s in self.seconds)} s;"
            f" {self.received} received per run {self.note}"
        )


def _movescu(port: int, called: str, study_uid: str) -> tuple[float, str | None]:
    started = time.perf_counter()
    result = run(
        [
            "movescu",
            "-S",
            "-aet",
            CALLING_AE,
            "-aec",
            called,
            "-aem",
            DESTINATION_AE,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(port),
        ],
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    return elapsed, None if result.returncode == 0 else result.output[-600:]


def _timed_moves(
    target: str,
    *,
    port: int,
    called: str,
    study_uid: str,
    receiver: ReferenceReceiver,
    megabytes: float,
    repeat: int,
) -> MoveResult:
    out = MoveResult(target, MOVE_IMAGES, megabytes, [], 0)
    for _ in range(repeat):
        before = len(receiver.received())
        seconds, error = _movescu(port, called, study_uid)
        received = len(receiver.received()) - before
        out.received = received
        if error is not None or received != MOVE_IMAGES:
            out.note = f"FAILED ({received} of {MOVE_IMAGES} received): {error or ''}".strip()
            break
        out.seconds.append(seconds)
    return out


def _study(workdir: Path) -> tuple[list[Path], str, float]:
    from pydicom import dcmread

    paths = write_ct_series(
        workdir / "move-study", MOVE_IMAGES, seed=4711, patient_id="QRMOVE", patient_name="MOVE^BENCH"
    )
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return paths, study_uid, sum(p.stat().st_size for p in paths) / MB


def register_node(system: LocalSystem, ae_title: str, port: int) -> str:
    """The AE registry entry, by the `pacs node add` command when it exists,
    else straight into remote_node.  Returns how it was done."""
    pacs = Path(sys.executable).parent / "pacs"
    proc = subprocess.run(
        [str(pacs), "node", "add", ae_title, "--host", "127.0.0.1", "--port", str(port)],
        env=system.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 0:
        return "pacs node add"

    async def insert() -> None:
        conn = await asyncpg.connect(system.database_url)
        try:
            await conn.execute(
                """INSERT INTO remote_node (ae_title, host, port) VALUES ($1, '127.0.0.1', $2)
                   ON CONFLICT (ae_title) DO UPDATE SET host = excluded.host, port = excluded.port""",
                ae_title,
                port,
            )
        finally:
            await conn.close()

    asyncio.run(insert())
    return "INSERT INTO remote_node (`pacs node add` failed: " + (proc.stderr.strip()[-120:] or "?") + ")"


def move_pacs(system: LocalSystem, workdir: Path, repeat: int) -> MoveResult:
    paths, study_uid, megabytes = _study(workdir)
    sent = storescu(system.gateway_port, paths, called=system.ae_title, calling=CALLING_AE)
    if sent.returncode != 0:
        return MoveResult("PACS", MOVE_IMAGES, megabytes, [], 0, f"storescu failed: {sent.output[-300:]}")
    from pydicom import dcmread

    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    IndexReader(system.database_url).wait_for_instances(uids, timeout=300)
    with ReferenceReceiver(workdir / "received-pacs", find_free_port()) as receiver:
        how = register_node(system, DESTINATION_AE, receiver.port)
        print(f"  move destination registered by {how}", flush=True)
        return _timed_moves(
            "PACS",
            port=system.gateway_port,
            called=system.ae_title,
            study_uid=study_uid,
            receiver=receiver,
            megabytes=megabytes,
            repeat=repeat,
        )


def move_orthanc(workdir: Path, repeat: int) -> MoveResult | None:
    from pacs_e2e.bench import _start_orthanc

    paths, study_uid, megabytes = _study(workdir)
    with ReferenceReceiver(workdir / "received-orthanc", find_free_port()) as receiver:
        extra = {
            "DicomModalities": {"reference": [DESTINATION_AE, "127.0.0.1", receiver.port]},
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
        }
        orthanc = _start_orthanc(workdir / "orthanc", extra)
        if orthanc is None:
            return None
        try:
            sent = storescu(orthanc.port, paths, called=orthanc.called, calling=CALLING_AE)
            if sent.returncode != 0:
                return MoveResult(
                    orthanc.name, MOVE_IMAGES, megabytes, [], 0, f"storescu failed: {sent.output[-300:]}"
                )
            return _timed_moves(
                orthanc.name,
                port=orthanc.port,
                called=orthanc.called,
                study_uid=study_uid,
                receiver=receiver,
                megabytes=megabytes,
                repeat=repeat,
            )
        finally:
            orthanc.proc.terminate()
            orthanc.proc.wait(30)


# -- the whole run -------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_queries(results: list[KindResult], index: SyntheticIndex) -> None:
    print(
        f"\nSTUDY-level queries: {index.instances:,} instances, {len(index.studies):,} studies, "
        f"{len(index.patients):,} patients (synthesized in {index.seconds.get('total', 0):.0f} s)"
    )
    header = (
        f"{'kind':<28}{'via':<12}{'queries':>9}{'median ms':>11}{'p95 ms':>9}"
        f"{'1st-match p95':>15}{'matches avg':>13}{'errors':>8}{'p95<20ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        p95 = r.p95_ms()
        met = "-" if p95 is None else ("yes" if p95 < TARGET_P95_MS else "no")
        ran = f"{len(r.samples)}" + ("" if len(r.samples) == r.planned else f"/{r.planned}")
        print(
            f"{r.kind:<28}{r.via:<12}{ran:>9}{_fmt(r.median_ms()):>11}{_fmt(p95):>9}"
            f"{_fmt(r.first_p95_ms()):>15}{_fmt(r.matches_avg()):>13}{r.errors:>8}{met:>10}"
        )
    for r in results:
        capped = sum(s.truncated for s in r.samples)
        if capped:
            print(f"  {r.kind} via {r.via}: {capped} results cut at the query-service's max_matches")
    for r in results:
        first = next((s.error for s in r.samples if s.error is not None), None)
        if first is not None:
            print(f"  {r.kind} via {r.via}: {r.errors} failed, e.g. {first[:200]}")


def print_moves(moves: list[MoveResult]) -> None:
    print(
        f"\nC-MOVE of one {MOVE_IMAGES}-image CT study (512x512x16) to DCMTK storescp (movescu, median of runs):"
    )
    print(f"  {'target':<28}{'inst/s':>10}{'MB/s':>10}{'seconds':>10}")
    for m in moves:
        print(m.row())


def run_query_bench(
    *,
    instances: int = 1_000_000,
    queries: int = 200,
    kind_budget: float = 30.0,
    move_repeat: int = 3,
    compare: bool = True,
    seed: int = 1,
) -> None:
    bench_started = time.monotonic()
    tag = uuid.uuid4().hex[:10]
    database_url = f"{SERVER_DB_URL}/pacs_bench_query_{tag}"
    namespace = f"benchq{tag}."
    settings = DatabaseSettings(url=database_url)
    results: list[KindResult] = []
    moves: list[MoveResult] = []
    with tempfile.TemporaryDirectory(prefix="pacs-bench-query-") as tmp:
        workdir = Path(tmp)
        try:
            upgrade(settings)
            print(f"synthesizing {instances:,} instances into {database_url} …", flush=True)
            index = synthesize_index(database_url, instances, seed=seed)
            print(
                "  synthesis: " + ", ".join(f"{k} {v:.1f} s" for k, v in index.seconds.items()),
                flush=True,
            )
            rng = random.Random(seed)
            plans = {kind.name: [kind.make(rng, index) for _ in range(queries)] for kind in KINDS}
            system = LocalSystem(
                workdir / "pacs",
                gateways=1,
                workers=1,
                query_services=1,
                database_url=database_url,
                broker_url=SERVER_AMQP_URL,
                namespace=namespace,
                data_dir=workdir / "pacs" / "data",
                gateway_port=0,
                http_port_base=0,
                extra_env=TEST_ENV,
                out=None,
            )
            system.start()
            try:
                register_node(system, CALLING_AE, find_free_port())
                _queries(system, plans, kind_budget, results)
                if dcmtk_available():
                    moves.append(move_pacs(system, workdir, move_repeat))
                    print(moves[-1].row(), flush=True)
            finally:
                system.stop()
                with contextlib.suppress(Exception):
                    asyncio.run(_delete_namespace(system.broker_url or SERVER_AMQP_URL, namespace))
        finally:
            drop_database(settings)
        if compare and dcmtk_available():
            try:
                orthanc = move_orthanc(workdir, move_repeat)
            except RuntimeError as exc:
                print(f"skipped Orthanc: {exc}", flush=True)
            else:
                if orthanc is None:
                    print("Orthanc is not installed: no C-MOVE comparison", flush=True)
                else:
                    moves.append(orthanc)
                    print(orthanc.row(), flush=True)
    print_queries(results, index)
    print_moves(moves)
    print(f"\nquery/retrieve benchmark: {time.monotonic() - bench_started:.0f} s in all")


def _queries(
    system: LocalSystem, plans: dict[str, list[dict[str, str]]], budget: float, results: list[KindResult]
) -> None:
    if not system.gateways:
        print("no dimse-gateway: C-FIND not measured", flush=True)
    else:
        try:
            with find_association(system.gateway_port, system.ae_title) as assoc:
                for kind, keys in plans.items():
                    started = time.monotonic()
                    results.append(measure_kind(kind, "C-FIND", lambda k: cfind_once(assoc, k), keys, budget))
                    _progress(results[-1], time.monotonic() - started)
        except RuntimeError as exc:
            print(f"C-FIND not measured: {exc}", flush=True)
    if not system.query_services:
        print("no query-service: HTTP not measured", flush=True)
        return
    client = QueryClient(system.query_services[0].base_url)
    for kind, keys in plans.items():
        started = time.monotonic()
        results.append(measure_kind(kind, "HTTP API", lambda k: http_once(client, k), keys, budget))
        _progress(results[-1], time.monotonic() - started)


def _progress(result: KindResult, seconds: float) -> None:
    print(
        f"  {result.via} {result.kind}: {len(result.samples)} queries in {seconds:.1f} s,"
        f" median {_fmt(result.median_ms())} ms, {result.errors} errors",
        flush=True,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("query/retrieve benchmark")
    group.add_argument("--instances", type=int, default=1_000_000, help="synthetic index size (studies: /10)")
    group.add_argument("--queries", type=int, default=200, help="queries per kind and interface")
    group.add_argument(
        "--kind-budget", type=float, default=30.0, help="seconds per kind and interface before stopping early"
    )
    group.add_argument("--move-repeat", type=int, default=3, help="C-MOVE runs per target")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--no-compare", action="store_true", help="skip Orthanc")
    args = parser.parse_args(argv)
    run_query_bench(
        instances=args.instances,
        queries=args.queries,
        kind_budget=args.kind_budget,
        move_repeat=args.move_repeat,
        compare=not args.no_compare,
    )


if __name__ == "__main__":
    main()
