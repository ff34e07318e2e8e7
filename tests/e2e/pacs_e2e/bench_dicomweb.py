"""DICOMweb benchmark (``python -m pacs_e2e.bench --only dicomweb``).

1. Synthesizes the ``--instances`` index of the query benchmark
   (:func:`pacs_e2e.synthetic_index.synthesize_index`, same seed, same
   queries) into a fresh database and starts the PACS on it, the
   dicomweb-api with anonymous administrator access
   (``PACS_AUTH_ANONYMOUS_ROLE``).
2. STOW-RS: a 200-image CT series (512x512x16, ~526 KB each) POSTed to
   ``/dicom-web/studies`` as ONE multipart/related request, and split into 4
   requests sent in parallel (one httpx client per thread; bodies streamed
   from the files, Content-Length given).  instances/s and MB/s (a) until
   every response arrived (the PACS answers once stored and queued) and
   (b) until every instance is in the index (polled).  The same against
   Orthanc's DICOMweb plugin (``/dicom-web/studies``), and, for reference,
   Orthanc's REST ``POST /instances`` (one instance per request; 1 and 4
   parallel clients).  Orthanc indexes before it answers: acked = indexed.
3. QIDO-RS: the query kinds of :mod:`pacs_e2e.bench_query` as
   ``GET /dicom-web/studies?...`` (default return keys, no ``limit``) over
   one keep-alive client; median and p95 over ``--queries`` per kind (each
   kind stops after ``--qido-kind-budget`` seconds).  Then the same queries
   straight to the query-service's HTTP API, to show what the dicomweb-api
   adds.
4. WADO-RS: the study stored by the first STOW run retrieved whole as
   multipart/related (``transfer-syntax=*``) → MB/s; then frame 1 of each of
   its 200 instances (``multipart/related; type="application/octet-stream";
   transfer-syntax=*``, as cornerstone asks) → frames/s, by one client and by
   4 parallel clients.  The same against Orthanc's DICOMweb plugin.

QIDO is not compared with Orthanc: Orthanc cannot be given the synthesized
1M-instance index (it would have to receive 1M real objects).

Prints figures; never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread

from pacs_common.db.migrate import drop_database, upgrade
from pacs_common.localrun.runner import LocalSystem
from pacs_common.query import QueryClient
from pacs_common.settings import DatabaseSettings
from pacs_e2e.bench_query import (
    KINDS,
    KindResult,
    Sample,
    _progress,
    http_once,
    measure_kind,
    print_queries,
)
from pacs_e2e.bench_query import (
    add_arguments as add_query_arguments,
)
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.index import IndexReader
from pacs_e2e.orthanc import OrthancServer, orthanc_binary
from pacs_e2e.procstat import CpuMeter
from pacs_e2e.synthetic_index import SyntheticIndex, synthesize_index
from pacs_e2e.system import SERVER_AMQP_URL, SERVER_DB_URL, TEST_ENV, _delete_namespace

MB = 1_000_000
SERIES_IMAGES = 200
CHUNK = 1 << 20
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOM_JSON = "application/dicom+json"
STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
STOW_TARGET_FACTOR = 2.0  # the target: STOW >= 2x Orthanc's
ANONYMOUS_ADMIN = {"PACS_AUTH_ANONYMOUS_ROLE": "administrator"}


# -- the CT series ---------------------------------------------------------------


@dataclass
class Series:
    directory: Path
    paths: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]

    megabytes: float

    def remove_files(self) -> None:
        """The files are sent once; what was stored stays on the target."""
        shutil.rmtree(self.directory, ignore_errors=True)


def make_series(directory: Path, seed: int) -> Series:
    paths = write_ct_series(
        directory, SERIES_IMAGES, seed=seed, patient_id=f"WEB{seed}", patient_name=f"DICOMWEB^BENCH{seed}"
    )
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    return Series(
        directory,
        paths,
        str(headers[0].StudyInstanceUID),
        str(headers[0].SeriesInstanceUID),
        [str(h.SOPInstanceUID) for h in headers],
        sum(p.stat().st_size for p in paths) / MB,
    )


def _split(paths: Sequence[Path], parts: int) -> list[list[Path]]:
    """Contiguous chunks (each request carries consecutive images)."""
    size = -(-len(paths) // parts)
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


# -- STOW-RS ---------------------------------------------------------------------


class MultipartBody:
    """A multipart/related body of DICOM files, streamed from disk, with its
    length known up front."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.boundary = uuid.uuid4().hex
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"--{self.boundary}--\r\n".encode()
        self.length = sum(len(self._head) + p.stat().st_size + 2 for p in self.paths) + len(self._tail)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={self.boundary}',
            "Content-Length": str(self.length),
            "Accept": DICOM_JSON,
        }

    def __iter__(self) -> Iterator[bytes]:
        for path in self.paths:
            yield self._head
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
            yield b"\r\n"
        yield self._tail


