"""The embedded HTTP server: HTTPS with a certificate from settings,
readiness that says "stopping", and a stop that lets requests in flight
finish."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from pacs_common.shutdown import GracePeriod, ShutdownSettings, finish_within_grace, stop_http
from pacs_common.telemetry import HttpTlsSettings, create_observability_app, report_stopping, serve_http


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "http.crt", directory / "http.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def port_of(server: object) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])  # type: ignore[attr-defined]


def test_health_over_https_verified_against_the_configured_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert_file, key_file = self_signed(tmp_path)
    monkeypatch.setenv("PACS_HTTP_TLS_CERT_FILE", str(cert_file))
    monkeypatch.setenv("PACS_HTTP_TLS_KEY_FILE", str(key_file))
    tls = HttpTlsSettings()
    assert tls.enabled

    async def scenario() -> None:
        app = create_observability_app("svc", {}, CollectorRegistry())
        server = await serve_http(app, "127.0.0.1", 0, tls=tls)
        try:
            trust = ssl.create_default_context(cafile=str(cert_file))
            async with httpx.AsyncClient(verify=trust) as client:
                response = await client.get(f"https://127.0.0.1:{port_of(server)}/health/live")
                assert response.json() == {"status": "ok", "service": "svc"}
            # Plain HTTP to the TLS port is no answer; an unknown CA is refused.
            async with httpx.AsyncClient() as client:
                with pytest.raises(httpx.ConnectError):
                    await client.get(f"https://127.0.0.1:{port_of(server)}/health/live")
        finally:
            await stop_http(server, 1)

    asyncio.run(scenario())


def test_tls_settings_need_both_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_HTTP_TLS_CERT_FILE", "/etc/ssl/x.crt")
    with pytest.raises(ValueError, match="go together"):
        HttpTlsSettings()
    monkeypatch.delenv("PACS_HTTP_TLS_CERT_FILE")
    assert not HttpTlsSettings().enabled


def test_readiness_says_stopping_and_in_flight_requests_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_SHUTDOWN_GRACE_SECONDS", "7")
    assert ShutdownSettings().grace_seconds == 7.0

    async def scenario() -> None:
        stop = asyncio.Event()
        release = asyncio.Event()
        entered = asyncio.Event()

        async def always_ready() -> bool:
            return True

        app = create_observability_app("svc", {"db": always_ready}, CollectorRegistry())
        report_stopping(app, stop)

        @app.post("/slow")
        async def slow() -> dict[str, str]:
            entered.set()
            await release.wait()
            return {"stored": "yes"}

        server = await serve_http(app, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{port_of(server)}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/health/ready")).status_code == 200
            in_flight = asyncio.create_task(client.post("/slow"))
            await entered.wait()
            stop.set()
            ready = await client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["status"] == "stopping"
            stopping = asyncio.create_task(stop_http(server, GracePeriod(7).remaining()))
            await asyncio.sleep(0.3)
            assert not stopping.done()  # waits for the request in flight
            release.set()
            response = await in_flight
            assert response.status_code == 200
            assert response.json() == {"stored": "yes"}
            await stopping
        async with httpx.AsyncClient(base_url=base) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/health/live")  # no longer listening

    asyncio.run(scenario())


def test_a_request_still_running_at_the_end_of_the_grace_period_is_cut() -> None:
    async def scenario() -> None:
        app = create_observability_app("svc", {}, CollectorRegistry())
        entered = asyncio.Event()

        @app.post("/forever")
        async def forever() -> None:
            entered.set()
            await asyncio.Event().wait()

        server = await serve_http(app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(server)}") as client:
            in_flight = asyncio.create_task(client.post("/forever"))
            await entered.wait()
            await stop_http(server, 1)
            # The client sees a failure, never a success.
            with pytest.raises(httpx.HTTPError):
                response = await in_flight
                response.raise_for_status()

    asyncio.run(scenario())


def test_grace_period_counts_down_with_a_reserve() -> None:
    now = [100.0]
    grace = GracePeriod(25.0, clock=lambda: now[0])
    assert grace.remaining() == 25.0
    assert grace.remaining(reserve=3.0) == 22.0
    now[0] += 24.0
    assert grace.remaining(reserve=3.0) == 0.0
    assert not grace.expired()
    now[0] += 1.0
    assert grace.expired()


def test_work_gets_the_grace_period_to_finish_then_is_cancelled() -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        finished: list[str] = []

        async def winds_down() -> None:
            await stop.wait()
            await asyncio.sleep(0.05)  # the move in hand
            finished.append("wound down")

        async def ignores_stop() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                finished.append("cancelled")
                raise

        async def fails() -> None:
            raise RuntimeError("broken")

        asyncio.get_running_loop().call_later(0.05, stop.set)
        await finish_within_grace(winds_down(), stop, 5.0, what="polite")
        await finish_within_grace(ignores_stop(), stop, 0.1, what="stubborn")
        with pytest.raises(RuntimeError, match="broken"):
            await finish_within_grace(fails(), asyncio.Event(), 5.0, what="broken")
        assert finished == ["wound down", "cancelled"]

    asyncio.run(scenario())
