"""Workflow DIMSE end to end: a worklist scheduled with ``pacs worklist``
and queried by DCMTK ``findscu -W``; a modality's MPPS N-CREATE/N-SET
moving the scheduled step along; Storage Commitment with the N-EVENT-REPORT
coming back on the requester's association."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import SeriesSpec, write_study
from pacs_e2e.dcmtk import findscu, store_outcomes, storescu
from pacs_e2e.index import IndexReader
from pacs_e2e.system import pacs_cli

MPPS = "1.2.840.10008.3.1.2.3.3"
COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def _schedule(pacs: LocalSystem, *args: str) -> dict[str, object]:
    result = pacs_cli(pacs, "worklist", "add", "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    stored = json.loads(result.stdout)
    item = stored[0] if isinstance(stored, list) else stored
    return dict(item)


def _worklist(pacs: LocalSystem, accession: str) -> dict[str, object]:
    result = pacs_cli(pacs, "worklist", "list", "--json")
    assert result.returncode == 0, result.stderr
    (item,) = [i for i in json.loads(result.stdout) if i.get("accession_number") == accession]
    return dict(item)


def test_findscu_worklist_and_mpps_progress(pacs: LocalSystem, tmp_path: Path) -> None:
    study_uid = generate_uid()
    _schedule(
        pacs,
        "--patient-id=WL-1",
        "--patient-name=Yamada^Hanako",
        "--accession=WL-ACC1",
        "--modality=CT",
        "--station-ae=CT01",
        "--start=202611230900",
        "--sps-id=SPS-1",
        f"--study-uid={study_uid}",
        "--procedure-description=CT chest",
    )
    _schedule(
        pacs,
        "--patient-id=WL-2",
        "--patient-name=Smith^Anna",
        "--accession=WL-ACC2",
        "--modality=MR",
        "--station-ae=MR01",
        "--start=202611240800",
    )

    # The CT modality asks for today's CT steps on its station, as modalities do.
    result, responses = findscu(
        pacs.gateway_port,
        "-W",
        [
            "(0040,0100)[0].Modality=CT",
            "(0040,0100)[0].ScheduledStationAETitle=CT01",
            "(0040,0100)[0].ScheduledProcedureStepStartDate=20261123",
            "(0040,0100)[0].ScheduledProcedureStepStartTime",
            "(0040,0100)[0].ScheduledProcedureStepID",
            "PatientName",
            "PatientID",
            "AccessionNumber",
            "StudyInstanceUID",
            "RequestedProcedureDescription",
        ],
        tmp_path,
        calling="CT01",
    )
    assert result.returncode == 0, result.output
    (item,) = responses
    assert item.AccessionNumber == "WL-ACC1"
    assert str(item.PatientName) == "Yamada^Hanako"
    assert item.StudyInstanceUID == study_uid
    assert item.RequestedProcedureDescription == "CT chest"
    step = item.ScheduledProcedureStepSequence[0]
    assert step.Modality == "CT"
    assert step.ScheduledProcedureStepID == "SPS-1"
    assert step.ScheduledProcedureStepStartTime.startswith("0900")

    # A wildcard on the name finds both patients' steps.
    _, both = findscu(pacs.gateway_port, "-W", ["PatientName=*a*", "AccessionNumber"], tmp_path)
    assert sorted(str(r.AccessionNumber) for r in both) == ["WL-ACC1", "WL-ACC2"]

    # The modality starts and completes the step.
    ae = AE(ae_title="CT01")
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", pacs.gateway_port, ae_title="PACS")
    assert assoc.is_established
    mpps_uid = generate_uid()
    try:
        create = Dataset()
        create.PatientName, create.PatientID = "Yamada^Hanako", "WL-1"
        scheduled = Dataset()
        scheduled.StudyInstanceUID = study_uid
        scheduled.AccessionNumber = "WL-ACC1"
        scheduled.ScheduledProcedureStepID = "SPS-1"
        create.ScheduledStepAttributesSequence = [scheduled]
        create.PerformedProcedureStepID = "PPS-1"
        create.PerformedStationAETitle = "CT01"
        create.PerformedProcedureStepStartDate = "20261123"
        create.PerformedProcedureStepStartTime = "090500"
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        create.Modality = "CT"
        status, _ = assoc.send_n_create(create, MPPS, mpps_uid)
        assert status is not None and status.Status == 0x0000
        assert _worklist(pacs, "WL-ACC1")["sps_status"] == "IN PROGRESS"

        complete = Dataset()
        complete.PerformedProcedureStepStatus = "COMPLETED"
        complete.PerformedProcedureStepEndDate = "20261123"
        complete.PerformedProcedureStepEndTime = "091500"
        series = Dataset()
        series.SeriesInstanceUID = generate_uid()
        series.ReferencedImageSequence = []
        complete.PerformedSeriesSequence = [series]
        status, _ = assoc.send_n_set(complete, MPPS, mpps_uid)
        assert status is not None and status.Status == 0x0000
        assert _worklist(pacs, "WL-ACC1")["sps_status"] == "COMPLETED"

        # A completed step may no longer be updated; an unknown one does not exist.
        again = Dataset()
        again.PerformedProcedureStepStatus = "DISCONTINUED"
        status, _ = assoc.send_n_set(again, MPPS, mpps_uid)
        assert status is not None and status.Status == 0x0110
        status, _ = assoc.send_n_set(again, MPPS, generate_uid())
        assert status is not None and status.Status == 0x0112
    finally:
        assoc.release()


def test_storage_commitment_report_on_the_same_association(
    pacs: LocalSystem, index: IndexReader, tmp_path: Path
) -> None:
    study = write_study(
        tmp_path,
        patient_id="SC-1",
        patient_name="Commit^Carl",
        study_date="20261123",
        accession_number="SC-ACC1",
        series=[SeriesSpec("CT", 2)],
    )
    outcomes = store_outcomes(storescu(pacs.gateway_port, study.paths))
    assert set(outcomes.values()) == {"Success"}, outcomes
    stored = [dcmread(p, stop_before_pixels=True) for p in study.paths]
    index.wait_for_instances([str(ds.SOPInstanceUID) for ds in stored])

    reports: list[Dataset] = []
    received = threading.Event()

    def on_report(event: Event) -> tuple[int, None]:
        reports.append(event.event_information)
        received.set()
        return 0x0000, None

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(COMMITMENT)
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = COMMITMENT
    role.scu_role = True
    role.scp_role = True
    assoc = ae.associate(
        "127.0.0.1",
        pacs.gateway_port,
        ae_title="PACS",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    transaction = generate_uid()
    missing = generate_uid()
    try:
        request = Dataset()
        request.TransactionUID = transaction
        items = []
        for ds in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            items.append(item)
        unknown = Dataset()
        unknown.ReferencedSOPClassUID = stored[0].SOPClassUID
        unknown.ReferencedSOPInstanceUID = missing
        request.ReferencedSOPSequence = [*items, unknown]
        status, _ = assoc.send_n_action(request, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assert status is not None and status.Status == 0x0000
        assert received.wait(60), "no N-EVENT-REPORT"
    finally:
        assoc.release()

    (report,) = reports
    assert report.TransactionUID == transaction
    assert {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence} == {
        str(ds.SOPInstanceUID) for ds in stored
    }
    (failed,) = report.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == missing
    assert failed.FailureReason == 0x0112
