"""The shared audit trail: PostgreSQL rows, RFC 5424 syslog (real UDP and TCP
servers) carrying DICOM audit XML, and FHIR AuditEvent resources."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from xml.etree import ElementTree

import asyncpg
import pytest

from pacs_common.audit import (
    AuditAction,
    AuditActor,
    AuditEventId,
    AuditLog,
    AuditObject,
    AuditOutcome,
    AuditQuery,
    AuditSettings,
    fhir_bundle,
)

ALICE = AuditActor(name="alice", method="oidc", roles=("radiologist",), address="10.1.2.3")
STUDY = "1.2.840.113619.2.55.3.1"
OBJECTS = [
    AuditObject(type="patient", id="PID-7", name="Doe^Jane"),
    AuditObject(type="study", id=STUDY),
]
SYSLOG_HEADER = re.compile(
    r"^<(?P<pri>\d+)>1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) (?P<pid>\d+) IHE\+RFC-3881 - \ufeff(?P<xml>.*)$",
    re.DOTALL,
)


@pytest.fixture
def udp_server() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


async def _receive(server: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(server, 65535), 5)
    return data.decode()


def _parse(message: str) -> tuple[re.Match[str], ElementTree.Element]:
    match = SYSLOG_HEADER.match(message)
    assert match is not None, message
    return match, ElementTree.fromstring(match["xml"])


async def test_record_stores_the_event(db_pool: asyncpg.Pool) -> None:
    audit = AuditLog(db_pool, AuditSettings())
    event = await audit.record(
        AuditEventId.INSTANCES_ACCESSED,
        AuditAction.READ,
        AuditOutcome.SUCCESS,
        actor=ALICE,
        objects=OBJECTS,
        details={"path": "/dicom-web/studies/x", "instances": 3},
    )
    assert event.actor == "alice" and event.actor_method == "oidc" and event.actor_roles == ["radiologist"]
    assert event.source_address == "10.1.2.3"
    assert event.patient_id == "PID-7" and event.study_uids == [STUDY]
    assert event.event_name == "DICOM Instances Accessed"
    [stored] = await audit.query(AuditQuery())
    assert stored == event
    assert stored.details == {"path": "/dicom-web/studies/x", "instances": 3}
    assert stored.objects[0].name == "Doe^Jane"
    # Objects in the jsonb columns, not JSON strings: SQL reports can look inside them.
    row = await db_pool.fetchrow(
        "SELECT details->>'path' AS path, jsonb_typeof(objects) AS objects FROM audit_event WHERE pk = $1",
        event.id,
    )
    assert row is not None and row["path"] == "/dicom-web/studies/x" and row["objects"] == "array"


async def test_dimse_actor_and_patients_resolved_from_the_index(db_pool: asyncpg.Pool) -> None:
    patient_pk = await db_pool.fetchval(
        "INSERT INTO patient (patient_id, patient_name) VALUES ('PID-9', 'Roe^Richard') RETURNING pk"
    )
    await db_pool.execute(
        "INSERT INTO study (patient_fk, study_instance_uid) VALUES ($1, $2)", patient_pk, STUDY
    )
    audit = AuditLog(db_pool, AuditSettings())
    dimse = await audit.record(
        AuditEventId.INSTANCES_TRANSFERRED,
        AuditAction.CREATE,
        AuditOutcome.SUCCESS,
        actor=AuditActor(name="MODALITY1", method="dimse", address="192.168.0.9"),
        objects=[AuditObject(type="study", id=STUDY)],
        resolve_patients=True,
    )
    assert (dimse.actor, dimse.actor_method, dimse.source_address) == ("MODALITY1", "dimse", "192.168.0.9")
    assert dimse.patient_id == "PID-9" and dimse.study_uids == [STUDY]
    assert dimse.objects[0] == AuditObject(type="patient", id="PID-9", name="Roe^Richard")
    # Named patients win; without resolve_patients nothing is looked up.
    named = await audit.record(
        AuditEventId.INSTANCES_ACCESSED, AuditAction.READ, AuditOutcome.SUCCESS, actor=ALICE, objects=OBJECTS
    )
    assert named.patient_id == "PID-7"


async def test_query_filters_and_paging(db_pool: asyncpg.Pool) -> None:
    audit = AuditLog(db_pool, AuditSettings())
    bob = AuditActor(name="bob", method="token", roles=("viewer",))
    for index in range(5):
        await audit.record(
            AuditEventId.INSTANCES_ACCESSED,
            AuditAction.READ,
            AuditOutcome.SUCCESS,
            actor=ALICE if index % 2 == 0 else bob,
            objects=[
                AuditObject(type="patient", id=f"P{index}"),
                AuditObject(type="study", id=f"1.2.{index}"),
            ],
        )
    assert [e.actor for e in await audit.query(AuditQuery(actor="alice"))] == ["alice"] * 3
    assert [e.patient_id for e in await audit.query(AuditQuery(study="1.2.3"))] == ["P3"]
    assert [e.study_uids for e in await audit.query(AuditQuery(patient="P1"))] == [["1.2.1"]]
    newest_first = await audit.query(AuditQuery())
    assert [e.patient_id for e in newest_first] == ["P4", "P3", "P2", "P1", "P0"]
    page = await audit.query(AuditQuery(limit=2, offset=2))
    assert [e.patient_id for e in page] == ["P2", "P1"]
    now = datetime.now(UTC)
    assert len(await audit.query(AuditQuery(since=now - timedelta(minutes=1), until=now + timedelta(1)))) == 5
    assert await audit.query(AuditQuery(since=now + timedelta(minutes=1))) == []
    assert await audit.query(AuditQuery(event_id=AuditEventId.QUERY)) == []


async def test_syslog_over_udp_carries_the_dicom_audit_message(
    db_pool: asyncpg.Pool, udp_server: socket.socket
) -> None:
    port = udp_server.getsockname()[1]
    settings = AuditSettings(
        syslog_host="127.0.0.1",
        syslog_port=port,
        source_id="pacs-test",
        enterprise_site_id="H1",
    )
    audit = AuditLog(db_pool, settings)
    try:
        event = await audit.record(
            AuditEventId.INSTANCES_ACCESSED,
            AuditAction.READ,
            AuditOutcome.SUCCESS,
            actor=ALICE,
            objects=OBJECTS,
        )
        header, xml = _parse(await _receive(udp_server))
        assert header["pri"] == "85"  # authpriv.notice
        assert header["app"] == "pacs-test"
        assert datetime.fromisoformat(header["time"]) == event.time.replace(
            microsecond=event.time.microsecond // 1000 * 1000
        )
        assert xml.tag == "AuditMessage"
        identification = xml.find("EventIdentification")
        assert identification is not None
        assert identification.attrib["EventActionCode"] == "R"
        assert identification.attrib["EventOutcomeIndicator"] == "0"
        event_id = identification.find("EventID")
        assert event_id is not None and event_id.attrib["csd-code"] == "110103"
        assert event_id.attrib["codeSystemName"] == "DCM"
        requestor, application = xml.findall("ActiveParticipant")
        assert requestor.attrib == {
            "UserID": "alice",
            "UserIsRequestor": "true",
            "NetworkAccessPointID": "10.1.2.3",
            "NetworkAccessPointTypeCode": "2",
        }
        assert application.attrib["UserID"] == "pacs-test"
        source = xml.find("AuditSourceIdentification")
        assert source is not None and source.attrib == {
            "AuditSourceID": "pacs-test",
            "AuditEnterpriseSiteID": "H1",
        }
        patient, study = xml.findall("ParticipantObjectIdentification")
        assert patient.attrib["ParticipantObjectID"] == "PID-7"
        assert patient.attrib["ParticipantObjectTypeCode"] == "1"
        assert patient.findtext("ParticipantObjectName") == "Doe^Jane"
        assert study.attrib["ParticipantObjectID"] == STUDY
        id_type = study.find("ParticipantObjectIDTypeCode")
        assert id_type is not None and id_type.attrib["csd-code"] == "110180"

        await audit.record(
            AuditEventId.STUDY_DELETED, AuditAction.DELETE, AuditOutcome.SERIOUS_FAILURE, actor=ALICE
        )
        header, xml = _parse(await _receive(udp_server))
        assert header["pri"] == "84"  # authpriv.warning for a failure
    finally:
        await audit.aclose()


@pytest.fixture
async def tcp_server() -> AsyncIterator[tuple[int, asyncio.Queue[bytes]]]:
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = int((await reader.readuntil(b" "))[:-1])
                await received.put(await reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


async def test_syslog_over_tcp_with_octet_counting(
    db_pool: asyncpg.Pool, tcp_server: tuple[int, asyncio.Queue[bytes]]
) -> None:
    port, received = tcp_server
    settings = AuditSettings(syslog_host="127.0.0.1", syslog_port=port, syslog_protocol="tcp")
    audit = AuditLog(db_pool, settings)
    try:
        for patient in ("A", "B"):
            await audit.record(
                AuditEventId.QUERY,
                AuditAction.EXECUTE,
                AuditOutcome.SUCCESS,
                actor=ALICE,
                objects=[
                    AuditObject(type="patient", id=patient),
                    AuditObject(type="query", id="1.2.3", query="x"),
                ],
            )
        for patient in ("A", "B"):
            _, xml = _parse((await asyncio.wait_for(received.get(), 5)).decode())
            ids = [p.attrib["ParticipantObjectID"] for p in xml.findall("ParticipantObjectIdentification")]
            assert ids == [patient, "1.2.3"]
    finally:
        await audit.aclose()


async def test_an_unreachable_syslog_does_not_fail_the_audit(db_pool: asyncpg.Pool) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = AuditSettings(syslog_host="127.0.0.1", syslog_port=port, syslog_protocol="tcp")
    audit = AuditLog(db_pool, settings)
    try:
        await audit.record(AuditEventId.QUERY, AuditAction.EXECUTE, AuditOutcome.SUCCESS, actor=ALICE)
        assert len(await audit.query(AuditQuery())) == 1
    finally:
        await audit.aclose()


async def test_fhir_audit_events(db_pool: asyncpg.Pool) -> None:
    audit = AuditLog(db_pool, AuditSettings(source_id="pacs-test"))
    event = await audit.record(
        AuditEventId.INSTANCES_ACCESSED,
        AuditAction.READ,
        AuditOutcome.SUCCESS,
        actor=ALICE,
        objects=OBJECTS,
        details={"reason": "review"},
    )
    bundle = fhir_bundle([event], "pacs-test")
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 1
    resource = bundle["entry"][0]["resource"]
    assert resource["resourceType"] == "AuditEvent"
    assert resource["type"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110103",
        "display": "DICOM Instances Accessed",
    }
    assert resource["action"] == "R" and resource["outcome"] == "0"
    assert resource["recorded"].endswith("Z")
    [agent] = resource["agent"]
    assert agent["who"]["identifier"]["value"] == "alice" and agent["requestor"] is True
    assert agent["network"] == {"address": "10.1.2.3", "type": "2"}
    assert resource["source"]["observer"] == {"display": "pacs-test"}
    patient, study = resource["entity"]
    assert patient["what"]["identifier"]["value"] == "PID-7" and patient["type"]["code"] == "1"
    assert study["what"]["identifier"]["value"] == STUDY and study["role"]["code"] == "3"