def _referenced(response: httpx.Response) -> tuple[int, int]:
    """(stored, failed) counts of a STOW-RS response."""
    try:
        body: Any = response.json()
    except ValueError:
        return 0, 0
    dataset = body[0] if isinstance(body, list) and body else body
    if not isinstance(dataset, dict):
        return 0, 0

    def count(tag: str) -> int:
        value = dataset.get(tag, {}).get("Value", [])
        return len(value) if isinstance(value, list) else 0

    return count(REFERENCED_SOP_SEQUENCE), count(FAILED_SOP_SEQUENCE)


def _stow_request(url: str, paths: Sequence[Path]) -> str | None:
    """POST one STOW-RS request; None when every instance was stored, else why not."""
    body = MultipartBody(paths)
    with httpx.Client(timeout=600) as client:
        response = client.post(url, content=iter(body), headers=body.headers)
    stored, failed = _referenced(response)
    if response.status_code != 200 or stored != len(paths):
        return f"HTTP {response.status_code}: {stored} stored, {failed} failed; {response.text[:200]}"
    return None


def _rest_uploads(url: str, paths: Sequence[Path]) -> str | None:
    """Orthanc's REST upload: one POST /instances per file, one keep-alive client."""
    with httpx.Client(timeout=600) as client:
        for path in paths:
            response = client.post(url, content=path.read_bytes())
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:200]}"
    return None


@dataclass
class StowRun:
    target: str
    how: str
    requests: int
    instances: int
    megabytes: float
    acked_seconds: float | None
    indexed_seconds: float | None
    error: str | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process

    def cpu_per_1000(self) -> str:
        return f"{sum(self.cpu.values()) / self.instances * 1000:.2f}" if self.cpu else "-"

    def rate(self, seconds: float | None, amount: float) -> str:
        return "-" if seconds is None or self.error else f"{amount / seconds:.1f}"


def stow_run(
    target: str,
    how: str,
    send: Callable[[str, Sequence[Path]], str | None],
    url: str,
    series: Series,
    *,
    requests: int,
    wait_indexed: Callable[[list[str]], None] | None,
    cpu_roots: dict[str, int],
) -> StowRun:
    chunks = _split(series.paths, requests)
    meter = CpuMeter(cpu_roots)
    meter.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=requests) as pool:
        errors = [e for e in pool.map(lambda c: send(url, c), chunks) if e is not None]
    acked = time.perf_counter() - started
    indexed: float | None = acked
    if not errors and wait_indexed is not None:
        wait_indexed(series.sop_uids)
        indexed = time.perf_counter() - started
    cpu = meter.stop()
    return StowRun(
        target,
        how,
        requests,
        len(series.paths),
        series.megabytes,
        acked,
        indexed,
        errors[0] if errors else None,
        cpu,
    )


def _index_waiter(database_url: str) -> Callable[[list[str]], None]:
    reader = IndexReader(database_url)

    def wait(uids: list[str]) -> None:
        deadline = time.monotonic() + 600
        while reader.count_instances(uids) < len(uids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(uids)} STOW-RS instances not all indexed after 600 s")
            time.sleep(0.02)

    return wait


# -- QIDO-RS ---------------------------------------------------------------------


