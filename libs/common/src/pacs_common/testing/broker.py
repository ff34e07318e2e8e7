"""Pytest fixtures for tests against a real RabbitMQ.

The broker is shared (a developer's machine, CI), so every test gets a
namespace of its own — a unique prefix of every exchange and queue name — and
its topology is deleted afterwards.  Retry delays are short (100 and 200 ms)
so retry paths run in well under a second; a test that needs other settings
derives them with ``broker_settings.model_copy(update={...})`` and keeps the
namespace, so the teardown still cleans up.

Connection loss is simulated with :class:`TcpProxy` (fixture ``amqp_proxy``)
rather than by restarting the shared broker.

Set ``PACS_TEST_AMQP_URL`` to use another broker than
``amqp://guest:guest@127.0.0.1:5672/``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
import pytest_asyncio
from pydantic import SecretStr
from yarl import URL

from pacs_common.messaging.broker import Broker
from pacs_common.messaging.models import IngestMessage, IngestSource, StorageLocation
from pacs_common.messaging.topology import Topology, delete_topology
from pacs_common.settings import BrokerSettings

AMQP_URL_ENV = "PACS_TEST_AMQP_URL"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TEST_RETRY_DELAYS_MS = [100, 200]
# Teardown deletes this many retry queues whatever a test configured.
_MAX_RETRY_QUEUES = 16


def amqp_url_for_tests() -> str:
    return os.environ.get(AMQP_URL_ENV, DEFAULT_AMQP_URL)


def unique_namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}."


async def delete_namespace(url: str, namespace: str) -> None:
    """Delete every exchange and queue the topology of ``namespace`` can have."""
    topology = Topology(namespace=namespace, retry_delays_ms=(1,) * _MAX_RETRY_QUEUES)
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await delete_topology(channel, topology)
    finally:
        await connection.close()


def sample_ingest_message(index: int = 0) -> IngestMessage:
    """A valid ingest message with distinct UIDs per ``index``."""
    root = "1.2.826.0.1.3680043.8.498"
    study, series, sop = f"{root}.1", f"{root}.1.1", f"{root}.1.1.{index + 1}"
    return IngestMessage(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        location=StorageLocation(
            tier="hot", backend="filesystem", key=f"{study}/{series}/{sop}.dcm", size=1, sha256="0" * 64
        ),
        source=IngestSource(protocol="dimse", calling_ae_title="TEST", called_ae_title="PACS"),
    )


@pytest_asyncio.fixture
async def broker_settings() -> AsyncIterator[BrokerSettings]:
    """Settings for a fresh namespace on the test broker; deleted afterwards."""
    url = amqp_url_for_tests()
    settings = BrokerSettings(
        url=SecretStr(url),
        namespace=unique_namespace(),
        publish_timeout_seconds=5.0,
        retry_delays_ms=list(TEST_RETRY_DELAYS_MS),
        ingest_queue_max_length=None,
    )
    yield settings
    await delete_namespace(url, settings.namespace)


@pytest_asyncio.fixture
async def broker(broker_settings: BrokerSettings) -> AsyncIterator[Broker]:
    """A connected :class:`Broker` with its topology declared."""
    connected = await Broker.connect(broker_settings)
    try:
        yield connected
    finally:
        await connected.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpProxy:
    """Forwards a local port to the broker, and can cut or stall the link.

    ``cut()`` drops every connection and refuses new ones (a broker that is
    down); ``start()`` again listens on the same port (the broker is back).
    ``stall()`` keeps the connections but stops forwarding (a hung broker or
    network), ``unstall()`` lets the bytes flow again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._acceptor: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.settimeout(0.1)
        self._listening.set()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._listening.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                client.settimeout(None)
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                with self._lock:
                    self._sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._forwarding.wait()
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._listening.clear()
        if self._acceptor is not None:
            self._acceptor.join()
            self._acceptor = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stall(self) -> None:
        self._forwarding.clear()

    def unstall(self) -> None:
        self._forwarding.set()


def settings_via_proxy(
    settings: BrokerSettings, proxy: TcpProxy, reconnect_interval: float = 0.3
) -> BrokerSettings:
    """``settings`` pointed at ``proxy``, reconnecting quickly after a cut."""
    url = URL(settings.url.get_secret_value()).with_port(proxy.port)
    url = url % {"reconnect_interval": str(reconnect_interval)}
    return settings.model_copy(update={"url": SecretStr(str(url))})


@pytest.fixture
def amqp_proxy(broker_settings: BrokerSettings) -> Iterator[TcpProxy]:
    """A :class:`TcpProxy` in front of the test broker, listening."""
    url = URL(broker_settings.url.get_secret_value())
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5672))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.unstall()
        proxy.cut()
