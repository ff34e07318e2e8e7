"""DICOM media with the whole system: a study sent with DCMTK's storescu is
exported with ``pacs export`` as a File-set (and a zip) that DCMTK and
pydicom read back byte for byte; a de-identified export is imported again
with ``pacs import`` and indexed as a new study, non-DICOM files reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet

from pacs_common.localrun.runner import LocalSystem
from pacs_common.media.testing import dcmtk_build, dcmtk_records
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import storescu
from pacs_e2e.index import IndexReader

SALT = "an-e2e-salt-of-enough-bytes"


def _pacs(pacs: LocalSystem, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs export|import ...`` against the system, with a de-identification salt."""
    environment = {**os.environ, **pacs.env, "PACS_DEIDENTIFY_SALT": SALT}
    return subprocess.run(
        [str(Path(sys.executable).with_name("pacs")), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_export_then_reimport_deidentified(pacs: LocalSystem, index: IndexReader, tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", 4, rows=64, columns=64, patient_name="MEDIA^PATIENT")
    sent = [dcmread(p, stop_before_pixels=True) for p in paths]
    study = str(sent[0].StudyInstanceUID)
    storescu(pacs.gateway_port, paths, called=pacs.ae_title)
    rows = index.wait_for_instances(str(ds.SOPInstanceUID) for ds in sent)

    out, archive = tmp_path / "media", tmp_path / "media.zip"
    exported = _pacs(pacs, "export", study, "-o", str(out), "--zip", str(archive))
    assert exported.returncode == 0, exported.stderr
    assert "exported 4 instance(s)" in exported.stdout
    assert dcmtk_records(out / "DICOMDIR") == ["PATIENT", "STUDY", "SERIES", *["IMAGE"] * 4]
    file_set = FileSet(dcmread(out / "DICOMDIR"))
    assert len(file_set) == 4
    for instance in file_set:
        stored = (pacs.storage_path / rows[instance.SOPInstanceUID]["key"]).read_bytes()
        assert Path(instance.path).read_bytes() == stored
    assert dcmtk_build(out, [i.FileID for i in file_set], tmp_path / "DCMTKDIR") == ""
    with zipfile.ZipFile(archive) as zipped:
        assert zipped.read("DICOMDIR") == (out / "DICOMDIR").read_bytes()

    anonymous = tmp_path / "anonymous"
    deidentified = _pacs(pacs, "export", study, "-o", str(anonymous), "--deidentify", "--explicit-le")
    assert deidentified.returncode == 0, deidentified.stderr
    new_uids = [i.SOPInstanceUID for i in FileSet(dcmread(anonymous / "DICOMDIR"))]
    assert not set(new_uids) & set(rows)
    (tmp_path / "notes.txt").write_text("not DICOM")

    imported = _pacs(pacs, "import", str(anonymous), str(tmp_path / "notes.txt"), "--json")
    assert imported.returncode == 1, imported.stderr  # the text file
    report = json.loads(imported.stdout)
    assert report["summary"] == {"stored": 4, "not_dicom": 1, "broken_record": 0, "refused": 0}
    indexed = index.wait_for_instances(new_uids)
    assert {r["study_instance_uid"] for r in indexed.values()} != {study}
    assert all("MEDIA" not in str(r["patient_name"]) for r in indexed.values())
