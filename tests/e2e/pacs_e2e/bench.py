"""`make bench`: C-STORE throughput, CPU and memory of the PACS, side by side
with Orthanc and DCMTK's storescp where they are installed.

Workloads: 200 CT images (512x512, 16-bit) and 10 large images (~20 MB),
sent by 1 and by 4 parallel storescu processes (TCP_NODELAY=1).  Figures:
instances/s and MB/s (a) acknowledged by the receiver and (b) indexed and
queryable; CPU seconds per 1000 instances per process (all PACS processes
plus PostgreSQL and RabbitMQ); peak RSS per process.  Prints, never fails on
time.

Then the query/retrieve benchmark (:mod:`pacs_e2e.bench_query`: C-FIND and
query-service latency over a synthesized index, C-MOVE throughput).
Then the DICOMweb benchmark (:mod:`pacs_e2e.bench_dicomweb`: STOW-RS, QIDO-RS
over a synthesized index, WADO-RS, side by side with Orthanc's DICOMweb
plugin).
Then the background services: storage tier migration throughput hot → warm
(S3) → cold (Azure Archive) (:mod:`pacs_e2e.bench_hsm`) and prior prefetch
latency from a worklist item to priors queryable, with Orthanc as the remote
PACS (:mod:`pacs_e2e.bench_prefetch`).
Then simultaneous associations held at one gateway process
(:mod:`pacs_e2e.bench_associations`): RSS per association, idle CPU.
``--only store`` / ``query`` / ``dicomweb`` / ``hsm`` / ``prefetch`` / ``associations`` runs one of them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_e2e import bench_associations, bench_dicomweb, bench_hsm, bench_prefetch, bench_query
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import DCMTK_ENV, dcmtk_available, echoscu, tool
from pacs_e2e.index import IndexReader
from pacs_e2e.procstat import CpuMeter, peak_rss_bytes
from pacs_e2e.system import running_system

MB = 1_000_000


@dataclass
class Workload:
    name: str
    make: Callable[[Path, int], list[Path]]  # (directory, seed) -> files
    count: int


def _ct(directory: Path, seed: int) -> list[Path]:
    return write_ct_series(directory, 200, seed=seed, patient_id=f"BENCH{seed}")


def _large(directory: Path, seed: int) -> list[Path]:
    # 3200 x 3200 x 16 bit ≈ 20.5 MB each (a CR / DX sized image)
    return write_ct_series(directory, 10, rows=3200, columns=3200, seed=seed, patient_id=f"BENCHL{seed}")


WORKLOADS = [Workload("200 CT 512x512", _ct, 200), Workload("10 x 20 MB", _large, 10)]


@dataclass
class Run:
    target: str
    workload: str
    associations: int
    instances: int
    megabytes: float
    acked_seconds: float
    indexed_seconds: float | None
    cpu: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        out: dict[str, object] = {
            "target": self.target,
            "workload": self.workload,
            "assoc": self.associations,
            "acked inst/s": round(self.instances / self.acked_seconds, 1),
            "acked MB/s": round(self.megabytes / self.acked_seconds, 1),
        }
        if self.indexed_seconds is not None:
            out["indexed inst/s"] = round(self.instances / self.indexed_seconds, 1)
            out["indexed MB/s"] = round(self.megabytes / self.indexed_seconds, 1)
        total = sum(self.cpu.values())
        out["CPU s/1000 inst"] = round(total / self.instances * 1000, 2)
        out["CPU by process"] = {k: round(v / self.instances * 1000, 2) for k, v in self.cpu.items()}
        return out


def _split(paths: Sequence[Path], parts: int) -> list[list[Path]]:
    return [list(paths[i::parts]) for i in range(parts)]


def _send(port: int, called: str, paths: Sequence[Path], associations: int) -> float:
    """Wall time for `associations` parallel storescu processes to send `paths`."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [tool("storescu"), "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in _split(paths, associations)
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


def _sop_uids(paths: Sequence[Path]) -> list[str]:
    from pydicom import dcmread

    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


