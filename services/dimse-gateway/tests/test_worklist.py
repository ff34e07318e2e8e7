"""Modality Worklist C-FIND through the gateway and a real query-service.

The query-service runs in-process on the session's test database with the
worklist router; the gateway's WorklistHandler reaches it with the blocking
QueryClient, as in production.  Modalities are DCMTK ``findscu -W`` and a
pynetdicom SCU; the assertions are on what they receive: the matches, the
returned keys (sequence items with the item keys asked for), the character
set, the final status, cancellation.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE

from dimse_gateway import workflow_contexts as wf
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.server import build_ae, start_server
from dimse_gateway.worklist import WorklistHandler
from pacs_common.query.client import QueryClient
from pacs_common.settings import GatewaySettings
from pacs_common.testing.broker import free_port
from pacs_common.testing.query import PacedQueryClient
from pacs_common.workflow import worklist
from query_service.testing import query_settings, start_service

GATEWAY_AE = "PACS"
MODALITY_AE = "CT01"
FINDSCU = "/usr/bin/findscu"


@dataclass
class Gateway:
    port: int
    registry: CollectorRegistry


def _pn(value: str) -> dict[str, Any]:
    return {"vr": "PN", "Value": [{"Alphabetic": value}]}


def _s(vr: str, value: str) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


def _item(
    accession: str,
    patient_name: str,
    modality: str,
    *,
    station: str,
    date: str,
    time: str,
    performer: str = "House^Gregory",
) -> dict[str, Any]:
    return {
        "00100020": _s("LO", f"PID-{accession}"),
        "00100010": _pn(patient_name),
        "00100030": _s("DA", "19700101"),
        "00100040": _s("CS", "F"),
        "00080050": _s("SH", accession),
        "00321060": _s("LO", f"{modality} procedure"),
        "00400100": {
            "vr": "SQ",
            "Value": [
                {
                    "00080060": _s("CS", modality),
                    "00400001": _s("AE", station),
                    "00400002": _s("DA", date),
                    "00400003": _s("TM", time),
                    "00400006": _pn(performer),
                    "00400007": _s("LO", f"{modality} step"),
                    "00400011": _s("SH", "Room 1"),
                }
            ],
        },
    }


@pytest_asyncio.fixture(loop_scope="session")
async def scheduled(db_pool: asyncpg.Pool) -> list[worklist.WorklistItem]:
    items = [
        _item("ACC1", "Müller^Anna", "CT", station="CT01", date="20260101", time="083000"),
        _item(
            "ACC2",
            "Doe^John",
            "CT",
            station="CT01",
            date="20260101",
            time="143000",
            performer="Grey^Meredith",
        ),
        _item("ACC3", "doe^jane", "MR", station="MR01", date="20260102", time="090000"),
        _item(
            "ACC4",
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "CT",
            station="CT02",
            date="20260103",
            time="100000",
        ),
    ]
    added = []
    for attributes in items:
        added += await worklist.add_item(db_pool, attributes)
    return added


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(db_pool: asyncpg.Pool) -> AsyncIterator[Gateway]:
    async with start_service(db_pool, query_settings()) as service:
        # Paced: a C-CANCEL provably arrives while matches still stream.
        client = PacedQueryClient(service.base_url, timeout_seconds=10)
        settings = GatewaySettings(ae_title=GATEWAY_AE, host="127.0.0.1", port=free_port(), reuse_port=False)
        registry = CollectorRegistry()
        ae = build_ae(settings)
        wf.add_workflow_contexts(ae)
        server = start_server(ae, settings, WorklistHandler(client, GatewayMetrics(registry)).handlers())
        try:
            yield Gateway(settings.port, registry)
        finally:
            await asyncio.to_thread(server.shutdown)
            client.close()


def _query(charset: str | list[str] | None = None, **keys: Any) -> Dataset:
    """A worklist identifier asking for the usual return keys; ``keys``
    (keyword=value) set matching keys at the top level or, with ``sps_``
    prefix, in the Scheduled Procedure Step item."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AccessionNumber = ""
    ds.RequestedProcedureDescription = ""
    step = Dataset()
    step.Modality = ""
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = ""
    step.ScheduledProcedureStepStartTime = ""
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepID = ""
    for keyword, value in keys.items():
        if keyword.startswith("sps_"):
            setattr(step, keyword.removeprefix("sps_"), value)
        else:
            setattr(ds, keyword, value)
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def _find(port: int, identifier: Dataset) -> tuple[list[Dataset], Dataset]:
    """C-FIND with a pynetdicom SCU: the pending identifiers and the final status."""
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(wf.MODALITY_WORKLIST_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    matches: list[Dataset] = []
    final = Dataset()
    try:
        for status, found in assoc.send_c_find(identifier, wf.MODALITY_WORKLIST_FIND):
            assert "Status" in status, "no response"
            if int(status.Status) in (0xFF00, 0xFF01):
                assert found is not None
                matches.append(found)
            else:
                final = status
    finally:
        assoc.release()
    return matches, final


async def _find_async(port: int, identifier: Dataset) -> tuple[list[Dataset], Dataset]:
    return await asyncio.to_thread(_find, port, identifier)


def _accessions(matches: Sequence[Dataset]) -> list[str]:
    return [str(m.AccessionNumber) for m in matches]


# -- DCMTK -------------------------------------------------------------------------


async def test_findscu_worklist(scheduled: list[Any], gateway: Gateway, tmp_path: Path) -> None:
    query = tmp_path / "query.dcm"
    _query(
        sps_Modality="CT",
        sps_ScheduledStationAETitle="CT01",
        sps_ScheduledProcedureStepStartDate="20260101-20260102",
    ).save_as(query, implicit_vr=True, little_endian=True)
    out = tmp_path / "responses"
    out.mkdir()
    process = await asyncio.create_subprocess_exec(
        FINDSCU, "-W", "-aet", MODALITY_AE, "-aec", GATEWAY_AE, "-X", "-od", str(out),
        "127.0.0.1", str(gateway.port), str(query),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode(errors="replace")
    responses = [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
    assert _accessions(responses) == ["ACC1", "ACC2"]  # earliest first

    first = responses[0]
    # Müller does not fit the default repertoire the query used: UTF-8.
    assert first.SpecificCharacterSet == "ISO_IR 192"
    assert str(first.PatientName) == "Müller^Anna"
    assert first.PatientID == "PID-ACC1"
    assert first.RequestedProcedureDescription == "CT procedure"
    assert "PatientBirthDate" not in first  # not asked for
    [step] = first.ScheduledProcedureStepSequence
    assert step.ScheduledStationAETitle == "CT01"
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == (
        "20260101",
        "083000",
    )
    assert str(step.ScheduledPerformingPhysicianName) == "House^Gregory"
    assert step.ScheduledProcedureStepID  # generated when scheduled
    assert "ScheduledProcedureStepLocation" not in step  # an item key not asked for
    assert str(responses[1].PatientName) == "Doe^John"
    assert "SpecificCharacterSet" not in responses[1]  # ASCII: the default repertoire it asked in


# -- pynetdicom --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, ["ACC1", "ACC2", "ACC3", "ACC4"]),  # universal matching
        ({"PatientName": "DOE*"}, ["ACC2", "ACC3"]),  # PN, case-insensitive
        ({"PatientName": "*^J*"}, ["ACC2", "ACC3"]),
        ({"PatientName": "山田*"}, ["ACC4"]),  # the ideographic group
        ({"AccessionNumber": "ACC?"}, ["ACC1", "ACC2", "ACC3", "ACC4"]),
        ({"PatientID": "PID-ACC3"}, ["ACC3"]),
        ({"sps_Modality": "MR"}, ["ACC3"]),
        ({"sps_ScheduledStationAETitle": "CT0*"}, ["ACC1", "ACC2", "ACC4"]),
        ({"sps_ScheduledProcedureStepStartDate": "20260102-"}, ["ACC3", "ACC4"]),
        (
            {
                "sps_ScheduledProcedureStepStartDate": "20260101",
                "sps_ScheduledProcedureStepStartTime": "-1200",
            },
            ["ACC1"],
        ),
        ({"sps_ScheduledProcedureStepStartTime": "1400-1500"}, ["ACC2"]),
        ({"sps_ScheduledPerformingPhysicianName": "grey*"}, ["ACC2"]),
        ({"sps_ScheduledProcedureStepLocation": "Room 1", "sps_Modality": "MR"}, ["ACC3"]),  # no column
        ({"sps_ScheduledProcedureStepStatus": "SCHEDULED", "AccessionNumber": "ACC4"}, ["ACC4"]),
        ({"PatientName": "Nobody"}, []),
    ],
)
async def test_matching(
    scheduled: list[Any], gateway: Gateway, keys: dict[str, str], expected: list[str]
) -> None:
    charset = None if all(str(v).isascii() for v in keys.values()) else "ISO_IR 192"
    matches, final = await _find_async(gateway.port, _query(charset, **keys))
    assert _accessions(matches) == expected
    assert int(final.Status) == wf.SUCCESS


async def test_response_in_the_modalitys_character_set(scheduled: list[Any], gateway: Gateway) -> None:
    [latin1], _ = await _find_async(gateway.port, _query("ISO_IR 100", AccessionNumber="ACC1"))
    assert latin1.SpecificCharacterSet == "ISO_IR 100"
    assert str(latin1.PatientName) == "Müller^Anna"

    # Japanese does not fit Latin-1: UTF-8 rather than losing it.
    [japanese], _ = await _find_async(gateway.port, _query("ISO_IR 100", AccessionNumber="ACC4"))
    assert japanese.SpecificCharacterSet == "ISO_IR 192"
    assert japanese.PatientName.ideographic == "山田^太郎"

    # A Japanese modality (ISO 2022 with JIS X 0208) gets its own character set.
    [jis], _ = await _find_async(gateway.port, _query(["", "ISO 2022 IR 87"], AccessionNumber="ACC4"))
    assert list(jis.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert jis.PatientName.ideographic == "山田^太郎"
    assert jis.PatientName.phonetic == "やまだ^たろう"

    [plain], _ = await _find_async(gateway.port, _query(AccessionNumber="ACC2"))
    assert "SpecificCharacterSet" not in plain  # ASCII fits the default repertoire


async def test_requested_item_keys_only(scheduled: list[Any], gateway: Gateway) -> None:
    identifier = Dataset()
    identifier.AccessionNumber = "ACC3"
    identifier.PatientBirthDate = ""
    step = Dataset()
    step.Modality = ""
    identifier.ScheduledProcedureStepSequence = [step]
    [match], final = await _find_async(gateway.port, identifier)
    assert int(final.Status) == wf.SUCCESS
    assert set(match.dir()) == {"AccessionNumber", "PatientBirthDate", "ScheduledProcedureStepSequence"}
    assert match.PatientBirthDate == "19700101"
    [item] = match.ScheduledProcedureStepSequence
    assert item.dir() == ["Modality"] and item.Modality == "MR"


async def test_cancel_stops_the_responses(db_pool: asyncpg.Pool, gateway: Gateway) -> None:
    for n in range(300):
        await worklist.add_item(
            db_pool, _item(f"X{n:04d}", "Many^Patients", "CT", station="CT09", date="20260105", time="080000")
        )

    def find_and_cancel() -> tuple[int, int]:
        ae = AE(ae_title=MODALITY_AE)
        ae.add_requested_context(wf.MODALITY_WORKLIST_FIND)
        assoc = ae.associate("127.0.0.1", gateway.port, ae_title=GATEWAY_AE)
        assert assoc.is_established
        pending, final = 0, -1
        try:
            responses = assoc.send_c_find(
                _query(sps_ScheduledStationAETitle="CT09"), wf.MODALITY_WORKLIST_FIND, msg_id=7
            )
            for status, _ in responses:
                code = int(status.Status)
                if code == 0xFF00:
                    pending += 1
                    if pending == 1:
                        context = assoc._get_valid_context(wf.MODALITY_WORKLIST_FIND, "", "scu")
                        assoc.send_c_cancel(7, context.context_id)
                else:
                    final = code
            # The association is still usable after the cancel.
            again = [
                s for s, _ in assoc.send_c_find(_query(AccessionNumber="X0001"), wf.MODALITY_WORKLIST_FIND)
            ]
            assert [int(s.Status) for s in again] == [0xFF00, wf.SUCCESS]
        finally:
            assoc.release()
        return pending, final

    pending, final = await asyncio.to_thread(find_and_cancel)
    assert final == wf.CANCEL
    assert 1 <= pending < 300


async def test_malformed_identifiers(scheduled: list[Any], gateway: Gateway) -> None:
    _, final = await _find_async(gateway.port, _query(sps_ScheduledProcedureStepStartDate="2026-13-45"))
    assert int(final.Status) == wf.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "date" in str(final.ErrorComment)
    _, final = await _find_async(gateway.port, _query(StudyInstanceUID="1.2.*"))
    assert int(final.Status) == wf.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    # The gateway is still there for the next query.
    matches, final = await _find_async(gateway.port, _query(AccessionNumber="ACC1"))
    assert (_accessions(matches), int(final.Status)) == (["ACC1"], wf.SUCCESS)
    labels = {"operation": "C-FIND-MWL", "status": f"0x{wf.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS:04X}"}
    assert gateway.registry.get_sample_value("pacs_dimse_operations_total", labels) == 2


def test_query_service_down_is_unable_to_process() -> None:
    settings = GatewaySettings(ae_title=GATEWAY_AE, host="127.0.0.1", port=free_port(), reuse_port=False)
    client = QueryClient(f"http://127.0.0.1:{free_port()}", timeout_seconds=2)
    ae = build_ae(settings)
    wf.add_workflow_contexts(ae)
    server = start_server(
        ae, settings, WorklistHandler(client, GatewayMetrics(CollectorRegistry())).handlers()
    )
    try:
        matches, final = _find(settings.port, _query())
    finally:
        server.shutdown()
        client.close()
    assert matches == []
    assert int(final.Status) == wf.UNABLE_TO_PROCESS
