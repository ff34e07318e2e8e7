"""The AE-title policy (``PACS_GATEWAY_POLICY_MODE=registry``) in-process,
against the session's real PostgreSQL (node registry, audit trail) and the
in-process query-service; the peers are pynetdicom SCUs.

What a peer sees: an unknown Calling AE Title is rejected permanently by the
service user with reason 3, a wrong Called AE Title with reason 7, a node
that proposed only SOP classes it may not use with reason 1; a registered
node may use exactly its ``allowed_operations`` (anything else on an
accepted association is answered 0x0124 Refused: Not Authorized); a title
on the static allow-list is accepted without a registry entry.  Each
refusal is a Security Alert in ``audit_event`` and counted in metrics.

(The real gateway process runs the same policy in test_tls_gateway.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dimse_gateway.associations import AssociationObserver
from dimse_gateway.audit import DimseAudit
from dimse_gateway.find import FindHandler
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.move import RegistryNodeDirectory
from dimse_gateway.policy import AePolicy, GatewayPolicySettings, PolicyMode
from dimse_gateway.server import FindRouter, GatewayListeners, build_ae, start_listeners
from dimse_gateway.store import StoreHandler
from dimse_gateway.tls import GatewayTlsSettings
from dimse_gateway.workflow_contexts import add_workflow_contexts
from pacs_common.audit import AuditSettings, BackgroundAuditWriter
from pacs_common.db.blocking import BlockingPool
from pacs_common.messaging.models import IngestMessage
from pacs_common.nodes import Operation, RemoteNodeCreate, RemoteNodeRepository
from pacs_common.query import QueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import DatabaseSettings, GatewaySettings
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.testing.storage_servers import free_port
from query_service.testing import Service

GATEWAY_AE = "PACS"
STORER = "POLICY_STORER"  # store, echo
FINDER = "POLICY_FINDER"  # find
STATIC = "POLICY_STATIC"  # on the static allow-list only
NODES: dict[str, tuple[Operation, ...]] = {
    STORER: (Operation.STORE, Operation.ECHO),
    FINDER: (Operation.FIND,),
}
NOT_AUTHORIZED = 0x0124


@dataclass
class PolicyGateway:
    port: int
    writer: BackgroundAuditWriter
    registry: CollectorRegistry
    received: list[IngestMessage]
    spool: Path

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def nodes(db_pool_session: asyncpg.Pool) -> None:
    repository = RemoteNodeRepository(db_pool_session)
    for ae_title, operations in NODES.items():
        await repository.remove(ae_title)
        await repository.add(
            RemoteNodeCreate(ae_title=ae_title, host="127.0.0.1", port=104, allowed_operations=operations)
        )


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    database_settings: DatabaseSettings,
    query_service: Service,
    nodes: None,
) -> Iterator[PolicyGateway]:
    """Wired like ``main.main``: the policy's EVT_REQUESTED handler and request guard,
    C-STORE, C-FIND, the audit writer; the plain listener only."""
    base = tmp_path_factory.mktemp("policy")
    spool = base / "spool"
    spool.mkdir()
    saved = (pynetdicom_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir)
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool)
    database = BlockingPool(database_settings, application_name="test-ae-policy")
    database.start()
    with contextlib.ExitStack() as stack:
        stack.callback(database.stop)
        registry = CollectorRegistry()
        metrics = GatewayMetrics(registry)
        writer = BackgroundAuditWriter(database, AuditSettings())
        writer.start()
        stack.callback(writer.stop)
        audit = DimseAudit(writer, GATEWAY_AE)
        received: list[IngestMessage] = []
        receiver = InstanceReceiver(FilesystemStorage(base / "hot"), "hot", received.append)
        query = QueryClient(query_service.base_url, timeout_seconds=10)
        stack.callback(query.close)
        settings = GatewaySettings(
            ae_title=GATEWAY_AE,
            host="127.0.0.1",
            port=free_port(),
            spool_dir=spool,
            reuse_port=False,
            allowed_calling_ae_titles=[STATIC],
        )
        policy = AePolicy(
            GatewayPolicySettings(mode=PolicyMode.REGISTRY, cache_seconds=5),
            GATEWAY_AE,
            nodes=RegistryNodeDirectory(database),
            static_calling_ae_titles=settings.allowed_calling_ae_titles,
            metrics=metrics,
            audit=audit,
        )
        find = FindHandler(query, GATEWAY_AE, metrics, audit)
        handlers: list[EventHandlerType] = [
            *policy.handlers(),
            (evt.EVT_C_STORE, StoreHandler(receiver, metrics, audit)),
            (evt.EVT_C_FIND, FindRouter(dict.fromkeys(FindHandler.sop_classes, find))),
            *AssociationObserver(metrics).handlers(),
            *audit.handlers(),
        ]
        ae = build_ae(settings)
        add_workflow_contexts(ae)
        policy.install(ae)
        listeners: GatewayListeners = start_listeners(
            ae, settings, GatewayTlsSettings(enabled=False), handlers, guard=policy.allows_request
        )
        stack.callback(listeners.shutdown)
        try:
            yield PolicyGateway(settings.port, writer, registry, received, spool)
        finally:
            pynetdicom_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = saved


# -- peers ---------------------------------------------------------------------------------------


def _instance() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "POLICY-1"
    ds.Modality = "CT"
    return ds


def _associate(port: int, calling: str, contexts: list[str], called: str = GATEWAY_AE) -> Association:
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejection(
    port: int, calling: str, contexts: list[str], called: str = GATEWAY_AE
) -> tuple[int, int, int]:
    assoc = _associate(port, calling, contexts, called)
    assert assoc.is_rejected, "the association was not rejected"
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    return int(primitive.result or 0), int(primitive.result_source or 0), int(primitive.diagnostic or 0)


def _store_find_echo(port: int, calling: str) -> tuple[int, list[int], int]:
    """On one association: C-STORE status, C-FIND statuses, C-ECHO status."""
    assoc = _associate(
        port, calling, [CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification]
    )
    assert assoc.is_established
    try:
        store = int(assoc.send_c_store(_instance()).Status)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientID = "NOBODY-AT-ALL"
        identifier.StudyInstanceUID = ""
        finds = [
            int(status.Status)
            for status, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        ]
        echo = int(assoc.send_c_echo().Status)
    finally:
        assoc.release()
    return store, finds, echo


async def _security_alerts(db_pool: asyncpg.Pool, gateway: PolicyGateway, actor: str) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = []
    for _ in range(100):
        await asyncio.to_thread(gateway.writer.flush)
        rows = await db_pool.fetch(
            "SELECT details FROM audit_event WHERE event_id = '110113' AND actor = $1 ORDER BY pk", actor
        )
        details = [_json_object(r["details"]) for r in rows]
        if details:
            break
        await asyncio.sleep(0.05)
    return details


def _json_object(value: Any) -> dict[str, Any]:
    """A jsonb column as read by plain asyncpg: JSON text of an object (not of a string)."""
    if isinstance(value, str):
        value = json.loads(value)
    assert isinstance(value, dict)
    return value


# -- association level ----------------------------------------------------------------------------


async def test_an_unknown_calling_ae_title_is_rejected_with_reason_3(
    gateway: PolicyGateway, db_pool_session: asyncpg.Pool
) -> None:
    before = gateway.metric("pacs_dimse_associations_total", {"outcome": "rejected"})
    result = await asyncio.to_thread(_rejection, gateway.port, "POLICY_NOBODY", [Verification])
    # rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized
    assert result == (1, 1, 3)
    assert gateway.metric("pacs_dimse_associations_total", {"outcome": "rejected"}) == before + 1
    labels = {"stage": "association", "reason": "calling_ae_title"}
    assert gateway.metric("pacs_dimse_policy_refusals_total", labels) >= 1
    [alert] = await _security_alerts(db_pool_session, gateway, "POLICY_NOBODY")
    assert (alert["operation"], alert["result"], alert["source"], alert["diagnostic"]) == (
        "A-ASSOCIATE",
        1,
        1,
        3,
    )


async def test_a_wrong_called_ae_title_is_rejected_with_reason_7(gateway: PolicyGateway) -> None:
    result = await asyncio.to_thread(_rejection, gateway.port, STORER, [Verification], "NOT_THE_PACS")
    # rejected-permanent, DICOM UL service-user, called-AE-title-not-recognized
    assert result == (1, 1, 7)


async def test_a_node_proposing_only_what_it_may_not_use_is_rejected(gateway: PolicyGateway) -> None:
    # FINDER may find only: a storage-only association has nothing it may do.
    result = await asyncio.to_thread(_rejection, gateway.port, FINDER, [CTImageStorage])
    assert result == (1, 1, 1)
    labels = {"stage": "association", "reason": "no_permitted_sop_class"}
    assert gateway.metric("pacs_dimse_policy_refusals_total", labels) >= 1


async def test_a_static_allow_list_title_is_accepted_without_a_registry_entry(gateway: PolicyGateway) -> None:
    store, finds, echo = await asyncio.to_thread(_store_find_echo, gateway.port, STATIC)
    assert (store, finds[-1], echo) == (0x0000, 0x0000, 0x0000)


# -- request level ----------------------------------------------------------------------------------


async def test_a_node_with_store_but_not_find_may_store_and_not_find(
    gateway: PolicyGateway, db_pool_session: asyncpg.Pool
) -> None:
    stored_before = len(gateway.received)
    store, finds, echo = await asyncio.to_thread(_store_find_echo, gateway.port, STORER)
    assert store == 0x0000 and len(gateway.received) == stored_before + 1
    assert finds == [NOT_AUTHORIZED]
    assert echo == 0x0000
    labels = {"stage": "request", "reason": "find"}
    assert gateway.metric("pacs_dimse_policy_refusals_total", labels) >= 1
    alerts = await _security_alerts(db_pool_session, gateway, STORER)
    assert any(a["operation"] == "find" and a["status"] == "0x0124" for a in alerts), alerts


async def test_a_node_with_find_but_not_store_may_find_and_not_store(gateway: PolicyGateway) -> None:
    stored_before = len(gateway.received)
    store, finds, echo = await asyncio.to_thread(_store_find_echo, gateway.port, FINDER)
    assert finds[-1] == 0x0000
    assert store == NOT_AUTHORIZED and echo == NOT_AUTHORIZED
    assert len(gateway.received) == stored_before
    # The refused C-STORE's spooled dataset is gone.
    assert list(gateway.spool.iterdir()) == []
