"""dimse-gateway: wires settings → storage → broker → database → query-service
→ pynetdicom, serves until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import tempfile
import time

from prometheus_client import CollectorRegistry
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.events import EventHandlerType

from dimse_gateway.associations import AssociationObserver
from dimse_gateway.audit import DimseAudit
from dimse_gateway.commitment import CommitmentHandler
from dimse_gateway.find import FindHandler
from dimse_gateway.get import GetHandler
from dimse_gateway.jobs import MoveJobs
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.move import MoveHandler, RegistryNodeDirectory
from dimse_gateway.mpps import MppsHandler
from dimse_gateway.policy import AePolicy, GatewayPolicySettings
from dimse_gateway.sending import InstanceFiles, RetrieveSettings
from dimse_gateway.server import (
    FindRouter,
    FindService,
    GatewayListeners,
    RetrieveHandlers,
    build_ae,
    start_listeners,
)
from dimse_gateway.store import StoreHandler
from dimse_gateway.tls import GatewayTlsSettings
from dimse_gateway.workflow_contexts import MODALITY_WORKLIST_FIND, add_workflow_contexts
from dimse_gateway.worklist import WorklistHandler
from pacs_common.archive.access import ThreadedAccessRecorder
from pacs_common.archive.metrics import RestoreMetrics
from pacs_common.archive.requests import BlockingRestoreRequester
from pacs_common.archive.settings import AccessSettings
from pacs_common.audit import AuditSettings, BackgroundAuditWriter
from pacs_common.backpressure import Backpressure, BackpressureSettings, start_backlog_sampler
from pacs_common.db.blocking import BlockingPool
from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.nodes import tls_client_context
from pacs_common.query import QueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.resilience import Dependencies
from pacs_common.settings import (
    BrokerSettings,
    DatabaseSettings,
    GatewaySettings,
    StorageTiersSettings,
    TelemetrySettings,
)
from pacs_common.shutdown import CLOSING_RESERVE_SECONDS, GracePeriod, ShutdownSettings, stop_http
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.telemetry import (
    HttpTlsSettings,
    configure_logging,
    configure_tracing,
    create_observability_app,
    report_stopping,
    serve_http,
)
from pacs_common.workflow.settings import WorkflowSettings

SERVICE = "dimse-gateway"
HOT_TIER = "hot"

logger = logging.getLogger(__name__)


def _configure_pynetdicom(settings: GatewaySettings) -> None:
    """pynetdicom's knobs are process-wide; set them once, here.

    Received datasets are written to disk as they arrive (never whole in
    memory) into the spool directory; on the same filesystem as a filesystem
    hot tier, storing the instance is then a hard link, not a copy.  C-MOVE /
    C-GET sub-operations send files the same way, in chunks.
    """
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(settings.spool_dir)


async def _serve(
    settings: GatewaySettings,
    server: GatewayListeners,
    publisher: BlockingPublisher,
    storage: ObjectStorage,
    registry: CollectorRegistry,
) -> None:
    async def broker_ready() -> bool:
        return publisher.is_healthy()

    async def storage_ready() -> bool:
        await asyncio.to_thread(storage.stat, ".pacs-readiness-probe")
        return True

    app = create_observability_app(SERVICE, {"broker": broker_ready, "storage": storage_ready}, registry)
    shutdown = ShutdownSettings()
    http = await serve_http(app, settings.http_host, settings.http_port, tls=HttpTlsSettings())
    stop = asyncio.Event()
    report_stopping(app, stop)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info(
        "DICOM gateway listening",
        extra={"ae_title": settings.ae_title, "port": settings.port, "http_port": settings.http_port},
    )
    await stop.wait()
    grace = GracePeriod(shutdown.grace_seconds)
    logger.info("stopping: no new associations; finishing open ones")
    await asyncio.to_thread(_drain, server, grace.remaining(reserve=CLOSING_RESERVE_SECONDS))
    await stop_http(http, grace.remaining(reserve=CLOSING_RESERVE_SECONDS))


def _drain(server: GatewayListeners, grace_seconds: float) -> None:
    """Stop accepting (closes the listening socket), let open associations
    finish their work, abort what is left after the grace period."""
    server.shutdown()
    deadline = time.monotonic() + grace_seconds
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    for assoc in server.active_associations:
        assoc.abort()


def main() -> None:
    settings = GatewaySettings()
    retrieve_settings = RetrieveSettings()
    tls_settings = GatewayTlsSettings()
    policy_settings = GatewayPolicySettings()
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    _configure_pynetdicom(settings)

    # Every tier: C-MOVE / C-GET read wherever the index says an instance is.
    # Retries and circuit breakers of the outgoing calls (storage, query-service).
    dependencies = Dependencies()
    storage = StorageRegistry.from_settings(StorageTiersSettings().tiers, dependencies=dependencies)
    publisher = BlockingPublisher(BrokerSettings())
    try:
        publisher.start()
    except Exception as exc:
        logger.error("cannot reach the broker: %s", exc)
        sys.exit(1)
    # The node registry (C-MOVE destinations).  No connection is opened up
    # front: a database that is down fails C-MOVEs, not the gateway.
    database = BlockingPool(
        DatabaseSettings().model_copy(update={"pool_min_size": 0}), application_name=SERVICE
    )
    database.start()
    query = QueryClient(
        settings.query_url, timeout_seconds=settings.query_timeout_seconds, dependencies=dependencies
    )

    registry = CollectorRegistry()
    registry.register(dependencies)
    metrics = GatewayMetrics(registry)
    # Audit events are queued by the association threads and written by one
    # background thread: the DIMSE responses never wait for them.
    audit_writer = BackgroundAuditWriter(
        database, AuditSettings(), on_drop=lambda reason: metrics.audit_dropped.labels(reason).inc()
    )
    audit_writer.start()
    audit = DimseAudit(audit_writer, settings.ae_title)
    # Last access of what C-MOVE / C-GET send: coalesced in memory, written
    # by a background thread; restores of archived instances they meet.
    access = ThreadedAccessRecorder(database, AccessSettings())
    access.start()
    restores = BlockingRestoreRequester(database, requested_by=SERVICE, metrics=RestoreMetrics(registry))
    # Refuse C-STOREs (0xA700) while the ingest backlog or storage latency is over its limit.
    backpressure = Backpressure(BackpressureSettings())
    backlog_sampler = start_backlog_sampler(backpressure, BrokerSettings())
    receiver = InstanceReceiver(backpressure.timed(storage.get(HOT_TIER)), HOT_TIER, publisher.publish_ingest)
    files = InstanceFiles(storage, settings.spool_dir)
    tls_context = tls_client_context(
        retrieve_settings.tls_ca_file, retrieve_settings.tls_cert_file, retrieve_settings.tls_key_file
    )
    find = FindHandler(query, settings.ae_title, metrics, audit)
    # One EVT_C_FIND handler; Modality Worklist's Find SOP class joins this map.
    find_services: dict[str, FindService] = dict.fromkeys(FindHandler.sop_classes, find)
    find_services[MODALITY_WORKLIST_FIND] = WorklistHandler(query, metrics)
    mpps = MppsHandler(database, publisher, metrics, audit)
    commitment = CommitmentHandler(
        database,
        WorkflowSettings(),
        metrics,
        ae_title=settings.ae_title,
        audit=audit,
        ssl_context_factory=lambda: tls_context,
    )
    # Calling AE titles and per-node permissions (PACS_GATEWAY_POLICY_MODE=registry).
    policy = AePolicy(
        policy_settings,
        settings.ae_title,
        nodes=RegistryNodeDirectory(database),
        static_calling_ae_titles=settings.allowed_calling_ae_titles,
        require_called_ae_title=settings.require_called_ae_title,
        metrics=metrics,
        audit=audit,
    )
    handlers: list[EventHandlerType] = [
        *policy.handlers(),
        (evt.EVT_C_STORE, StoreHandler(receiver, metrics, audit, backpressure)),
        (evt.EVT_C_FIND, FindRouter(find_services)),
        *mpps.handlers(),
        *commitment.handlers(),
        *AssociationObserver(metrics).handlers(),
        *audit.handlers(),
    ]
    retrieve = RetrieveHandlers(
        move=MoveHandler(
            settings,
            query,
            RegistryNodeDirectory(database),
            files,
            metrics,
            ssl_context_factory=lambda: tls_context,
            audit=audit,
            jobs=MoveJobs(database),
            restores=restores,
            access=access,
            breakers=dependencies,
        ),
        get=GetHandler(query, files, metrics, audit, restores=restores, access=access),
    )
    ae = build_ae(settings)
    add_workflow_contexts(ae)
    policy.install(ae)

    def handshake_failed(address: str, reason: str, detail: str) -> None:
        metrics.tls_handshake_failures.labels(reason).inc()
        audit.tls_handshake_failed(address, reason, detail)

    # The plain port, and the DICOM TLS port when a certificate is configured.
    server = start_listeners(
        ae,
        settings,
        tls_settings,
        handlers,
        retrieve,
        guard=policy.allows_request if policy.enforcing else None,
        on_handshake_failure=handshake_failed,
    )
    metrics.active_associations.set_function(lambda: len(server.active_associations))
    metrics.backpressure_refusing.set_function(lambda: float(backpressure.refusing))
    # Commitment requests a previous process accepted but did not report.
    commitment.resume_pending()
    try:
        asyncio.run(_serve(settings, server, publisher, storage.get(HOT_TIER), registry))
    finally:
        commitment.close()
        publisher.stop()
        if backlog_sampler is not None:
            backlog_sampler.stop()
        query.close()
        access.stop()  # writes the last accesses, before the pool closes
        audit_writer.stop()
        database.stop()
        storage.close()
        logger.info("stopped")
