"""Scheduled maintenance tasks with the whole system running and two
prefetch-scheduler replicas: an administrator sets retention rules and a
hold with the ``pacs`` command, triggers the retention task and waits for
it; the run happens exactly once (on one of the replicas), the expired
study is gone from the index and from storage, the recent and the held
ones stay, and the deletion is in the audit trail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import SeriesSpec, StudyFiles, write_study
from pacs_e2e.dcmtk import storescu
from pacs_e2e.index import IndexReader
from pacs_e2e.system import running_system


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with running_system(
        tmp_path_factory.mktemp("tasks"),
        gateways=1,
        workers=1,
        prefetch_schedulers=2,
        extra_env={"PACS_TASKS_POLL_INTERVAL_SECONDS": "0.2", "PACS_TASKS_LEASE_SECONDS": "10"},
    ) as running:
        yield running


def pacs_tasks(system: LocalSystem, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pacs_common.cli.main", "tasks", *args],
        env={**os.environ, "PACS_DB_URL": system.database_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _study(directory: Path, patient: str, study_date: str) -> StudyFiles:
    return write_study(
        directory,
        patient_id=patient,
        patient_name=f"Retention^{patient}",
        study_date=study_date,
        accession_number=patient,
        series=[SeriesSpec("CR", 2)],
    )


def _study_uids(index: IndexReader) -> set[str]:
    return {r["study_instance_uid"] for r in index.fetch("SELECT study_instance_uid FROM study")}


def test_a_triggered_retention_runs_once_across_two_replicas(system: LocalSystem, tmp_path: Path) -> None:
    index = IndexReader(system.database_url)
    old = _study(tmp_path, "OLD", "20050101")
    held = _study(tmp_path, "HELD", "20050101")
    recent = _study(tmp_path, "NEW", datetime.now(UTC).strftime("%Y%m%d"))
    paths = old.paths + held.paths + recent.paths
    result = storescu(system.gateway_port, paths, called=system.ae_title)
    assert result.returncode == 0, result.output
    sops = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    rows = index.wait_for_instances(sops)
    old_keys = [
        r["key"]
        for r in index.fetch(
            "SELECT l.key FROM instance_location l JOIN instance i ON i.pk = l.instance_fk "
            "JOIN series s ON s.pk = i.series_fk JOIN study st ON st.pk = s.study_fk "
            "WHERE st.study_instance_uid = $1",
            old.study_instance_uid,
        )
    ]
    assert len(rows) == 6 and len(old_keys) == 2
    assert all((system.storage_path / key).exists() for key in old_keys)

    # The migration's default tasks are there, retention without rules.
    listed = {t["name"]: t for t in json.loads(pacs_tasks(system, "list", "--json").stdout)}
    assert set(listed) >= {"retention", "integrity", "orphans"}
    assert listed["retention"]["params"] == {"rules": []}

    pacs_tasks(system, "set", "retention", "--params", '{"rules": [{"modality": "CR", "days": 365}]}')
    pacs_tasks(system, "hold", held.study_instance_uid, "--reason", "legal")
    waited = pacs_tasks(system, "trigger", "retention", "--wait", "--timeout", "90")
    assert "succeeded" in waited.stdout

    time.sleep(1.5)  # several polls of both replicas: nobody runs it again
    runs: list[dict[str, Any]] = json.loads(pacs_tasks(system, "history", "retention", "--json").stdout)
    assert len(runs) == 1
    run = runs[0]
    assert (run["status"], run["trigger"]) == ("succeeded", "manual")
    assert (run["summary"]["deleted_studies"], run["summary"]["protected_studies"]) == (
        1, [held.study_instance_uid]
    )  # fmt: skip

    remaining = _study_uids(index)
    assert old.study_instance_uid not in remaining
    assert {held.study_instance_uid, recent.study_instance_uid} <= remaining
    assert not any((system.storage_path / key).exists() for key in old_keys)
    audit = index.fetch(
        "SELECT event_name, actor FROM audit_event WHERE $1 = ANY(study_uids) AND action = 'D'",
        old.study_instance_uid,
    )
    assert audit == [{"event_name": "DICOM Study Deleted", "actor": "prefetch-scheduler/retention"}]
