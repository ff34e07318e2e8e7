"""Storage Commitment push model SCP, against pynetdicom requesters.

The requester asks for commitment of instances the index holds (indexed the
way the ingest worker indexes them), some it does not hold and one under the
wrong SOP Class; it must get an N-EVENT-REPORT naming each with the right
outcome — on its own association when it waits there, else on an
association the gateway opens to the AE the remote-node registry names.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.events import Event

from dimse_gateway import workflow_contexts as wf
from dimse_gateway.commitment import EVENT_ALL_COMMITTED, EVENT_SOME_FAILED, CommitmentHandler
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.server import ReusePortAssociationServer, build_ae, start_server
from pacs_common.db.blocking import BlockingPool
from pacs_common.nodes import Operation, RemoteNodeCreate, RemoteNodeRepository
from pacs_common.settings import DatabaseSettings, GatewaySettings
from pacs_common.testing.broker import free_port
from pacs_common.workflow import commitment as repository
from pacs_common.workflow.settings import WorkflowSettings
from query_service.testing import dataset, index

GATEWAY_AE = "PACS"
REQUESTER_AE = "MODALITY"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
FAST = WorkflowSettings(
    commitment_settle_seconds=0.5,
    commitment_poll_seconds=0.1,
    commitment_report_retry_seconds=[0.2, 0.2],
    commitment_report_timeout_seconds=5,
    commitment_connect_timeout_seconds=5,
)


@dataclass
class Gateway:
    settings: GatewaySettings
    pool: BlockingPool
    registry: CollectorRegistry

    def record(self, transaction_uid: str) -> repository.CommitmentRecord | None:
        return self.pool.run(lambda pool: repository.get(pool, REQUESTER_AE, transaction_uid))

    def wait_for(self, transaction_uid: str, status: str, within: float = 15) -> repository.CommitmentRecord:
        deadline = time.monotonic() + within
        while True:
            record = self.record(transaction_uid)
            if record is not None and record.status == status:
                return record
            assert time.monotonic() < deadline, f"not {status} within {within}s: {record}"
            time.sleep(0.05)


class StartGateway(Protocol):
    def __call__(self, settings: WorkflowSettings = FAST) -> Gateway: ...


def _shut_down(server: ReusePortAssociationServer) -> None:
    server.shutdown()
    for assoc in server.active_associations:
        assoc.abort()


@pytest.fixture
def start_gateway(db_pool: asyncpg.Pool, database_settings: DatabaseSettings) -> Iterator[StartGateway]:
    with contextlib.ExitStack() as stack:

        def start(settings: WorkflowSettings = FAST) -> Gateway:
            gateway_settings = GatewaySettings(
                ae_title=GATEWAY_AE, host="127.0.0.1", port=free_port(), reuse_port=False
            )
            pool = BlockingPool(database_settings, application_name="test-commitment")
            pool.start()
            stack.callback(pool.stop)
            registry = CollectorRegistry()
            handler = CommitmentHandler(pool, settings, GatewayMetrics(registry), ae_title=GATEWAY_AE)
            stack.callback(handler.close)
            ae = build_ae(gateway_settings)
            wf.add_workflow_contexts(ae)
            server = start_server(ae, gateway_settings, handler.handlers())
            stack.callback(_shut_down, server)
            return Gateway(gateway_settings, pool, registry)

        yield start


@pytest.fixture
def stored(start_gateway: StartGateway, db_pool: asyncpg.Pool) -> Callable[..., list[str]]:
    """Index CT instances (as the ingest worker would); returns their UIDs."""

    def store(gateway: Gateway, count: int) -> list[str]:
        study, series = str(generate_uid()), str(generate_uid())
        uids = [str(generate_uid()) for _ in range(count)]
        gateway.pool.run(lambda pool: index(pool, [dataset(study, series, uid) for uid in uids]))
        return uids

    return store


def _request(transaction_uid: str, *instances: tuple[str, str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


Report = tuple[int, Dataset, str]


def _on_report(reports: queue.Queue[Report]) -> Callable[[Event], tuple[int, None]]:
    def handler(event: Event) -> tuple[int, None]:
        reports.put(
            (
                int(cast(N_EVENT_REPORT, event.request).EventTypeID or 0),
                event.event_information,
                event.assoc.requestor.ae_title,
            )
        )
        return wf.SUCCESS, None

    return handler


def _requester(gateway: Gateway, reports: queue.Queue[Report]) -> Association:
    ae = AE(ae_title=REQUESTER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(wf.STORAGE_COMMITMENT_PUSH_MODEL)
    assoc = ae.associate(
        "127.0.0.1",
        gateway.settings.port,
        ae_title=GATEWAY_AE,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, _on_report(reports))],
    )
    assert assoc.is_established
    return assoc


def _action(assoc: Association, request: Dataset, action_type: int = 1) -> int:
    status, _ = assoc.send_n_action(
        request, action_type, wf.STORAGE_COMMITMENT_PUSH_MODEL, wf.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
    )
    assert "Status" in status, "no N-ACTION response"
    return int(status.Status)


def _uids(sequence: Any) -> list[tuple[str, str]]:
    return [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in sequence or []]


# -- tests ----------------------------------------------------------------------------


def test_report_on_the_same_association(
    start_gateway: StartGateway, stored: Callable[..., list[str]]
) -> None:
    gateway = start_gateway()
    first, second, wrong_class = stored(gateway, 3)
    missing = str(generate_uid())
    reports: queue.Queue[Report] = queue.Queue()
    assoc = _requester(gateway, reports)
    try:
        partial = str(generate_uid())
        request = _request(partial, (CT, first), (CT, second), (CT, missing), (MR, wrong_class))
        assert _action(assoc, request) == wf.SUCCESS
        event_type, information, sent_by = reports.get(timeout=15)

        complete = str(generate_uid())
        assert _action(assoc, _request(complete, (CT, first), (CT, second))) == wf.SUCCESS
        all_type, all_information, _ = reports.get(timeout=15)
    finally:
        assoc.release()

    assert sent_by == REQUESTER_AE  # the requester's own association
    assert event_type == EVENT_SOME_FAILED
    assert str(information.TransactionUID) == partial
    assert _uids(information.ReferencedSOPSequence) == [(CT, first), (CT, second)]
    failures = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in information.FailedSOPSequence}
    assert failures == {missing: wf.NO_SUCH_OBJECT_INSTANCE, wrong_class: wf.CLASS_INSTANCE_CONFLICT}
    assert information.RetrieveAETitle == GATEWAY_AE

    assert all_type == EVENT_ALL_COMMITTED
    assert str(all_information.TransactionUID) == complete
    assert "FailedSOPSequence" not in all_information
    assert _uids(all_information.ReferencedSOPSequence) == [(CT, first), (CT, second)]

    record = gateway.wait_for(partial, "REPORTED")
    assert record.report_attempts == 1
    assert [f.failure_reason for f in record.failed or []] == [0x0112, 0x0119]


def test_report_on_a_new_association_to_the_registered_requester(
    start_gateway: StartGateway, stored: Callable[..., list[str]]
) -> None:
    gateway = start_gateway()
    [instance] = stored(gateway, 1)

    # The requester's own SCP, registered as a node: it accepts the report
    # with the gateway in the SCP role (role selection, PS3.4 J.3.3).
    reports: queue.Queue[Report] = queue.Queue()
    scp = AE(ae_title=REQUESTER_AE)
    scp.add_supported_context(wf.STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
    port = free_port()
    server = scp.start_server(  # non-blocking: returns the server
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, _on_report(reports))]
    )
    try:
        node = RemoteNodeCreate(
            ae_title=REQUESTER_AE, host="127.0.0.1", port=port, allowed_operations=(Operation.COMMITMENT,)
        )
        gateway.pool.run(lambda pool: RemoteNodeRepository(pool).add(node))

        assoc = _requester(gateway, queue.Queue())
        transaction = str(generate_uid())
        try:
            assert _action(assoc, _request(transaction, (CT, instance))) == wf.SUCCESS
        finally:
            assoc.release()  # at once: the report must come on a new association

        event_type, information, sent_by = reports.get(timeout=15)
    finally:
        assert server is not None
        server.shutdown()
    assert sent_by == GATEWAY_AE  # the gateway associated
    assert event_type == EVENT_ALL_COMMITTED
    assert str(information.TransactionUID) == transaction
    assert _uids(information.ReferencedSOPSequence) == [(CT, instance)]
    gateway.wait_for(transaction, "REPORTED")


def test_unreachable_requester_ends_report_failed(
    start_gateway: StartGateway, stored: Callable[..., list[str]]
) -> None:
    gateway = start_gateway()
    [instance] = stored(gateway, 1)
    assoc = _requester(gateway, queue.Queue())
    transaction = str(generate_uid())
    try:
        assert _action(assoc, _request(transaction, (CT, instance))) == wf.SUCCESS
    finally:
        assoc.release()
    record = gateway.wait_for(transaction, "REPORT_FAILED")
    assert record.report_attempts == 3  # the first attempt and two retries
    assert record.last_error is not None and "not a registered node" in record.last_error
    assert record.succeeded is not None and [s.sop_instance_uid for s in record.succeeded] == [instance]


def test_instance_indexed_while_waiting_is_committed(
    start_gateway: StartGateway, db_pool: asyncpg.Pool
) -> None:
    """An instance the requester sent just before asking may still be in the
    ingest queue: it is looked for again before it counts as missing."""
    gateway = start_gateway(FAST.model_copy(update={"commitment_settle_seconds": 10}))
    late = str(generate_uid())
    reports: queue.Queue[Report] = queue.Queue()
    assoc = _requester(gateway, reports)
    try:
        assert _action(assoc, _request(str(generate_uid()), (CT, late))) == wf.SUCCESS
        time.sleep(0.5)
        study, series = str(generate_uid()), str(generate_uid())
        gateway.pool.run(lambda pool: index(pool, [dataset(study, series, late)]))
        event_type, information, _ = reports.get(timeout=15)
    finally:
        assoc.release()
    assert event_type == EVENT_ALL_COMMITTED
    assert _uids(information.ReferencedSOPSequence) == [(CT, late)]


def test_bad_requests_are_refused(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    assoc = _requester(gateway, queue.Queue())
    try:
        no_transaction = _request("", (CT, "1.2.3"))
        del no_transaction.TransactionUID
        assert _action(assoc, no_transaction) == wf.INVALID_ARGUMENT_VALUE
        assert _action(assoc, _request(str(generate_uid()))) == wf.INVALID_ARGUMENT_VALUE
        half_item = _request(str(generate_uid()), (CT, "1.2.3"))
        del half_item.ReferencedSOPSequence[0].ReferencedSOPClassUID
        assert _action(assoc, half_item) == wf.INVALID_ARGUMENT_VALUE
        assert (
            _action(assoc, _request(str(generate_uid()), (CT, "1.2.3")), action_type=2) == wf.NO_SUCH_ACTION
        )
        status, _ = assoc.send_n_action(
            _request(str(generate_uid()), (CT, "1.2.3")), 1, wf.STORAGE_COMMITMENT_PUSH_MODEL, "1.2.3.4"
        )
        assert int(status.Status) == wf.NO_SUCH_SOP_INSTANCE
        assert assoc.is_established
    finally:
        assoc.release()
    assert gateway.pool.run(repository.list_pending) == []
    labels = {"operation": "N-ACTION", "status": f"0x{wf.INVALID_ARGUMENT_VALUE:04X}"}
    assert gateway.registry.get_sample_value("pacs_dimse_operations_total", labels) == 3
