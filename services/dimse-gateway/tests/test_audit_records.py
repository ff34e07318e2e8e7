"""What the gateway's audit records say for C-MOVE / C-GET, MPPS and Storage
Commitment answers, and that a failing sink never reaches the DICOM
operation (the association paths are in test_audit_dimse.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.events import Event

from dimse_gateway.audit import DimseAudit, outcome_of_status
from pacs_common.audit import AuditOutcome, AuditRecord


class _Sink:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def submit(self, record: AuditRecord) -> bool:
        self.records.append(record)
        return True


class _BrokenSink:
    def submit(self, record: AuditRecord) -> bool:
        raise RuntimeError("queue gone")


def _assoc(ae_title: str = "VIEWER") -> Association:
    requestor = SimpleNamespace(ae_title=ae_title, address="10.0.0.5", primitive=None)
    return cast(Association, SimpleNamespace(requestor=requestor))


def _event(assoc: Association) -> Event:
    return cast(Event, SimpleNamespace(assoc=assoc))


def _answer(status: int) -> Dataset:
    answer = Dataset()
    answer.Status = status
    return answer


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, AuditOutcome.SUCCESS),
        (0xB000, AuditOutcome.MINOR_FAILURE),
        (0xFE00, AuditOutcome.MINOR_FAILURE),
        (0xA702, AuditOutcome.SERIOUS_FAILURE),
        (None, AuditOutcome.SERIOUS_FAILURE),
    ],
)
def test_dimse_statuses_as_outcomes(status: int | None, outcome: AuditOutcome) -> None:
    assert outcome_of_status(status) == outcome


def test_a_move_names_the_destination_and_the_studies_sent() -> None:
    sink = _Sink()
    DimseAudit(sink, "PACS").transferred(
        _assoc(), "C-MOVE", 0xB000, ["1.2.1", "1.2.1", "1.2.2"], destination="WORKSTATION", instances=3
    )
    [record] = sink.records
    assert (record.event, record.action, record.outcome) == ("110104", "R", AuditOutcome.MINOR_FAILURE)
    assert (record.actor.name, record.actor.method, record.actor.address) == ("VIEWER", "dimse", "10.0.0.5")
    assert [(o.type, o.id) for o in record.objects] == [("study", "1.2.1"), ("study", "1.2.2")]
    details: dict[str, Any] = record.details
    assert details == {
        "operation": "C-MOVE",
        "destination": "WORKSTATION",
        "instances": 3,
        "status": "0xB000",
    }


def test_mpps_and_commitment_changes() -> None:
    sink = _Sink()
    audit = DimseAudit(sink, "PACS")
    event = _event(_assoc("MODALITY"))
    audit.workflow_change(event, "N-CREATE", _answer(0), sop_instance_uid="1.2.9")
    audit.workflow_change(event, "N-SET", _answer(0x0110), sop_instance_uid="1.2.9")
    audit.workflow_change(event, "N-ACTION", _answer(0))
    created, updated, commitment = sink.records
    assert (created.event, created.action, created.outcome) == ("110111", "C", AuditOutcome.SUCCESS)
    assert [(o.type, o.id) for o in created.objects] == [("instance", "1.2.9")]
    assert (updated.action, updated.outcome) == ("U", AuditOutcome.SERIOUS_FAILURE)
    assert (commitment.event, commitment.action, commitment.actor.name) == ("110103", "E", "MODALITY")


def test_stores_of_one_association_are_one_record_at_its_end() -> None:
    sink = _Sink()
    audit = DimseAudit(sink, "PACS")
    assoc = _assoc("CT1")
    audit.instance_received(assoc, "1.2.1", stored=True)
    audit.instance_received(assoc, None, stored=False)
    assert sink.records == []
    released = cast(Event, SimpleNamespace(assoc=assoc, event=SimpleNamespace(name="EVT_RELEASED")))
    handlers = {entry[0].name: entry[1] for entry in audit.handlers()}
    handlers["EVT_RELEASED"](released)
    handlers["EVT_CONN_CLOSE"](released)  # already written
    [record] = sink.records
    assert record.outcome == AuditOutcome.MINOR_FAILURE and record.details["stored"] == 1
    assert record.details["failed"] == 1 and [o.id for o in record.objects] == ["1.2.1"]


def test_a_failing_sink_never_reaches_the_operation() -> None:
    audit = DimseAudit(_BrokenSink(), "PACS")
    audit.transferred(_assoc(), "C-GET", 0, [], destination="VIEWER", instances=0)
    audit.workflow_change(_event(_assoc()), "N-ACTION", _answer(0))
