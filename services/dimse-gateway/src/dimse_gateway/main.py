"""dimse-gateway: wires settings → storage → broker → pynetdicom, serves until SIGTERM."""

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

from dimse_gateway.associations import AssociationObserver
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.server import ReusePortAssociationServer, build_ae, start_server
from dimse_gateway.store import StoreHandler
from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import BrokerSettings, GatewaySettings, TelemetrySettings
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.telemetry import configure_logging, configure_tracing, create_observability_app, serve_http

SERVICE = "dimse-gateway"
HOT_TIER = "hot"
SHUTDOWN_GRACE_SECONDS = 30.0

logger = logging.getLogger(__name__)


def _configure_pynetdicom(settings: GatewaySettings) -> None:
    """pynetdicom's knobs are process-wide; set them once, here.

    Received datasets are written to disk as they arrive (never whole in
    memory) into the spool directory; on the same filesystem as a filesystem
    hot tier, storing the instance is then a hard link, not a copy.
    """
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(settings.spool_dir)


async def _serve(
    settings: GatewaySettings,
    server: ReusePortAssociationServer,
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
    http = await serve_http(app, settings.http_host, settings.http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info(
        "DICOM gateway listening",
        extra={"ae_title": settings.ae_title, "port": settings.port, "http_port": settings.http_port},
    )
    await stop.wait()
    logger.info("stopping: no new associations; finishing open ones")
    await asyncio.to_thread(_drain, server, SHUTDOWN_GRACE_SECONDS)
    http.should_exit = True


def _drain(server: ReusePortAssociationServer, grace_seconds: float) -> None:
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
    telemetry = TelemetrySettings()
    configure_logging(telemetry, SERVICE)
    configure_tracing(telemetry, SERVICE)
    _configure_pynetdicom(settings)

    storage = StorageRegistry.from_settings((HOT_TIER,))
    publisher = BlockingPublisher(BrokerSettings())
    try:
        publisher.start()
    except Exception as exc:
        logger.error("cannot reach the broker: %s", exc)
        sys.exit(1)

    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    receiver = InstanceReceiver(storage.get(HOT_TIER), HOT_TIER, publisher.publish_ingest)
    handlers = [(evt.EVT_C_STORE, StoreHandler(receiver, metrics)), *AssociationObserver(metrics).handlers()]
    ae = build_ae(settings)
    server = start_server(ae, settings, handlers)
    metrics.active_associations.set_function(lambda: len(server.active_associations))
    try:
        asyncio.run(_serve(settings, server, publisher, storage.get(HOT_TIER), registry))
    finally:
        publisher.stop()
        storage.close()
        logger.info("stopped")
