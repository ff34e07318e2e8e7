"""Many simultaneous associations at the gateway (``python -m
pacs_e2e.bench_associations``), and the helpers the load test shares.

Opens ``--associations`` pynetdicom SCU associations at once (one thread
each) and holds them all open; while every one is held, each C-STOREs its
own instances and C-FINDs a study that was indexed beforehand; then all are
released.  Measures the gateway process: resident memory before, while
holding (idle, and after the work) and after release, the memory per held
association, its threads, and its CPU while the associations sit idle
(pynetdicom's reactor and DUL threads poll every ~1 ms).  Prints the
figures; never fails on time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import run as dcmtk_run
from pacs_e2e.index import IndexReader
from pacs_e2e.procstat import cpu_seconds
from pacs_e2e.system import running_system

CALLING_AE: Final = "LOADSCU"
SUCCESS: Final = 0x0000
PENDING: Final = frozenset({0xFF00, 0xFF01})
MB: Final = 1024 * 1024
# Generous: under 200 associations a pynetdicom process spends a core on
# polling, and a response may take long on a loaded machine; the load test
# asserts what is answered, not how fast.
SCU_TIMEOUT_SECONDS: Final = 300.0


def current_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def thread_count(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/task").iterdir()))
    except OSError:
        return 0


def gateway_env(max_associations: int) -> dict[str, str]:
    """Environment of a system whose gateway accepts ``max_associations`` at
    once (and waits as long as the SCUs for a slow peer)."""
    return {
        "PACS_GATEWAY_MAX_ASSOCIATIONS": str(max_associations),
        "PACS_GATEWAY_NETWORK_TIMEOUT_SECONDS": str(SCU_TIMEOUT_SECONDS),
        "PACS_GATEWAY_DIMSE_TIMEOUT_SECONDS": str(SCU_TIMEOUT_SECONDS),
    }


# -- one association -------------------------------------------------------------------


@dataclass
class AssociationOutcome:
    """What one held association saw."""

    established: bool
    store_statuses: list[int | None] = field(default_factory=list)
    find_status: int | None = None
    find_matches: int = 0
    error: str | None = None

    @property
    def all_stored(self) -> bool:
        return bool(self.store_statuses) and all(s == SUCCESS for s in self.store_statuses)


def scu(paths: Sequence[Path], calling: str = CALLING_AE) -> AE:
    """An SCU proposing the storage contexts of ``paths`` (their own
    transfer syntaxes) and Study Root C-FIND."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = SCU_TIMEOUT_SECONDS
    ae.dimse_timeout = SCU_TIMEOUT_SECONDS
    ae.network_timeout = SCU_TIMEOUT_SECONDS
    contexts = set()
    for path in paths:
        meta, _ = split_dataset(path)
        contexts.add((UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)))
    for sop_class, transfer_syntax in sorted(contexts):
        ae.add_requested_context(sop_class, transfer_syntax)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae


def _status(response: Dataset | None) -> int | None:
    if response is None or "Status" not in response:
        return None
    return int(response.Status)