class Target:
    name: str
    called: str
    port: int

    def cpu_roots(self) -> dict[str, int]:
        raise NotImplementedError

    def wait_indexed(self, uids: Sequence[str]) -> bool:
        """Block until queryable; False if the target has no index."""
        return False

    def peak_rss(self) -> dict[str, int]:
        return {name: peak_rss_bytes(pid) for name, pid in self.cpu_roots().items()}


class PacsTarget(Target):
    def __init__(self, system: LocalSystem) -> None:
        self.system = system
        self.name = f"PACS ({len(system.gateways)} gw, {len(system.workers)} wk)"
        self.called = system.ae_title
        self.port = system.gateway_port
        self.index = IndexReader(system.database_url)

    def cpu_roots(self) -> dict[str, int]:
        roots = {s.name: s.pid for s in self.system.services if s.pid is not None}
        if self.system.postgres is not None and self.system.postgres.pid:
            roots["postgresql"] = self.system.postgres.pid
        if self.system.rabbitmq is not None and self.system.rabbitmq.pid:
            roots["rabbitmq"] = self.system.rabbitmq.pid
        return roots

    def wait_indexed(self, uids: Sequence[str]) -> bool:
        wanted = list(uids)
        while self.index.count_instances(wanted) < len(wanted):
            time.sleep(0.02)
        return True