def qido_once(client: httpx.Client, keys: dict[str, str]) -> Sample:
    """One STUDY-level search; timed to the last byte of the response."""
    started = time.perf_counter()
    try:
        response = client.get("/studies", params=keys, headers={"Accept": DICOM_JSON})
    except httpx.HTTPError as exc:
        return Sample(time.perf_counter() - started, None, 0, f"{type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        return Sample(elapsed, None, 0, f"HTTP {response.status_code}: {response.text[:200]}")
    matches = len(response.json())
    return Sample(elapsed, None, matches, truncated="warning" in response.headers)


def qido_bench(
    system: LocalSystem,
    base_url: str,
    plans: dict[str, list[dict[str, str]]],
    budget: float,
    results: list[KindResult],
) -> None:
    """Each kind via QIDO-RS, then via the query-service's HTTP API directly
    (what the dicomweb-api adds on top of the query-service)."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for kind, queries in plans.items():
            started = time.monotonic()
            results.append(measure_kind(kind, "QIDO-RS", lambda k: qido_once(client, k), queries, budget))
            _progress(results[-1], time.monotonic() - started)
    if system.query_services:
        query = QueryClient(system.query_services[0].base_url)
        try:
            for kind, queries in plans.items():
                started = time.monotonic()
                results.append(
                    measure_kind(kind, "query HTTP", lambda k: http_once(query, k), queries, budget)
                )
                _progress(results[-1], time.monotonic() - started)
        finally:
            query.close()


# -- WADO-RS ---------------------------------------------------------------------


@dataclass
class WadoResult:
    target: str
    what: str
    clients: int
    items: int  # instances or frames per run
    megabytes: float  # received per run
    seconds: list[float] = field(default_factory=list)
    error: str | None = None

    def row(self) -> str:
        unit = "frames" if self.what == "frames" else "instances"
        if not self.seconds:
            return (
                f"  {self.target:<26}{self.what:<8}{self.clients:>8}{'-':>11}{'-':>9}{'-':>9}   {self.error}"
            )
        median = statistics.median(self.seconds)
        return (
            f"  {self.target:<26}{self.what:<8}{self.clients:>8}{self.items / median:>11.1f}"
            f"{self.megabytes / median:>9.1f}{median:>9.2f}   {self.items} {unit}, {self.megabytes:.1f} MB per run;"
            f" runs {', '.join(f'{s:.2f}' for s in self.seconds)} s"
            + (f"; {self.error}" if self.error else "")
        )


def _retrieve_study(client: httpx.Client, url: str) -> tuple[int, int]:
    """GET a study as multipart/related; (bytes received, parts)."""
    with client.stream("GET", url, headers={"Accept": STUDY_ACCEPT}) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        content_type = response.headers.get("content-type", "")
        boundary = next(
            (
                p.split("=", 1)[1].strip().strip('"')
                for p in content_type.split(";")
                if p.strip().lower().startswith("boundary=")
            ),
            None,
        )
        if boundary is None:
            raise RuntimeError(f"no multipart boundary in {content_type!r}")
        delimiter = f"\r\n--{boundary}".encode()
        received = delimiters = 0
        tail = b"\r\n"  # the body may begin with the first delimiter
        for chunk in response.iter_raw(CHUNK):
            received += len(chunk)
            window = tail + chunk
            delimiters += window.count(delimiter) - tail.count(delimiter)
            tail = window[-len(delimiter) :]
    return received, delimiters - 1  # the last delimiter closes the body


def wado_study(target: str, base_url: str, series: Series, repeat: int) -> WadoResult:
    result = WadoResult(target, "study", 1, len(series.paths), 0.0)
    url = f"{base_url}/studies/{series.study_uid}"
    with httpx.Client(timeout=600) as client:
        try:
            _retrieve_study(client, url)  # warm-up (and the connection)
            for _ in range(repeat):
                started = time.perf_counter()
                received, parts = _retrieve_study(client, url)
                result.seconds.append(time.perf_counter() - started)
                result.megabytes = received / MB
                if parts != len(series.paths):
                    result.error = f"{parts} parts received, {len(series.paths)} expected"
        except (httpx.HTTPError, RuntimeError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
    return result


def _get_frames(base_url: str, series: Series, sop_uids: Sequence[str]) -> tuple[int, str | None]:
    """Frame 1 of each instance over one keep-alive client; (bytes, first error)."""
    received = 0
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for sop in sop_uids:
            url = f"/studies/{series.study_uid}/series/{series.series_uid}/instances/{sop}/frames/1"
            response = client.get(url, headers={"Accept": FRAMES_ACCEPT})
            if response.status_code != 200:
                return received, f"HTTP {response.status_code}: {response.text[:200]}"
            received += len(response.content)
    return received, None


def wado_frames(target: str, base_url: str, series: Series, clients: int, repeat: int) -> WadoResult:
    result = WadoResult(target, "frames", clients, len(series.sop_uids), 0.0)
    chunks = [list(series.sop_uids[i::clients]) for i in range(clients)]
    try:
        _get_frames(base_url, series, series.sop_uids[:3])  # warm-up
        for _ in range(repeat):
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                outcomes = list(pool.map(lambda c: _get_frames(base_url, series, c), chunks))
            seconds = time.perf_counter() - started
            errors = [e for _, e in outcomes if e is not None]
            if errors:
                result.error = errors[0]
                break
            result.seconds.append(seconds)
            result.megabytes = sum(n for n, _ in outcomes) / MB
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def wado_bench(target: str, base_url: str, series: Series, repeat: int) -> list[WadoResult]:
    results = [
        wado_study(target, base_url, series, repeat),
        wado_frames(target, base_url, series, 1, repeat),
        wado_frames(target, base_url, series, 4, repeat),
    ]
    for r in results:
        print(r.row(), flush=True)
    return results


# -- Orthanc with its DICOMweb plugin ----------------------------------------------------


class DicomwebOrthanc(OrthancServer):
    """Orthanc with Debian's orthanc-dicomweb plugin at /dicom-web."""

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["Plugins"] = [str(ORTHANC_DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return config

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "Orthanc is not running"
        return self._proc.pid

    def wait_http(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/dicom-web/studies", timeout=5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc's /dicom-web/studies does not answer 200 (plugin not loaded?)")
            time.sleep(0.2)


def orthanc_bench(
    workdir: Path, seed: int, repeat: int, stows: list[StowRun], wados: list[WadoResult]
) -> None:
    if orthanc_binary() is None:
        print("Orthanc is not installed: no comparison", flush=True)
        return
    if not ORTHANC_DICOMWEB_PLUGIN.exists():
        print(f"no {ORTHANC_DICOMWEB_PLUGIN} (apt package orthanc-dicomweb): no comparison", flush=True)
        return
    orthanc = DicomwebOrthanc(workdir / "orthanc")
    with orthanc:
        orthanc.wait_http()
        roots = {"orthanc": orthanc.pid}
        name = "Orthanc 1.10 + DICOMweb"
        first: Series | None = None
        cases: list[tuple[str, Callable[[str, Sequence[Path]], str | None], str]] = [
            ("STOW-RS", _stow_request, f"{orthanc.base_url}/dicom-web/studies"),
            ("REST /instances", _rest_uploads, f"{orthanc.base_url}/instances"),
        ]
        for how, send, url in cases:
            for requests in (1, 4):
                for _ in range(repeat):
                    seed += 1
                    series = make_series(workdir / f"orthanc-{seed}", seed)
                    stows.append(
                        stow_run(
                            name,
                            how,
                            send,
                            url,
                            series,
                            requests=requests,
                            wait_indexed=None,
                            cpu_roots=roots,
                        )
                    )
                    _print_stow_progress(stows[-1])
                    series.remove_files()
                    if first is None and stows[-1].error is None:
                        first = series
        if first is None:
            print("Orthanc stored nothing: no WADO-RS comparison", flush=True)
            return
        wados.extend(wado_bench(name, f"{orthanc.base_url}/dicom-web", first, repeat=3))


# -- printing ----------------------------------------------------------------------


def _print_stow_progress(run: StowRun) -> None:
    print(
        f"  {run.target} {run.how} x{run.requests}: acked {run.rate(run.acked_seconds, run.instances)} inst/s,"
        f" indexed {run.rate(run.indexed_seconds, run.instances)} inst/s"
        + (f"  FAILED: {run.error}" if run.error else ""),
        flush=True,
    )


def print_stows(runs: list[StowRun]) -> None:
    print(f"\nSTOW-RS of a {SERIES_IMAGES}-image CT series (512x512x16), bodies streamed, httpx:")
    header = (
        f"{'target':<26}{'how':<18}{'requests':>9}{'acked inst/s':>14}{'acked MB/s':>12}"
        f"{'indexed inst/s':>16}{'indexed MB/s':>14}{'CPU s/1000':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r.target:<26}{r.how:<18}{r.requests:>9}{r.rate(r.acked_seconds, r.instances):>14}"
            f"{r.rate(r.acked_seconds, r.megabytes):>12}{r.rate(r.indexed_seconds, r.instances):>16}"
            f"{r.rate(r.indexed_seconds, r.megabytes):>14}{r.cpu_per_1000():>12}"
        )
    print(
        "\nCPU seconds per 1000 instances, by process (PACS: its own processes, without the shared"
        " PostgreSQL and RabbitMQ; Orthanc: its one process, SQLite included):"
    )
    for r in runs:
        by_process = {k: round(v / r.instances * 1000, 2) for k, v in r.cpu.items()}
        print(f"  {r.target:<26}{r.how:<18}x{r.requests}: {by_process}")
    for r in runs:
        if r.error:
            print(f"  {r.target} {r.how} x{r.requests} failed: {r.error}")
    pacs = [r for r in runs if r.target.startswith("PACS") and not r.error]
    orthanc = [r for r in runs if r.target.startswith("Orthanc") and r.how == "STOW-RS" and not r.error]
    if pacs and orthanc:
        print(
            f"\nPACS / Orthanc STOW-RS (target >= x{STOW_TARGET_FACTOR:.0f}; Orthanc answers once indexed):"
        )
        for requests in (1, 4):
            p = [r for r in pacs if r.requests == requests]
            o = [r for r in orthanc if r.requests == requests]
            if not p or not o:
                continue
            theirs = statistics.median(r.instances / (r.acked_seconds or 1) for r in o)
            acked = statistics.median(r.instances / (r.acked_seconds or 1) for r in p) / theirs
            indexed = statistics.median(r.instances / (r.indexed_seconds or 1) for r in p) / theirs
            verdict = "yes" if indexed >= STOW_TARGET_FACTOR else "no"
            print(
                f"  {requests} request(s): acked x{acked:.2f}, indexed x{indexed:.2f}"
                f"   indexed >= x{STOW_TARGET_FACTOR:.0f}: {verdict}"
            )


def print_wados(results: list[WadoResult]) -> None:
    print(
        f"\nWADO-RS of the {SERIES_IMAGES}-image study: whole study as multipart (transfer-syntax=*),"
        " and frame 1 of each instance (octet-stream, transfer-syntax=*); median of runs:"
    )
    print(f"  {'target':<26}{'what':<8}{'clients':>8}{'items/s':>11}{'MB/s':>9}{'seconds':>9}")
    for r in results:
        print(r.row())


# -- the whole run ---------------------------------------------------------------------


def run_dicomweb_bench(
    *,
    instances: int = 1_000_000,
    queries: int = 200,
    kind_budget: float = 10.0,
    stow_repeat: int = 3,
    workers: int = 1,
    compare: bool = True,
    seed: int = 1,
) -> None:
    bench_started = time.monotonic()
    load_before = os.getloadavg()
    tag = uuid.uuid4().hex[:10]
    database_url = f"{SERVER_DB_URL}/pacs_bench_dicomweb_{tag}"
    namespace = f"benchw{tag}."
    settings = DatabaseSettings(url=database_url)
    stows: list[StowRun] = []
    qidos: list[KindResult] = []
    wados: list[WadoResult] = []
    index: SyntheticIndex | None = None
    with tempfile.TemporaryDirectory(prefix="pacs-bench-dicomweb-") as tmp:
        workdir = Path(tmp)
        series_seed = 7000
        try:
            upgrade(settings)
            print(f"synthesizing {instances:,} instances into {database_url} …", flush=True)
            index = synthesize_index(database_url, instances, seed=seed)
            print(
                "  synthesis: " + ", ".join(f"{k} {v:.1f} s" for k, v in index.seconds.items()),
                flush=True,
            )
            rng = random.Random(seed)  # the query benchmark's queries
            plans = {kind.name: [kind.make(rng, index) for _ in range(queries)] for kind in KINDS}
            system = LocalSystem(
                workdir / "pacs",
                gateways=0,
                workers=workers,
                query_services=1,
                dicomweb_services=1,
                database_url=database_url,
                broker_url=SERVER_AMQP_URL,
                namespace=namespace,
                data_dir=workdir / "pacs" / "data",
                gateway_port=0,
                http_port_base=0,
                extra_env={**TEST_ENV, **ANONYMOUS_ADMIN},
                out=None,
            )
            system.start()
            try:
                if not system.dicomweb_services:
                    raise RuntimeError("the dicomweb-api is not installed")
                base = f"{system.dicomweb_services[0].base_url}/dicom-web"
                name = f"PACS ({workers} wk)"
                wait = _index_waiter(database_url)
                # The PACS' own processes; the shared PostgreSQL and RabbitMQ serve other work too.
                roots = {s.name: s.pid for s in system.services if s.pid is not None}
                first: Series | None = None
                for requests in (1, 4):
                    for _ in range(stow_repeat):
                        series_seed += 1
                        series = make_series(workdir / f"pacs-{series_seed}", series_seed)
                        stows.append(
                            stow_run(
                                name,
                                "STOW-RS",
                                _stow_request,
                                f"{base}/studies",
                                series,
                                requests=requests,
                                wait_indexed=wait,
                                cpu_roots=roots,
                            )
                        )
                        _print_stow_progress(stows[-1])
                        series.remove_files()
                        if first is None and stows[-1].error is None:
                            first = series
                qido_bench(system, base, plans, kind_budget, qidos)
                if first is not None:
                    wados.extend(wado_bench(name, base, first, repeat=3))
            finally:
                system.stop()
                with contextlib.suppress(Exception):
                    asyncio.run(_delete_namespace(system.broker_url or SERVER_AMQP_URL, namespace))
        finally:
            drop_database(settings)
        if compare:
            try:
                orthanc_bench(workdir, series_seed + 100, stow_repeat, stows, wados)
            except RuntimeError as exc:
                print(f"skipped Orthanc: {exc}", flush=True)
    print_stows(stows)
    if index is not None:
        print_queries(qidos, index)
    print_wados(wados)
    load_after = os.getloadavg()
    print(
        f"\nDICOMweb benchmark: {time.monotonic() - bench_started:.0f} s in all; load average"
        f" {load_before[0]:.1f} at the start, {load_after[0]:.1f} / {load_after[2]:.1f} (1 / 15 min) at the end"
        f" on {os.cpu_count()} CPUs (other work on the machine skews every figure)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOMweb benchmark")
    group.add_argument("--stow-repeat", type=int, default=3, help="STOW-RS runs per case and target")
    group.add_argument(
        "--qido-kind-budget",
        type=float,
        default=10.0,
        help="seconds per query kind and interface (QIDO-RS, query-service HTTP) before stopping early",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_query_arguments(parser)
    add_arguments(parser)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-compare", action="store_true", help="skip Orthanc")
    args = parser.parse_args(argv)
    run_dicomweb_bench(
        instances=args.instances,
        queries=args.queries,
        kind_budget=args.qido_kind_budget,
        stow_repeat=args.stow_repeat,
        workers=args.workers,
        compare=not args.no_compare,
    )


if __name__ == "__main__":
    main()
