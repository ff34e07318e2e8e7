"""MPPS SCP in the gateway, driven by a pynetdicom SCU the way a modality
drives it: N-CREATE IN PROGRESS, N-SET with the performed series, N-SET
COMPLETED or DISCONTINUED — and every refusal it can get.  Real PostgreSQL
(the session's database) and RabbitMQ (a namespace per test); the events
are read off a queue bound to ``mpps.#``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from dimse_gateway import workflow_contexts as wf
from dimse_gateway.associations import AssociationObserver
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.mpps import MppsHandler
from dimse_gateway.server import ReusePortAssociationServer, build_ae, start_server
from pacs_common.db.blocking import BlockingPool
from pacs_common.messaging import BlockingPublisher, Topology
from pacs_common.settings import BrokerSettings, DatabaseSettings, GatewaySettings
from pacs_common.testing.broker import TcpProxy, free_port, settings_via_proxy
from pacs_common.workflow import mpps as mpps_repository
from pacs_common.workflow import worklist

GATEWAY_AE = "PACS"
MODALITY_AE = "CT01"


@dataclass
class Gateway:
    settings: GatewaySettings
    pool: BlockingPool
    publisher: BlockingPublisher
    registry: CollectorRegistry

    def operations(self, operation: str, code: int) -> float:
        labels = {"operation": operation, "status": f"0x{code:04X}"}
        return self.registry.get_sample_value("pacs_dimse_operations_total", labels) or 0.0


class StartGateway(Protocol):
    def __call__(self, *, broker: BrokerSettings | None = None) -> Gateway: ...


def _shut_down(server: ReusePortAssociationServer) -> None:
    server.shutdown()
    for assoc in server.active_associations:
        assoc.abort()


@pytest.fixture
def start_gateway(
    db_pool: asyncpg.Pool, database_settings: DatabaseSettings, broker_settings: BrokerSettings
) -> Iterator[StartGateway]:
    with contextlib.ExitStack() as stack:

        def start(*, broker: BrokerSettings | None = None) -> Gateway:
            settings = GatewaySettings(
                ae_title=GATEWAY_AE, host="127.0.0.1", port=free_port(), reuse_port=False
            )
            pool = BlockingPool(database_settings, application_name="test-mpps")
            pool.start()
            stack.callback(pool.stop)
            publisher = BlockingPublisher(broker or broker_settings)
            publisher.start()
            stack.callback(publisher.stop)
            registry = CollectorRegistry()
            metrics = GatewayMetrics(registry)
            ae = build_ae(settings)
            wf.add_workflow_contexts(ae)
            handlers = [
                *MppsHandler(pool, publisher, metrics).handlers(),
                *AssociationObserver(metrics).handlers(),
            ]
            server = start_server(ae, settings, handlers)
            stack.callback(_shut_down, server)
            return Gateway(settings, pool, publisher, registry)

        yield start


def _run(coroutine_factory: Any) -> Any:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine_factory()).result(timeout=30)


@pytest.fixture
def mpps_events(broker_settings: BrokerSettings) -> Iterator[Any]:
    """A queue bound to ``mpps.#`` on the namespace's events exchange; the
    fixture value drains it and returns (routing key, body) pairs."""
    topology = Topology.from_settings(broker_settings)
    url = broker_settings.url.get_secret_value()
    queue_name = f"{broker_settings.namespace}test.mpps"

    async def declare() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                topology.events_exchange,
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                arguments=topology.events_exchange_arguments,
            )
            queue = await channel.declare_queue(queue_name, auto_delete=False)
            await queue.bind(exchange, "mpps.#")

    async def drain() -> list[tuple[str, dict[str, Any]]]:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(queue_name)
            received = []
            while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
                received.append((message.routing_key or "", json.loads(message.body)))
            return received

    async def delete() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue_name)

    _run(declare)
    yield lambda: _run(drain)
    _run(delete)


# -- the modality ------------------------------------------------------------------


def _associate(gateway: Gateway) -> Association:
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(wf.MODALITY_PERFORMED_PROCEDURE_STEP)
    assoc = ae.associate("127.0.0.1", gateway.settings.port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    return assoc


def _in_progress(
    accession: str = "ACC1", sps_id: str | None = None, status: str | None = "IN PROGRESS"
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "P1"
    reference = Dataset()
    reference.AccessionNumber = accession
    reference.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    if sps_id is not None:
        reference.ScheduledProcedureStepID = sps_id
    ds.ScheduledStepAttributesSequence = [reference]
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = MODALITY_AE
    ds.PerformedProcedureStepStartDate = "20260101"
    ds.PerformedProcedureStepStartTime = "1030"
    ds.Modality = "CT"
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    ds.PerformedSeriesSequence = []
    return ds


def _final(status: str, *series_uids: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20260101"
    ds.PerformedProcedureStepEndTime = "1100"
    items = []
    for uid in series_uids:
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.ReferencedImageSequence = []
        items.append(item)
    ds.PerformedSeriesSequence = items
    return ds


def _code(status: Dataset) -> int:
    assert "Status" in status, "no response"
    return int(status.Status)


def _schedule(gateway: Gateway, accession: str = "ACC1") -> worklist.WorklistItem:
    attributes = {
        "00100020": {"vr": "LO", "Value": ["P1"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Anna"}]},
        "00080050": {"vr": "SH", "Value": [accession]},
        "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.77"]},
        "00400100": {"vr": "SQ", "Value": [{"00080060": {"vr": "CS", "Value": ["CT"]}}]},
    }
    [item] = gateway.pool.run(lambda pool: worklist.add_item(pool, attributes))
    return item


def _step(gateway: Gateway, uid: str) -> mpps_repository.MppsRecord | None:
    return gateway.pool.run(lambda pool: mpps_repository.get(pool, uid))


def _item_status(gateway: Gateway, pk: int) -> str:
    item = gateway.pool.run(lambda pool: worklist.get_item(pool, pk))
    assert item is not None
    return item.sps_status


# -- tests -------------------------------------------------------------------------


def test_full_state_machine(start_gateway: StartGateway, mpps_events: Any) -> None:
    gateway = start_gateway()
    scheduled = _schedule(gateway)
    uid = str(generate_uid())
    series = str(generate_uid())
    assoc = _associate(gateway)
    try:
        status, _ = assoc.send_n_create(
            _in_progress(sps_id=scheduled.sps_id), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid
        )
        assert _code(status) == wf.SUCCESS
        assert _item_status(gateway, scheduled.pk) == "IN PROGRESS"

        # The modality retries the create: refused, the step is unchanged.
        status, _ = assoc.send_n_create(_in_progress(), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.DUPLICATE_SOP_INSTANCE

        # Images acquired: the series is reported while the step is in progress.
        progress = Dataset()
        item = Dataset()
        item.SeriesInstanceUID = series
        progress.PerformedSeriesSequence = [item]
        status, _ = assoc.send_n_set(progress, wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.SUCCESS

        status, _ = assoc.send_n_set(_final("COMPLETED", series), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.SUCCESS

        status, _ = assoc.send_n_set(_final("DISCONTINUED"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.PROCESSING_FAILURE
        assert "may no longer be updated" in str(status.ErrorComment)
    finally:
        assoc.release()

    step = _step(gateway, uid)
    assert step is not None
    assert (step.status, step.calling_ae_title, step.worklist_item_fk) == (
        "COMPLETED",
        MODALITY_AE,
        scheduled.pk,
    )
    assert step.performed_series_uids == [series]
    assert step.attributes["00100010"]["Value"] == [{"Alphabetic": "Müller^Anna"}]  # decoded from Latin-1
    assert _item_status(gateway, scheduled.pk) == "COMPLETED"

    events = mpps_events()
    assert [key for key, _ in events] == ["mpps.in-progress", "mpps.in-progress", "mpps.completed"]
    completed = events[-1][1]
    assert completed["schema"] == "mpps.completed/1"
    assert completed["sop_instance_uid"] == uid
    assert completed["worklist_item_pk"] == scheduled.pk
    assert completed["performed_series_uids"] == [series]
    assert gateway.operations("N-CREATE", wf.SUCCESS) == 1
    assert gateway.operations("N-CREATE", wf.DUPLICATE_SOP_INSTANCE) == 1
    assert gateway.operations("N-SET", wf.PROCESSING_FAILURE) == 1


def test_discontinued_step(start_gateway: StartGateway, mpps_events: Any) -> None:
    gateway = start_gateway()
    scheduled = _schedule(gateway, "ACC9")
    uid = str(generate_uid())
    assoc = _associate(gateway)
    try:
        status, _ = assoc.send_n_create(_in_progress("ACC9"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.SUCCESS
        status, _ = assoc.send_n_set(_final("DISCONTINUED"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.SUCCESS
    finally:
        assoc.release()
    assert _item_status(gateway, scheduled.pk) == "DISCONTINUED"
    assert [key for key, _ in mpps_events()] == ["mpps.in-progress", "mpps.discontinued"]


def test_refusals(start_gateway: StartGateway, mpps_events: Any) -> None:
    gateway = start_gateway()
    assoc = _associate(gateway)
    try:
        completed_at_create = str(generate_uid())
        status, _ = assoc.send_n_create(
            _in_progress(status="COMPLETED"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, completed_at_create
        )
        assert _code(status) == wf.INVALID_ATTRIBUTE_VALUE

        no_status = str(generate_uid())
        status, _ = assoc.send_n_create(
            _in_progress(status=None), wf.MODALITY_PERFORMED_PROCEDURE_STEP, no_status
        )
        assert _code(status) == wf.MISSING_ATTRIBUTE

        status, _ = assoc.send_n_set(_final("COMPLETED"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, "1.2.3.404")
        assert _code(status) == wf.NO_SUCH_SOP_INSTANCE

        # An unscheduled step (no worklist item): accepted, linked to nothing.
        unscheduled = str(generate_uid())
        status, _ = assoc.send_n_create(
            _in_progress("UNKNOWN"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, unscheduled
        )
        assert _code(status) == wf.SUCCESS
        bad = Dataset()
        bad.PerformedProcedureStepStatus = "FINISHED"
        status, _ = assoc.send_n_set(bad, wf.MODALITY_PERFORMED_PROCEDURE_STEP, unscheduled)
        assert _code(status) == wf.INVALID_ATTRIBUTE_VALUE

        # The association survives every refusal.
        status, _ = assoc.send_n_set(_final("COMPLETED"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, unscheduled)
        assert _code(status) == wf.SUCCESS
    finally:
        assoc.release()
    assert _step(gateway, completed_at_create) is None
    assert _step(gateway, no_status) is None
    step = _step(gateway, unscheduled)
    assert step is not None and step.worklist_item_fk is None and step.status == "COMPLETED"
    assert [key for key, _ in mpps_events()] == ["mpps.in-progress", "mpps.completed"]


def test_create_without_instance_uid_gets_one(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    assoc = _associate(gateway)
    try:
        status, _ = assoc.send_n_create(_in_progress(), wf.MODALITY_PERFORMED_PROCEDURE_STEP, None)
        assert _code(status) == wf.SUCCESS
    finally:
        assoc.release()
    [step] = gateway.pool.run(mpps_repository.list_steps)
    assert step.status == "IN PROGRESS" and step.sop_instance_uid.startswith("1.2.826.0.1.3680043")


def test_broker_outage_fails_and_keeps_nothing(
    start_gateway: StartGateway, broker_settings: BrokerSettings, amqp_proxy: TcpProxy, mpps_events: Any
) -> None:
    gateway = start_gateway(broker=settings_via_proxy(broker_settings, amqp_proxy))
    scheduled = _schedule(gateway)
    uid = str(generate_uid())
    assoc = _associate(gateway)
    try:
        status, _ = assoc.send_n_create(_in_progress(), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.SUCCESS

        amqp_proxy.cut()
        status, _ = assoc.send_n_set(_final("COMPLETED"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.PROCESSING_FAILURE
        assert "retry" in str(status.ErrorComment)
        other = str(generate_uid())
        status, _ = assoc.send_n_create(_in_progress(), wf.MODALITY_PERFORMED_PROCEDURE_STEP, other)
        assert _code(status) == wf.PROCESSING_FAILURE
        step = _step(gateway, uid)
        assert step is not None and step.status == "IN PROGRESS"
        assert _step(gateway, other) is None
        assert _item_status(gateway, scheduled.pk) == "IN PROGRESS"

        # The broker is back: the modality's retry succeeds.
        amqp_proxy.start()
        deadline = time.monotonic() + 15
        while not gateway.publisher.is_healthy():
            assert time.monotonic() < deadline, "the publisher did not reconnect"
            time.sleep(0.05)
        status, _ = assoc.send_n_set(_final("COMPLETED"), wf.MODALITY_PERFORMED_PROCEDURE_STEP, uid)
        assert _code(status) == wf.SUCCESS
    finally:
        assoc.release()
    assert _item_status(gateway, scheduled.pk) == "COMPLETED"
    assert [key for key, _ in mpps_events()] == ["mpps.in-progress", "mpps.completed"]
