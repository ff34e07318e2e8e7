"""Workflow repositories on the real test database: worklist items, the MPPS
state machine with its events (and their rollback), commitment requests, and
``pacs worklist``."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from pacs_common.cli.main import main as pacs
from pacs_common.messaging.broker import PublishError
from pacs_common.messaging.models import MppsEvent, decode_mpps_event, encode
from pacs_common.settings import DatabaseSettings
from pacs_common.workflow import commitment, mpps, worklist
from pacs_common.workflow.commitment import CommitmentOutcome, ReferencedInstance
from pacs_common.workflow.mpps import MppsRefusal, MppsRefusedError
from pacs_common.workflow.worklist import WorklistItemError

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pn(value: str) -> dict[str, Any]:
    return {"vr": "PN", "Value": [{"Alphabetic": value}]}


def _s(vr: str, value: str) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


def item(accession: str = "ACC1", *steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "00100020": _s("LO", "P1"),
        "00100010": _pn("Doe^Jane"),
        "00080050": _s("SH", accession),
        "00400100": {
            "vr": "SQ",
            "Value": list(steps)
            or [{"00080060": _s("CS", "CT"), "00400001": _s("AE", "CT01"), "00400002": _s("DA", "20260101")}],
        },
    }


def mpps_attributes(
    status: str = "IN PROGRESS", accession: str = "ACC1", sps_id: str | None = None
) -> dict[str, Any]:
    reference: dict[str, Any] = {"00080050": _s("SH", accession)}
    if sps_id:
        reference["00400009"] = _s("SH", sps_id)
    return {
        "00100020": _s("LO", "P1"),
        "00400252": _s("CS", status),
        "00400270": {"vr": "SQ", "Value": [reference]},
        "00080060": _s("CS", "CT"),
    }


class Events:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.published: list[MppsEvent] = []

    async def __call__(self, event: MppsEvent) -> None:
        if self.fail:
            raise PublishError("broker down")
        self.published.append(event)


# -- worklist -----------------------------------------------------------------


def test_split_steps_fills_identifiers_and_splits() -> None:
    rows = worklist.split_steps(item("A", {"00080060": _s("CS", "CT")}, {"00080060": _s("CS", "MR")}))
    assert len(rows) == 2
    study = {r["0020000D"]["Value"][0] for r in rows}
    assert len(study) == 1  # one requested procedure, one study
    assert [r["00400100"]["Value"][0]["00400009"]["Value"][0] for r in rows] == ["A.1", "A.2"]
    assert all(r["00400100"]["Value"][0]["00400020"]["Value"] == ["SCHEDULED"] for r in rows)
    with pytest.raises(WorklistItemError):
        worklist.split_steps({"00100020": _s("LO", "P1")})
    with pytest.raises(WorklistItemError):
        worklist.split_steps({"00400100": {"vr": "SQ", "Value": [{}]}})


async def test_add_list_remove(db_pool: asyncpg.Pool) -> None:
    [added] = await worklist.add_item(db_pool, item("ACC1"))
    assert (added.patient_name, added.modality, added.scheduled_station_ae_title) == (
        "Doe^Jane",
        "CT",
        "CT01",
    )
    assert added.sps_status == "SCHEDULED"
    norm = await db_pool.fetchval("SELECT patient_name_norm FROM worklist_item WHERE pk = $1", added.pk)
    assert norm == "DOE^JANE"
    await worklist.add_item(db_pool, item("ACC2"))
    assert [i.accession_number for i in await worklist.list_items(db_pool)] == ["ACC1", "ACC2"]
    assert await worklist.remove_items(db_pool, accession_number="ACC2") == 1
    assert await worklist.remove_items(db_pool, pks=[added.pk]) == 1
    assert await worklist.list_items(db_pool) == []


# -- MPPS -----------------------------------------------------------------------


async def test_mpps_state_machine_follows_worklist_and_publishes(db_pool: asyncpg.Pool) -> None:
    [scheduled] = await worklist.add_item(db_pool, item("ACC1"))
    events = Events()
    created = await mpps.create(
        db_pool, "1.2.3.1", mpps_attributes(sps_id=scheduled.sps_id), calling_ae_title="CT01", publish=events
    )
    assert created.worklist_item_fk == scheduled.pk
    assert (await worklist.get_item(db_pool, scheduled.pk)).sps_status == "IN PROGRESS"  # type: ignore[union-attr]
    with pytest.raises(MppsRefusedError) as duplicate:
        await mpps.create(db_pool, "1.2.3.1", mpps_attributes(), calling_ae_title="CT01", publish=events)
    assert duplicate.value.refusal is MppsRefusal.DUPLICATE

    series = {"vr": "SQ", "Value": [{"0020000E": _s("UI", "1.2.3.9")}]}
    done = await mpps.update(
        db_pool, "1.2.3.1", {"00400252": _s("CS", "COMPLETED"), "00400340": series}, publish=events
    )
    assert done.status == "COMPLETED"
    assert done.performed_series_uids == ["1.2.3.9"]
    stored = await worklist.get_item(db_pool, scheduled.pk)
    assert stored is not None and stored.sps_status == "COMPLETED"
    assert stored.attributes["00400100"]["Value"][0]["00400020"]["Value"] == ["COMPLETED"]
    with pytest.raises(MppsRefusedError) as finished:
        await mpps.update(db_pool, "1.2.3.1", {}, publish=events)
    assert finished.value.refusal is MppsRefusal.FINISHED
    with pytest.raises(MppsRefusedError) as unknown:
        await mpps.update(db_pool, "9.9", {}, publish=events)
    assert unknown.value.refusal is MppsRefusal.UNKNOWN

    assert [e.schema_ for e in events.published] == ["mpps.in-progress/1", "mpps.completed/1"]
    completed = events.published[1]
    assert completed.worklist_item_pk == scheduled.pk
    assert completed.accession_number == "ACC1"
    assert decode_mpps_event(encode(completed)) == completed


@pytest.mark.parametrize(
    ("attributes", "refusal"),
    [
        (mpps_attributes(status="COMPLETED"), MppsRefusal.INVALID_STATUS),
        ({"00100020": _s("LO", "P1")}, MppsRefusal.MISSING_STATUS),
    ],
)
async def test_mpps_create_refusals(
    db_pool: asyncpg.Pool, attributes: dict[str, Any], refusal: MppsRefusal
) -> None:
    events = Events()
    with pytest.raises(MppsRefusedError) as refused:
        await mpps.create(db_pool, "1.2.3.2", attributes, calling_ae_title=None, publish=events)
    assert refused.value.refusal is refusal
    assert await mpps.get(db_pool, "1.2.3.2") is None
    assert events.published == []


async def test_failed_publish_keeps_nothing(db_pool: asyncpg.Pool) -> None:
    [scheduled] = await worklist.add_item(db_pool, item("ACC1"))
    with pytest.raises(PublishError):
        await mpps.create(
            db_pool, "1.2.3.3", mpps_attributes(), calling_ae_title="X", publish=Events(fail=True)
        )
    assert await mpps.get(db_pool, "1.2.3.3") is None
    assert (await worklist.get_item(db_pool, scheduled.pk)).sps_status == "SCHEDULED"  # type: ignore[union-attr]

    await mpps.create(db_pool, "1.2.3.3", mpps_attributes(), calling_ae_title="X", publish=Events())
    with pytest.raises(PublishError):
        await mpps.update(
            db_pool, "1.2.3.3", {"00400252": _s("CS", "DISCONTINUED")}, publish=Events(fail=True)
        )
    step = await mpps.get(db_pool, "1.2.3.3")
    assert step is not None and step.status == "IN PROGRESS"
    assert (await worklist.get_item(db_pool, scheduled.pk)).sps_status == "IN PROGRESS"  # type: ignore[union-attr]


# -- storage commitment ---------------------------------------------------------------


async def test_commitment_request_lifecycle(db_pool: asyncpg.Pool) -> None:
    requested = [ReferencedInstance(sop_class_uid=CT, sop_instance_uid="1.2.3.4")]
    record = await commitment.record_request(db_pool, "2.25.1", "MOD", requested)
    assert record.status == "PENDING" and record.requested == requested
    assert [r.pk for r in await commitment.list_pending(db_pool)] == [record.pk]
    outcome = CommitmentOutcome(
        succeeded=[], failed=[requested[0].model_copy(update={"failure_reason": 0x0112})]
    )
    await commitment.record_outcome(db_pool, record.pk, outcome)
    await commitment.record_attempt(db_pool, record.pk, error="refused", final=False)
    await commitment.record_attempt(db_pool, record.pk, error="refused again", final=True)
    failed = await commitment.get(db_pool, "MOD", "2.25.1")
    assert failed is not None
    assert (failed.status, failed.report_attempts, failed.last_error) == ("REPORT_FAILED", 2, "refused again")
    assert failed.failed == outcome.failed
    # The requester asks again under the same Transaction UID: a fresh start.
    again = await commitment.record_request(db_pool, "2.25.1", "MOD", requested)
    assert (again.pk, again.status, again.report_attempts) == (record.pk, "PENDING", 0)
    await commitment.record_attempt(db_pool, record.pk, error=None, final=True)
    reported = await commitment.get(db_pool, "MOD", "2.25.1")
    assert reported is not None and reported.status == "REPORTED" and reported.reported_at is not None


# -- pacs worklist -------------------------------------------------------------------------


def test_cli_add_list_remove(
    db_pool: asyncpg.Pool,
    database_settings: DatabaseSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    monkeypatch.setenv("PACS_DB_URL", database_settings.url)
    code = pacs(
        [
            "-C", str(tmp_path), "worklist", "add", "--patient-id", "P7", "--patient-name", "Müller^Anna",
            "--accession", "A7", "--modality", "MR", "--station-ae", "MR01", "--start", "202601021030",
            "--procedure-description", "MRI knee", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    [added] = json.loads(capsys.readouterr().out)
    assert (added["patient_name"], added["sps_start_date"], added["sps_start_time"]) == (
        "Müller^Anna",
        "20260102",
        "1030",
    )
    json_file = tmp_path / "item.json"
    json_file.write_text(json.dumps(item("A8")))
    assert (
        pacs(["-C", str(tmp_path), "worklist", "add", "--file", str(json_file), "--station-ae", "CT02"]) == 0
    )
    capsys.readouterr()
    assert pacs(["-C", str(tmp_path), "worklist", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(i["accession_number"], i["scheduled_station_ae_title"]) for i in listed] == [
        ("A8", "CT02"),
        ("A7", "MR01"),
    ]
    assert pacs(["-C", str(tmp_path), "worklist", "remove", str(added["pk"])]) == 0
    assert pacs(["-C", str(tmp_path), "worklist", "remove", "999999"]) == 1
    assert "no such worklist item" in capsys.readouterr().err
    assert pacs(["-C", str(tmp_path), "worklist", "add", "--patient-id", "X", "--start", "tomorrow"]) == 1
