"""``POST /api/v1/signatures/verify`` and ``GET /api/v1/studies/.../signatures``:
digital signatures of uploaded and stored instances (real filesystem
storage and index), with test certificates made here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydicom.dataset import Dataset

from dicomweb_api.testing import Store, part10_bytes
from pacs_common.dicom.signatures import sign
from query_service.testing import dataset

STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = f"{STUDY}.1"
SOP = f"{SERIES}.1"
NOW = datetime.now(UTC)
Identity = tuple[rsa.RSAPrivateKey, x509.Certificate]


def _identity(name: str, issuer: Identity | None) -> Identity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer[0] if issuer else key, hashes.SHA256())
    )
    return key, certificate


@pytest.fixture(scope="module")
def ca() -> Identity:
    return _identity("API Test CA", None)


@pytest.fixture(scope="module")
def signer(ca: Identity) -> Identity:
    return _identity("Modality Signer", ca)


@pytest.fixture(autouse=True)
def trust_anchors(ca: Identity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "anchors.pem"
    path.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    monkeypatch.setenv("PACS_SIGNATURE_TRUST_ANCHORS", str(path))
    return path


def _signed(identity: Identity, sop: str = SOP) -> Dataset:
    ds = dataset(STUDY, SERIES, sop, patient_id="PAT-9", patient_name="ROE^RICHARD")
    sign(ds, identity[0], identity[1])
    return ds


def _url(sop: str = SOP) -> str:
    return f"/api/v1/studies/{STUDY}/series/{SERIES}/instances/{sop}/signatures"


async def _upload(client: httpx.AsyncClient, data: bytes, roles: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/dicom"}
    if roles is not None:
        headers["x-test-roles"] = roles
    return await client.post("/api/v1/signatures/verify", content=data, headers=headers)


async def test_a_stored_signed_instance_is_valid(
    client: httpx.AsyncClient, store: Store, signer: Identity
) -> None:
    await store([_signed(signer)])
    response = await client.get(_url())
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["sop_instance_uid"], body["valid"], body["trust_anchors_configured"]) == (SOP, True, True)
    [signature] = body["signatures"]
    assert signature["status"] == "valid"
    assert signature["signer_subject"] == "CN=Modality Signer"
    assert "PatientName" in signature["signed_elements"]


async def test_an_altered_copy_names_the_changed_element(
    client: httpx.AsyncClient, store: Store, signer: Identity
) -> None:
    [stored] = await store([_signed(signer)])
    altered = stored.data.replace(b"ROE^RICHARD", b"ROE^RICHARX")
    assert altered != stored.data
    response = await _upload(client, altered)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["valid"], body["compared_with_archive"]) == (False, True)
    [signature] = body["signatures"]
    assert signature["status"] == "invalid"
    assert signature["changed_elements"] == ["PatientName"]
    # The unaltered copy is valid.
    response = await _upload(client, stored.data)
    assert response.json()["valid"] is True


async def test_an_unknown_signer_is_untrusted(client: httpx.AsyncClient) -> None:
    stranger = _identity("Stranger", _identity("Other CA", None))
    response = await _upload(client, part10_bytes(_signed(stranger, f"{SERIES}.9")))
    assert response.status_code == 200
    body = response.json()
    assert (body["valid"], body["compared_with_archive"]) == (False, False)
    assert body["signatures"][0]["status"] == "untrusted-certificate"


async def test_unsigned_missing_and_unreadable(client: httpx.AsyncClient, store: Store) -> None:
    await store([dataset(STUDY, SERIES, SOP)])
    response = await client.get(_url())
    assert response.status_code == 200
    assert (response.json()["valid"], response.json()["signatures"]) == (False, [])
    assert (await client.get(_url(f"{SERIES}.404"))).status_code == 404
    assert (await client.get(_url("not-a-uid"))).status_code == 422
    assert (await _upload(client, b"not a DICOM file")).status_code == 400


@pytest.mark.parametrize(("roles", "status"), [("viewer", 200), ("", 403)])
async def test_needs_the_read_permission(
    client: httpx.AsyncClient, signer: Identity, roles: str, status: int
) -> None:
    response = await _upload(client, part10_bytes(_signed(signer)), roles=roles)
    assert response.status_code == status