def find_study(assoc: Association, study_instance_uid: str) -> tuple[int | None, int]:
    """Study Root C-FIND of one study: (final status, matches)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    query.NumberOfStudyRelatedInstances = ""
    matches, final = 0, None
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = _status(status)
        if code in PENDING and identifier is not None:
            matches += 1
        else:
            final = code
    return final, matches


def exercise(assoc: Association, paths: Sequence[Path], study_instance_uid: str) -> AssociationOutcome:
    """C-STORE ``paths`` and C-FIND the study on a held association."""
    outcome = AssociationOutcome(established=assoc.is_established)
    if not assoc.is_established:
        return outcome
    try:
        outcome.store_statuses = [_status(assoc.send_c_store(path)) for path in paths]
        outcome.find_status, outcome.find_matches = find_study(assoc, study_instance_uid)
    except Exception as exc:  # reported, not raised: the other threads go on
        outcome.error = repr(exc)
    return outcome


# -- many at once ----------------------------------------------------------------------------


@dataclass
class LoadFigures:
    associations: int
    established: int
    outcomes: list[AssociationOutcome]
    rss_before: int
    rss_holding_idle: int
    rss_holding_after_work: int
    rss_after: int
    threads_before: int
    threads_holding: int
    idle_cpu_baseline: float  # CPU seconds per second, no associations
    idle_cpu_holding: float  # CPU seconds per second, all held and idle
    open_seconds: float
    work_seconds: float
    release_seconds: float

    @property
    def rss_per_association(self) -> float:
        return (self.rss_holding_idle - self.rss_before) / max(self.established, 1)

    def lines(self) -> list[str]:
        stored = sum(len(o.store_statuses) for o in self.outcomes if o.all_stored)
        return [
            f"associations held at once: {self.established} of {self.associations} "
            f"(opened in {self.open_seconds:.2f} s, worked in {self.work_seconds:.2f} s, "
            f"released in {self.release_seconds:.2f} s)",
            f"C-STOREs succeeded: {stored}; C-FINDs succeeded: "
            f"{sum(1 for o in self.outcomes if o.find_status == SUCCESS)}",
            f"gateway RSS MB: before {self.rss_before / MB:.1f}, holding idle "
            f"{self.rss_holding_idle / MB:.1f}, holding after work {self.rss_holding_after_work / MB:.1f}, "
            f"after release {self.rss_after / MB:.1f}",
            f"gateway RSS per held association: {self.rss_per_association / 1024:.0f} KiB",
            f"gateway threads: {self.threads_before} before, {self.threads_holding} holding",
            f"gateway CPU while idle (cores): {self.idle_cpu_baseline:.3f} with none, "
            f"{self.idle_cpu_holding:.3f} holding {self.established} "
            f"({(self.idle_cpu_holding - self.idle_cpu_baseline) / max(self.established, 1) * 1000:.2f} "
            f"milli-cores per association)",
        ]


def _cpu_per_second(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def hold_many(
    port: int,
    called: str,
    gateway_pid: int,
    batches: Sequence[Sequence[Path]],
    study_instance_uid: str,
    *,
    idle_seconds: float = 2.0,
    open_concurrency: int = 16,
    while_held: Callable[[], None] | None = None,
) -> LoadFigures:
    """One association per batch, all open at once; each C-STOREs its batch
    and C-FINDs ``study_instance_uid`` while all are held; ``while_held``
    runs with every association still open; then all are released.

    Associations are requested ``open_concurrency`` at a time (a burst of
    connects larger than the gateway's listen backlog is answered by the
    kernel dropping SYNs, which clients see as seconds of retransmits)."""
    count = len(batches)
    ae = scu([p for batch in batches for p in batch][:1])
    threads_before = thread_count(gateway_pid)
    rss_before = current_rss_bytes(gateway_pid)
    idle_baseline = _cpu_per_second(gateway_pid, idle_seconds)
    all_open = threading.Barrier(count)

    def open_one(_: int) -> Association:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        return assoc

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=open_concurrency) as opener:
            held = list(opener.map(open_one, range(count)))
        open_seconds = time.perf_counter() - started
        established = sum(1 for a in held if a.is_established)
        time.sleep(0.5)  # the gateway's threads settle
        rss_holding_idle = current_rss_bytes(gateway_pid)
        threads_holding = thread_count(gateway_pid)
        idle_holding = _cpu_per_second(gateway_pid, idle_seconds)

        def work(index: int) -> AssociationOutcome:
            with_barrier = held[index].is_established
            if with_barrier and established == count:
                all_open.wait(timeout=60)  # every thread starts its work together
            return exercise(held[index], batches[index], study_instance_uid)

        started = time.perf_counter()
        outcomes = list(pool.map(work, range(count)))
        work_seconds = time.perf_counter() - started
        rss_holding_after_work = current_rss_bytes(gateway_pid)
        if while_held is not None:
            while_held()
        started = time.perf_counter()
        list(pool.map(lambda a: a.release() if a.is_established else None, held))
        release_seconds = time.perf_counter() - started
    time.sleep(1.0)  # association threads end
    return LoadFigures(
        associations=count,
        established=established,
        outcomes=outcomes,
        rss_before=rss_before,
        rss_holding_idle=rss_holding_idle,
        rss_holding_after_work=rss_holding_after_work,
        rss_after=current_rss_bytes(gateway_pid),
        threads_before=threads_before,
        threads_holding=threads_holding,
        idle_cpu_baseline=idle_baseline,
        idle_cpu_holding=idle_holding,
        open_seconds=open_seconds,
        work_seconds=work_seconds,
        release_seconds=release_seconds,
    )


def prepare_batches(directory: Path, associations: int, stores: int) -> list[list[Path]]:
    """``stores`` small CT images per association, one study each."""
    return [
        write_ct_series(directory / f"a{i}", stores, rows=32, columns=32, patient_id=f"LOAD{i}", seed=i)
        for i in range(associations)
    ]


def store_known_study(system: LocalSystem, index: IndexReader, directory: Path) -> tuple[str, list[str]]:
    """A study sent with DCMTK storescu and waited for in the index: what
    every association's C-FIND looks for.  (Study UID, SOP Instance UIDs.)"""
    paths = write_ct_series(directory, 3, rows=32, columns=32, patient_id="LOADKNOWN", seed=9999)
    result = dcmtk_run(
        [
            "storescu",
            "-aet",
            "LOADPREP",
            "-aec",
            system.ae_title,
            "127.0.0.1",
            str(system.gateway_port),
            *map(str, paths),
        ],
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.output[-500:]}")
    datasets = [dcmread(p, stop_before_pixels=True) for p in paths]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    index.wait_for_instances(uids, timeout=60)
    return str(datasets[0].StudyInstanceUID), uids


def sop_instance_uids(batches: Sequence[Sequence[Path]]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for batch in batches for p in batch]


def run_associations_bench(
    *, associations: int = 200, stores: int = 2, idle_seconds: float = 3.0
) -> LoadFigures:
    print(
        f"\n== {associations} simultaneous associations at one gateway process: "
        f"{stores} C-STOREs and 1 C-FIND each while all are held",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="pacs-bench-assoc-") as tmp:
        workdir = Path(tmp)
        with running_system(
            workdir / "pacs", gateways=1, workers=1, throwaway_infra=True, extra_env=gateway_env(associations)
        ) as system:
            index = IndexReader(system.database_url)
            study, _ = store_known_study(system, index, workdir / "known")
            batches = prepare_batches(workdir / "load", associations, stores)
            gateway_pid = system.gateways[0].pid
            assert gateway_pid is not None
            figures = hold_many(
                system.gateway_port, system.ae_title, gateway_pid, batches, study, idle_seconds=idle_seconds
            )
            uids = sop_instance_uids(batches)
            started = time.perf_counter()
            index.wait_for_instances(uids, timeout=300)
            indexed_after = time.perf_counter() - started
    for line in figures.lines():
        print(f"  {line}", flush=True)
    print(f"  every stored instance indexed {indexed_after:.2f} s after release", flush=True)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument("--stores", type=int, default=2, help="C-STOREs per association")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="CPU sampling time while idle")
    args = parser.parse_args(argv)
    run_associations_bench(associations=args.associations, stores=args.stores, idle_seconds=args.idle_seconds)


if __name__ == "__main__":
    main()
