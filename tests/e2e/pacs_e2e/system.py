"""Starting the PACS for a test: the local runner on free ports, with its own
database on the PostgreSQL server and its own namespace on the broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pacs_common.localrun.prometheus import PrometheusOptions
from pacs_common.localrun.runner import LocalSystem
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.topology import Topology, delete_topology
from pacs_common.settings import BrokerSettings, DatabaseSettings

SERVER_DB_URL = os.environ.get("PACS_TEST_DB_SERVER_URL", "postgresql://postgres@127.0.0.1:5432")
SERVER_AMQP_URL = os.environ.get("PACS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

# Short retry delays and quiet period so fault tests finish quickly.
TEST_ENV = {
    "PACS_AMQP_RETRY_DELAYS_MS": "[200, 1000, 3000]",
    "PACS_WORKER_STUDY_STABLE_SECONDS": "3",
    "PACS_WORKER_STABLE_CHECK_INTERVAL_SECONDS": "1",
    "PACS_TELEMETRY_LOG_FORMAT": "json",
}


async def _delete_namespace(broker_url: str, namespace: str) -> None:
    settings = BrokerSettings(url=broker_url, namespace=namespace)
    broker = await Broker.connect(settings, declare=False)
    try:
        await delete_topology(broker.channel, Topology.from_settings(settings))
    finally:
        await broker.close()


@contextmanager
def running_system(
    base: Path,
    *,
    gateways: int = 1,
    workers: int = 1,
    query_services: int = 1,
    dicomweb_services: int = 1,
    hsm_migrators: int = 0,
    prefetch_schedulers: int = 0,
    ai_connectors: int = 0,
    throwaway_infra: bool = False,
    extra_env: Mapping[str, str] | None = None,
    prometheus: PrometheusOptions | None = None,
) -> Iterator[LocalSystem]:
    """The whole PACS as processes; torn down (database and queues included) on exit.

    The background services (hsm-migrator, prefetch-scheduler, ai-connector)
    start only where a test asks for them: the others test the front doors
    and would only pay for their start-up.  A test of the DICOM side alone
    may leave out the dicomweb-api (and the query-service) the same way."""
    tag = uuid.uuid4().hex[:10]
    database_url = None if throwaway_infra else f"{SERVER_DB_URL}/pacs_e2e_{tag}"
    broker_url = None if throwaway_infra else SERVER_AMQP_URL
    namespace = f"e2e{tag}."
    system = LocalSystem(
        base,
        gateways=gateways,
        workers=workers,
        query_services=query_services,
        dicomweb_services=dicomweb_services,
        hsm_migrators=hsm_migrators,
        prefetch_schedulers=prefetch_schedulers,
        ai_connectors=ai_connectors,
        database_url=database_url,
        broker_url=broker_url,
        namespace=namespace,
        data_dir=base / "data",
        gateway_port=0,
        http_port_base=0,
        extra_env={**TEST_ENV, **(extra_env or {})},
        throwaway_infra=throwaway_infra,
        out=None,
        prometheus=prometheus,
    )
    system.start()
    try:
        yield system
    finally:
        system.stop()
        if not throwaway_infra:
            from pacs_common.db.migrate import drop_database

            drop_database(DatabaseSettings(url=system.database_url))
            asyncio.run(_delete_namespace(system.broker_url, namespace))


def pacs_cli(system: LocalSystem, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``pacs`` admin command against ``system`` (its database and broker)."""
    command = Path(sys.executable).with_name("pacs")
    environment = {**os.environ, **system.env}
    return subprocess.run(
        [str(command), *args], env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )
