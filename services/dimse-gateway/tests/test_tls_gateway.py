"""DICOM TLS (PS3.15 Annex B) on the real gateway process, driven by DCMTK.

One system per module (gateway, worker, query-service as processes on a
database and broker namespace of their own on the shared PostgreSQL/RabbitMQ) whose gateway listens on a plain port and on a TLS
port that requires a client certificate signed by the test CA.  The
certificates are made here with ``cryptography``: a CA, a server
certificate (also the gateway's client certificate for its outgoing
associations), a client certificate, and an "untrusted" client certificate
from a CA the gateway does not know.

Proven with DCMTK 3.6.7's own TLS (``+tls key cert +cf ca``): C-ECHO and
C-STORE over TLS; a plain connection, a client without a certificate and a
client with an untrusted certificate refused (counted and audited); the
plain port unaffected; and a C-MOVE to a node marked ``tls`` delivered to
``storescp +tls`` (which requires the gateway's client certificate).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_common.nodes import Operation, RemoteNodeCreate, RemoteNodeRepository
from pacs_e2e.dcmtk import DCMTK_ENV, Result, dcmtk_available, run, tool
from pacs_e2e.system import running_system

pytestmark = pytest.mark.skipif(not dcmtk_available(), reason="needs DCMTK")

GATEWAY_AE = "PACS"
TLS_RECEIVER_AE = "TLSSCP"
#: DCMTK's default calling AE titles, and what each may do.
DCMTK_NODES: dict[str, tuple[Operation, ...]] = {
    "ECHOSCU": (Operation.ECHO,),
    "STORESCU": (Operation.STORE,),
    "MOVESCU": (Operation.MOVE,),
}
CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


# -- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    key: Path
    cert: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: KeyPair
    client: KeyPair
    untrusted: KeyPair


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PACS tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_pki(directory: Path) -> Pki:
    """A CA with a server and a client certificate, and a client certificate of another CA."""
    ca_key, rogue_key = _new_key(), _new_key()
    ca_cert = _certificate("Test CA", ca_key, _name("Test CA"), ca_key, ca=True)
    rogue_cert = _certificate("Rogue CA", rogue_key, _name("Rogue CA"), rogue_key, ca=True)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, issuer: x509.Certificate, issuer_key: rsa.RSAPrivateKey) -> KeyPair:
        key = _new_key()
        cert = _certificate(name, key, issuer.subject, issuer_key, ca=False)
        pair = KeyPair(directory / f"{name}.key", directory / f"{name}.crt")
        _write_key(key, pair.key)
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pair

    return Pki(
        ca=directory / "ca.crt",
        server=issue("server", ca_cert, ca_key),
        client=issue("client", ca_cert, ca_key),
        untrusted=issue("untrusted", rogue_cert, rogue_key),
    )


# -- the system ---------------------------------------------------------------------------------


@dataclass
class TlsPacs:
    system: LocalSystem
    tls_port: int
    pki: Pki

    @property
    def plain_port(self) -> int:
        return self.system.gateway_port

    def metric(self, name: str, labels: dict[str, str]) -> float:
        text = httpx.get(self.system.gateways[0].metrics_url, timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def security_alerts(self) -> list[dict[str, Any]]:
        """The details of every Security Alert in the audit trail."""
        rows = self.fetch("SELECT details FROM audit_event WHERE event_id = '110113'")
        return [_json_object(r["details"]) for r in rows]

    def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async def query() -> list[asyncpg.Record]:
            connection = await asyncpg.connect(self.system.database_url)
            try:
                return list(await connection.fetch(sql, *args))
            finally:
                await connection.close()

        return asyncio.run(query())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsPacs]:
    tls_port = find_free_port()
    env = {
        "PACS_GATEWAY_TLS_PORT": str(tls_port),
        "PACS_GATEWAY_TLS_CERT_FILE": str(pki.server.cert),
        "PACS_GATEWAY_TLS_KEY_FILE": str(pki.server.key),
        "PACS_GATEWAY_TLS_CA_FILE": str(pki.ca),
        "PACS_GATEWAY_TLS_REQUIRE_CLIENT_CERT": "true",
        "PACS_GATEWAY_TLS_HANDSHAKE_TIMEOUT_SECONDS": "3",
        # Outgoing (C-MOVE sub-operations) to nodes marked tls.
        "PACS_GATEWAY_RETRIEVE_TLS_CA_FILE": str(pki.ca),
        "PACS_GATEWAY_RETRIEVE_TLS_CERT_FILE": str(pki.server.cert),
        "PACS_GATEWAY_RETRIEVE_TLS_KEY_FILE": str(pki.server.key),
        # The AE-title policy in the real process: DCMTK's default calling AE titles are registered.
        "PACS_GATEWAY_POLICY_MODE": "registry",
        "PACS_GATEWAY_POLICY_CACHE_SECONDS": "1",
    }
    # What C-STORE and C-MOVE need: gateway, worker, query-service; no dicomweb-api.
    with running_system(tmp_path_factory.mktemp("pacs"), dicomweb_services=0, extra_env=env) as system:
        pacs = TlsPacs(system, tls_port, pki)
        for ae_title, operations in DCMTK_NODES.items():
            _register(pacs, RemoteNodeCreate(ae_title=ae_title, host="127.0.0.1", port=104), operations)
        yield pacs


def tls_echo(pacs: TlsPacs, *tls_args: str, port: int | None = None) -> Result:
    return run(
        ["echoscu", *tls_args, "-to", "5", "-aec", GATEWAY_AE, "127.0.0.1", str(port or pacs.tls_port)],
        timeout=30,
    )


def with_cert(pacs: TlsPacs, pair: KeyPair) -> list[str]:
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(pacs.pki.ca)]


# -- tests --------------------------------------------------------------------------------------


def test_echoscu_over_tls_with_a_client_certificate(pacs: TlsPacs) -> None:
    result = tls_echo(pacs, *with_cert(pacs, pacs.pki.client))
    assert result.returncode == 0, result.output


def test_storescu_over_tls_stores_the_instance(pacs: TlsPacs) -> None:
    sop_instance_uid = str(dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID)
    result = run(
        [
            "storescu",
            *with_cert(pacs, pacs.pki.client),
            "-aec",
            GATEWAY_AE,
            "127.0.0.1",
            str(pacs.tls_port),
            str(CT_SMALL),
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.output
    assert _wait_indexed(pacs, sop_instance_uid), "the instance sent over TLS was not indexed"


def test_plain_port_still_serves_plain_dicom(pacs: TlsPacs) -> None:
    result = tls_echo(pacs, port=pacs.plain_port)
    assert result.returncode == 0, result.output


def test_unregistered_calling_ae_title_is_rejected_over_tls(pacs: TlsPacs) -> None:
    result = tls_echo(pacs, *with_cert(pacs, pacs.pki.client), "-aet", "INTRUDER")
    assert result.returncode != 0
    assert "calling ae title not recognized" in result.output.lower(), result.output


def test_plain_connection_to_the_tls_port_fails(pacs: TlsPacs) -> None:
    before = pacs.metric("pacs_dimse_tls_handshake_failures_total", {"reason": "protocol"})
    result = tls_echo(pacs)
    assert result.returncode != 0, result.output
    assert _eventually(
        lambda: pacs.metric("pacs_dimse_tls_handshake_failures_total", {"reason": "protocol"}) > before
    )


def test_client_without_a_certificate_is_refused(pacs: TlsPacs) -> None:
    before = pacs.metric("pacs_dimse_tls_handshake_failures_total", {"reason": "certificate"})
    result = tls_echo(pacs, "+tla", "+cf", str(pacs.pki.ca))
    assert result.returncode != 0, result.output
    assert _eventually(
        lambda: pacs.metric("pacs_dimse_tls_handshake_failures_total", {"reason": "certificate"}) > before
    )


def test_client_with_an_untrusted_certificate_is_refused_and_audited(pacs: TlsPacs) -> None:
    before = pacs.metric("pacs_dimse_tls_handshake_failures_total", {"reason": "certificate"})
    result = tls_echo(pacs, *with_cert(pacs, pacs.pki.untrusted))
    assert result.returncode != 0, result.output
    assert _eventually(
        lambda: pacs.metric("pacs_dimse_tls_handshake_failures_total", {"reason": "certificate"}) > before
    )

    def audited() -> bool:
        alerts = pacs.security_alerts()
        return any(a.get("operation") == "TLS handshake" and a.get("reason") == "certificate" for a in alerts)

    assert _eventually(audited), "no Security Alert for the refused TLS client"


def test_move_to_a_tls_node_is_delivered_over_tls(pacs: TlsPacs, tmp_path: Path) -> None:
    dataset = dcmread(CT_SMALL, stop_before_pixels=True)
    store = run(["storescu", "-aec", GATEWAY_AE, "127.0.0.1", str(pacs.plain_port), str(CT_SMALL)])
    assert store.returncode == 0, store.output
    assert _wait_indexed(pacs, str(dataset.SOPInstanceUID))
    port = find_free_port()
    received = tmp_path / "received"
    received.mkdir()
    # storescp +tls requires (-rc, its default) a client certificate the CA signed.
    receiver = subprocess.Popen(
        [
            tool("storescp"),
            "+tls",
            str(pacs.pki.server.key),
            str(pacs.pki.server.cert),
            "+cf",
            str(pacs.pki.ca),
            "-aet",
            TLS_RECEIVER_AE,
            "-od",
            str(received),
            str(port),
        ],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _register(pacs, RemoteNodeCreate(ae_title=TLS_RECEIVER_AE, host="127.0.0.1", port=port, tls=True))
        assert _eventually(lambda: _tcp_open(port))
        move = run(
            [
                "movescu",
                "-S",
                "-aec",
                GATEWAY_AE,
                "-aem",
                TLS_RECEIVER_AE,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={dataset.StudyInstanceUID}",
                "127.0.0.1",
                str(pacs.plain_port),
            ],
            timeout=60,
        )
        assert move.returncode == 0, move.output
        files = [p for p in received.iterdir() if p.is_file()]
        assert [str(dcmread(p).SOPInstanceUID) for p in files] == [str(dataset.SOPInstanceUID)], move.output
    finally:
        receiver.terminate()
        receiver.wait(10)


def test_move_to_a_tls_node_that_speaks_plain_dicom_fails(pacs: TlsPacs) -> None:
    """The gateway never falls back to plain DICOM for a node marked tls."""
    dataset = dcmread(CT_SMALL, stop_before_pixels=True)
    assert _wait_indexed(pacs, str(dataset.SOPInstanceUID))
    port = find_free_port()
    receiver = subprocess.Popen(
        [tool("storescp"), "-aet", "PLAINSCP", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _register(pacs, RemoteNodeCreate(ae_title="PLAINSCP", host="127.0.0.1", port=port, tls=True))
        assert _eventually(lambda: _tcp_open(port))
        move = run(
            [
                "movescu",
                "-S",
                "-aec",
                GATEWAY_AE,
                "-aem",
                "PLAINSCP",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={dataset.StudyInstanceUID}",
                "127.0.0.1",
                str(pacs.plain_port),
            ],
            timeout=60,
        )
        assert move.returncode != 0
        assert "outofresourcessuboperations" in move.output.lower(), move.output
    finally:
        receiver.terminate()
        receiver.wait(10)


# -- helpers ------------------------------------------------------------------------------------


def _register(
    pacs: TlsPacs, node: RemoteNodeCreate, operations: tuple[Operation, ...] = (Operation.STORE,)
) -> None:
    async def add() -> None:
        connection = await asyncpg.connect(pacs.system.database_url)
        try:
            repository = RemoteNodeRepository(connection)
            await repository.remove(node.ae_title)
            await repository.add(node.model_copy(update={"allowed_operations": operations}))
        finally:
            await connection.close()

    asyncio.run(add())


def _wait_indexed(pacs: TlsPacs, sop_instance_uid: str) -> bool:
    return _eventually(
        lambda: bool(pacs.fetch("SELECT 1 FROM instance WHERE sop_instance_uid = $1", sop_instance_uid)),
        timeout=20,
    )


def _json_object(value: Any) -> dict[str, Any]:
    """A jsonb column as read by plain asyncpg: JSON text of an object (not of a string)."""
    if isinstance(value, str):
        value = json.loads(value)
    assert isinstance(value, dict)
    return value


def _tcp_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _eventually(check: object, timeout: float = 10.0) -> bool:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