class ProcessTarget(Target):
    def __init__(self, name: str, called: str, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.name, self.called, self.port, self.proc = name, called, port, proc

    def cpu_roots(self) -> dict[str, int]:
        return {self.name: self.proc.pid}


def _wait_echo(port: int, called: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while echoscu(port, called=called).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{called} on {port} does not answer C-ECHO")
        time.sleep(0.2)


def _spawn(name: str, called: str, port: int, args: list[str]) -> ProcessTarget:
    """Start a comparison receiver and wait until it answers C-ECHO.  Every
    one gets TCP_NODELAY=1: Orthanc's DICOM stack is DCMTK too."""
    proc = subprocess.Popen(args, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_echo(port, called)
    return ProcessTarget(name, called, port, proc)


def _start_orthanc(workdir: Path, extra: Mapping[str, object] | None = None) -> ProcessTarget | None:
    if shutil.which("Orthanc") is None:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    config: dict[str, object] = {
        "Name": "bench",
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": find_free_port(),
        "StorageDirectory": str(workdir / "orthanc-storage"),
        "IndexDirectory": str(workdir / "orthanc-index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        **(extra or {}),
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    return _spawn("Orthanc 1.10", "ORTHANC", port, ["Orthanc", str(workdir / "orthanc.json")])


def _start_storescp(workdir: Path) -> ProcessTarget | None:
    if not dcmtk_available():
        return None
    port = find_free_port()
    out = workdir / "storescp"
    out.mkdir()
    args = [tool("storescp"), "+xa", "-od", str(out), "-aet", "STORESCP", str(port)]
    return _spawn("DCMTK storescp", "STORESCP", port, args)


def _start_bare_pynetdicom(workdir: Path) -> ProcessTarget | None:
    port = find_free_port()
    spool = workdir / "bare-spool"
    spool.mkdir()
    args = [sys.executable, "-m", "pacs_e2e.bare_scp", str(port), str(spool)]
    return _spawn("bare pynetdicom SCP", "BARE", port, args)


def _measure(target: Target, workload: Workload, associations: int, data: Path, seed: int) -> Run:
    directory = data / f"{target.called}-{seed}"
    paths = workload.make(directory, seed)
    uids = _sop_uids(paths)
    megabytes = sum(p.stat().st_size for p in paths) / MB
    meter = CpuMeter(target.cpu_roots())
    meter.start()
    started = time.perf_counter()
    acked = _send(target.port, target.called, paths, associations)
    indexed = time.perf_counter() - started if target.wait_indexed(uids) else None
    cpu = meter.stop()
    shutil.rmtree(directory)
    return Run(target.name, workload.name, associations, len(paths), megabytes, acked, indexed, cpu)


def _print(runs: list[Run], rss: dict[str, dict[str, int]]) -> None:
    print()
    header = f"{'target':<26}{'workload':<14}{'assoc':>6}{'acked inst/s':>14}{'acked MB/s':>12}{'indexed inst/s':>16}{'indexed MB/s':>14}{'CPU s/1000':>12}"
    print(header)
    print("-" * len(header))
    for r in runs:
        row = r.row()
        print(
            f"{r.target:<26}{r.workload:<14}{r.associations:>6}{row['acked inst/s']:>14}{row['acked MB/s']:>12}"
            f"{row.get('indexed inst/s', '-')!s:>16}{row.get('indexed MB/s', '-')!s:>14}{row['CPU s/1000 inst']:>12}"
        )
    print("\nCPU seconds per 1000 instances, by process:")
    for r in runs:
        print(f"  {r.target:<26}{r.workload:<14}{r.associations} assoc: {r.row()['CPU by process']}")
    print("\nPeak RSS (MB):")
    for target, values in rss.items():
        print(f"  {target:<26}" + ", ".join(f"{k} {v / MB:.0f}" for k, v in values.items()))
    pacs = [r for r in runs if r.target.startswith("PACS")]
    orthanc = [r for r in runs if r.target.startswith("Orthanc")]
    if pacs and orthanc:
        print("\nPACS / Orthanc ratios (indexed inst/s; CPU per instance, lower is better):")
        for p in pacs:
            o = next(
                (o for o in orthanc if o.workload == p.workload and o.associations == p.associations), None
            )
            if o is None or p.indexed_seconds is None:
                continue
            speed = (p.instances / p.indexed_seconds) / (o.instances / o.acked_seconds)
            cpu = (sum(p.cpu.values()) / p.instances) / max(sum(o.cpu.values()) / o.instances, 1e-9)
            print(f"  {p.workload:<14}{p.associations} assoc: throughput x{speed:.2f}   CPU x{cpu:.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (figures of each are printed)")
    parser.add_argument("--no-compare", action="store_true", help="skip Orthanc and storescp")
    parser.add_argument(
        "--only",
        choices=("store", "query", "dicomweb", "hsm", "prefetch", "associations"),
        help="run only the C-STORE, query/retrieve, DICOMweb, tier migration, prefetch or associations benchmark",
    )
    bench_query.add_arguments(parser)
    bench_dicomweb.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.only in (None, "store"):
        _store_bench(args)
    if args.only in (None, "query"):
        bench_query.run_query_bench(
            instances=args.instances,
            queries=args.queries,
            kind_budget=args.kind_budget,
            move_repeat=args.move_repeat,
            compare=not args.no_compare,
        )
    if args.only in (None, "dicomweb"):
        bench_dicomweb.run_dicomweb_bench(
            instances=args.instances,
            queries=args.queries,
            kind_budget=args.qido_kind_budget,
            stow_repeat=args.stow_repeat,
            workers=args.workers,
            compare=not args.no_compare,
        )
    if args.only in (None, "hsm"):
        bench_hsm.main([])
    if args.only in (None, "prefetch"):
        bench_prefetch.main([])
    if args.only in (None, "associations"):
        bench_associations.main([])


def _store_bench(args: argparse.Namespace) -> None:
    runs: list[Run] = []
    rss: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        workdir = Path(tmp)
        data = workdir / "data"
        seed = 1000
        with running_system(
            workdir / "pacs", gateways=args.gateways, workers=args.workers, throwaway_infra=True
        ) as system:
            target = PacsTarget(system)
            for workload in WORKLOADS:
                for associations in (1, 4):
                    for _ in range(args.repeat):
                        seed += 1
                        runs.append(_measure(target, workload, associations, data, seed))
                        print(runs[-1].row(), flush=True)
            rss[target.name] = target.peak_rss()
        if not args.no_compare:
            for start in (_start_orthanc, _start_storescp, _start_bare_pynetdicom):
                try:
                    other = start(workdir)
                except RuntimeError as exc:
                    print(f"skipped a comparison: {exc}", flush=True)
                    continue
                if other is None:
                    continue
                try:
                    for workload in WORKLOADS:
                        for associations in (1, 4):
                            for _ in range(args.repeat):
                                seed += 1
                                runs.append(_measure(other, workload, associations, data, seed))
                                print(runs[-1].row(), flush=True)
                    rss[other.name] = other.peak_rss()
                finally:
                    other.proc.terminate()
                    other.proc.wait(30)
    _print(runs, rss)


if __name__ == "__main__":
    main()
