"""Prior-study prefetch benchmark (``python -m pacs_e2e.bench_prefetch``),
and the helpers the prefetch end-to-end tests share.

Starts the PACS with a prefetch-scheduler, and Orthanc (the remote PACS)
holding ``--priors`` prior studies of ``--images`` images for each of
``--patients`` patients.  For each patient in turn it schedules a worklist
item and measures the latency until every prior is queryable locally: a
Study Root C-FIND at our gateway answers each prior study with all its
instances.  Prints the median and p95; never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from pacs_common.db.pool import create_pool
from pacs_common.localrun.runner import LocalSystem
from pacs_common.settings import DatabaseSettings
from pacs_common.workflow.worklist import add_item
from pacs_e2e.corpus import SeriesSpec, StudyFiles, write_study
from pacs_e2e.index import IndexReader
from pacs_e2e.orthanc import OrthancServer
from pacs_e2e.system import pacs_cli, running_system

REMOTE_AE = "ORTHANC"
PENDING = frozenset({0xFF00, 0xFF01})

#: Settings that make prefetch quick to observe (and to give up) in tests.
PREFETCH_ENV = {
    "PACS_PREFETCH_SOURCES": REMOTE_AE,
    "PACS_PREFETCH_POLL_INTERVAL_SECONDS": "0.3",
    "PACS_PREFETCH_RETRY_BASE_SECONDS": "0.3",
    "PACS_PREFETCH_RETRY_MAX_SECONDS": "1",
    "PACS_PREFETCH_MAX_ATTEMPTS": "3",
    "PACS_PREFETCH_LOOKBACK_YEARS": "5",
    "PACS_PREFETCH_MAX_STUDIES": "3",
    "PACS_PREFETCH_REMOTE_MIN_MOVE_INTERVAL_SECONDS": "0",
    "PACS_PREFETCH_CONNECT_TIMEOUT_SECONDS": "3",
    "PACS_PREFETCH_INDEX_WAIT_SECONDS": "60",
}


@contextmanager
def remote_pacs(workdir: Path, system: LocalSystem, *, aet: str = REMOTE_AE) -> Iterator[OrthancServer]:
    """Orthanc that knows our gateway as a C-MOVE destination, registered in
    our node registry under ``aet``."""
    modalities = {system.ae_title: ("127.0.0.1", system.gateway_port)}
    with OrthancServer(workdir, aet=aet, modalities=modalities) as orthanc:
        added = pacs_cli(system, "node", "add", aet, "--host", "127.0.0.1", "--port", str(orthanc.dicom_port))
        if added.returncode != 0:
            raise RuntimeError(f"pacs node add {aet}: {added.stderr}")
        yield orthanc


def upload_priors(
    orthanc: OrthancServer,
    directory: Path,
    patient_id: str,
    specs: Sequence[tuple[str, str, int]],
) -> list[StudyFiles]:
    """Studies of ``patient_id`` at the remote PACS: (StudyDate, modality, images) each."""
    studies = []
    for number, (day, modality, images) in enumerate(specs):
        study = write_study(
            directory,
            patient_id=patient_id,
            patient_name=f"PRIOR^{patient_id}",
            study_date=day,
            accession_number=f"{patient_id[-10:]}-{number}",
            series=[SeriesSpec(modality, images)],
            study_description=f"{modality} prior {number}",
        )
        for path in study.paths:
            orthanc.upload(path)
        studies.append(study)
    return studies


def years_ago(years: int) -> str:
    today = date.today()
    return f"{today.year - years}{today:%m}01"


def worklist_item(patient_id: str, modality: str = "CT") -> dict[str, Any]:
    """A worklist item (DICOM JSON) for today."""
    return {
        "00100020": {"vr": "LO", "Value": [patient_id]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"PRIOR^{patient_id}"}]},
        "00400100": {
            "vr": "SQ",
            "Value": [
                {
                    "00080060": {"vr": "CS", "Value": [modality]},
                    "00400002": {"vr": "DA", "Value": [f"{date.today():%Y%m%d}"]},
                    "00400003": {"vr": "TM", "Value": ["235900"]},
                }
            ],
        },
    }


def schedule(system: LocalSystem, *patient_ids: str, modality: str = "CT") -> None:
    """Create a worklist item for each patient, all at once."""

    async def add() -> None:
        pool = await create_pool(DatabaseSettings(url=system.database_url, pool_min_size=1, pool_max_size=4))
        try:
            await asyncio.gather(*(add_item(pool, worklist_item(p, modality)) for p in patient_ids))
        finally:
            await pool.close()

    asyncio.run(add())


def prefetch_jobs(index: IndexReader) -> list[dict[str, Any]]:
    rows = index.fetch(
        "SELECT id, state, error, params, attempts, progress_done, progress_total FROM job "
        "WHERE kind = 'prefetch' ORDER BY id"
    )
    for row in rows:
        row["params"] = json.loads(row["params"]) if isinstance(row["params"], str) else row["params"]
    return rows


def wait_for_prefetch_jobs(index: IndexReader, count: int, timeout: float = 120) -> list[dict[str, Any]]:
    """Wait until there are at least ``count`` prefetch jobs and all have ended."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = prefetch_jobs(index)
        if len(jobs) >= count and all(j["state"] in {"done", "failed", "cancelled"} for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"prefetch jobs not finished after {timeout}s: {jobs}")
        time.sleep(0.2)


def local_studies(system: LocalSystem, patient_id: str, *, calling: str = "BENCH") -> dict[str, int]:
    """Study Instance UID → Number of Study Related Instances, as a Study Root
    C-FIND at our gateway answers for ``patient_id``."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", system.gateway_port, ae_title=system.ae_title)
    if not assoc.is_established:
        raise RuntimeError("no association with the gateway")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedInstances = ""
    found: dict[str, int] = {}
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if "Status" in status and int(status.Status) in PENDING and identifier is not None:
                found[str(identifier.StudyInstanceUID)] = int(identifier.NumberOfStudyRelatedInstances or 0)
    finally:
        assoc.release()
    return found


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def run_prefetch_bench(patients: int, priors: int, images: int, poll_interval: float) -> list[float]:
    """Latencies (seconds) from worklist item to every prior queryable locally, one per patient."""
    env = {
        **PREFETCH_ENV,
        "PACS_PREFETCH_POLL_INTERVAL_SECONDS": str(poll_interval),
        "PACS_PREFETCH_MAX_STUDIES": str(priors),
        "PACS_PREFETCH_LOOKBACK_YEARS": str(priors + 1),
    }
    latencies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pacs-bench-prefetch-") as tmp:
        base = Path(tmp)
        with (
            running_system(base / "pacs", prefetch_schedulers=1, extra_env=env) as system,
            remote_pacs(base / "orthanc", system) as orthanc,
        ):
            expected: dict[str, dict[str, int]] = {}
            for n in range(patients):
                patient = f"BENCH-PF-{n}"
                specs = [(years_ago(1 + k), "CT" if k % 2 == 0 else "MR", images) for k in range(priors)]
                studies = upload_priors(orthanc, base / "priors", patient, specs)
                expected[patient] = {s.study_instance_uid: len(s.paths) for s in studies}
            print(f"Orthanc holds {patients} patients × {priors} priors × {images} images")
            for patient, wanted in expected.items():
                started = time.monotonic()
                schedule(system, patient)
                while True:
                    found = local_studies(system, patient)
                    if all(found.get(uid, 0) >= count for uid, count in wanted.items()):
                        break
                    if time.monotonic() - started > 300:
                        raise RuntimeError(f"priors of {patient} not queryable after 300s")
                    time.sleep(0.05)
                latencies.append(time.monotonic() - started)
                print(f"  {patient}: {latencies[-1]:.2f}s")
    return latencies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=5, help="patients measured, one after another")
    parser.add_argument("--priors", type=int, default=3, help="prior studies per patient at the remote")
    parser.add_argument("--images", type=int, default=10, help="images per prior study")
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="PACS_PREFETCH_POLL_INTERVAL_SECONDS (default 1)"
    )
    args = parser.parse_args(argv)
    latencies = run_prefetch_bench(args.patients, args.priors, args.images, args.poll_interval)
    print(
        f"prefetch latency, worklist item → {args.priors} priors of {args.images} images queryable "
        f"(scan every {args.poll_interval:g}s), {len(latencies)} patients: "
        f"median {statistics.median(latencies):.2f}s, p95 {_percentile(latencies, 0.95):.2f}s"
    )


if __name__ == "__main__":
    main()
