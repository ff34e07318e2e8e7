"""``pacs sign`` and ``pacs verify-signature`` on real files, with test
certificates made here; DCMTK's dcmsign checks what ``pacs sign`` wrote."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_common.cli import signatures as cli
from pacs_common.cli.common import CliError
from pacs_common.dicom.signature_settings import SignatureSettings, SignatureSetupError
from pacs_common.dicom.signatures import SignatureStatus, verify

NOW = datetime.now(UTC)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pacs")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def _write_identity(
    directory: Path,
    name: str,
    issuer: tuple[rsa.RSAPrivateKey, x509.Certificate] | None,
    *,
    expired: bool = False,
) -> tuple[rsa.RSAPrivateKey, x509.Certificate, Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    end = NOW - timedelta(days=1) if expired else NOW + timedelta(days=30)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=60))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer[0] if issuer else key, hashes.SHA256())
    )
    key_file = directory / f"{name}.key"
    cert_file = directory / f"{name}.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key, certificate, key_file, cert_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, _, ca_file = _write_identity(directory, "ca", None)
    _, _, key, cert = _write_identity(directory, "signer", (ca_key, ca_cert))
    _, _, old_key, old_cert = _write_identity(directory, "old", (ca_key, ca_cert), expired=True)
    return {"ca": ca_file, "key": key, "cert": cert, "old_key": old_key, "old_cert": old_cert}


def _study(directory: Path, count: int = 2) -> list[Path]:
    study = generate_uid()
    paths = []
    for n in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = f"{study[:60]}.1"
        ds.PatientName = "DOE^JANE"
        ds.PatientID = "PAT-7"
        ds.InstanceNumber = n + 1
        path = directory / "series" / f"{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_sign_a_directory_then_verify_it(
    pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _study(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    code = _run(
        ["sign", str(tmp_path / "in"), "-o", str(out), "--key", str(pki["key"]), "--cert", str(pki["cert"])]
    )
    assert code == 1  # the text file failed, the two DICOM files were signed
    captured = capsys.readouterr()
    assert "signed 2 file(s)" in captured.out and "notes.txt" in captured.err
    signed = sorted((out / "series").glob("*.dcm"))
    assert len(signed) == 2

    assert _run(["verify-signature", str(out / "series"), "--ca", str(pki["ca"]), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [len(r["signatures"]) for r in reports] == [1, 1]
    assert {s["status"] for r in reports for s in r["signatures"]} == {"valid"}
    assert reports[0]["signatures"][0]["purpose"] == "(14, ASTM-sigpurpose, Source Signature)"

    dcmsign = shutil.which("dcmsign")
    if dcmsign is not None:
        result = subprocess.run(
            [dcmsign, "--verify", "+cf", str(pki["ca"]), str(signed[0])],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    # One changed byte in a signed element: exit 1, the file named invalid.
    data = signed[1].read_bytes()
    signed[1].write_bytes(data.replace(b"DOE^JANE", b"DOE^JANF"))
    assert _run(["verify-signature", str(out), "--ca", str(pki["ca"])]) == 1
    text = capsys.readouterr().out
    assert f"{signed[0]}: signature 1 (MAC ID 0): VALID" in text
    assert f"{signed[1]}: signature 1 (MAC ID 0): INVALID" in text
    assert "PatientName" in text  # the signed elements are listed


def test_expired_and_untrusted_certificates_fail(
    pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [original] = _study(tmp_path / "in", 1)
    out = tmp_path / "out"
    args = [
        "sign",
        str(original),
        "-o",
        str(out),
        "--key",
        str(pki["old_key"]),
        "--cert",
        str(pki["old_cert"]),
    ]
    assert _run([*args, "--purpose", "1", "--mac", "SHA384"]) == 0
    capsys.readouterr()
    assert _run(["verify-signature", str(out / original.name), "--ca", str(pki["ca"]), "--json"]) == 1
    [report] = json.loads(capsys.readouterr().out)
    assert report["signatures"][0]["status"] == "expired"
    assert report["signatures"][0]["mac_algorithm"] == "SHA384"
    # Another CA: untrusted.
    assert _run(["verify-signature", str(out / original.name), "--ca", str(pki["cert"]), "--json"]) == 1
    [report] = json.loads(capsys.readouterr().out)
    assert report["signatures"][0]["status"] == "untrusted-certificate"


def test_settings_from_the_environment_and_unsigned_files(
    pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    [original] = _study(tmp_path / "in", 1)
    monkeypatch.setenv("PACS_SIGNATURE_KEY_FILE", str(pki["key"]))
    monkeypatch.setenv("PACS_SIGNATURE_CERTIFICATE_FILE", str(pki["cert"]))
    monkeypatch.setenv("PACS_SIGNATURE_TRUST_ANCHORS", f"{pki['ca']}, {pki['cert']}")
    monkeypatch.setenv("PACS_SIGNATURE_PURPOSE", "5")
    assert _run(["sign", str(original), "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert _run(["verify-signature", str(tmp_path / "out"), "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["signatures"][0]["purpose"] == "(5, ASTM-sigpurpose, Verification Signature)"
    assert report["signatures"][0]["certificate_trusted"] is True
    # Unsigned: reported, a failure only with --require.
    assert _run(["verify-signature", str(original)]) == 0
    assert "no digital signature" in capsys.readouterr().out
    assert _run(["verify-signature", str(original), "--require"]) == 1


def test_missing_key_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACS_SIGNATURE_KEY_FILE", raising=False)
    with pytest.raises(CliError, match="--key"):
        _run(["sign", str(tmp_path), "-o", str(tmp_path / "out")])
    with pytest.raises(CliError, match="cannot read"):
        _run(
            [
                "sign",
                str(tmp_path),
                "-o",
                str(tmp_path / "o"),
                "--key",
                "/nonexistent",
                "--cert",
                "/nonexistent",
            ]
        )


def test_the_configured_signer_signs_for_export_and_ingest(
    pki: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_SIGNATURE_SIGN_ON_INGEST", "true")
    monkeypatch.delenv("PACS_SIGNATURE_KEY_FILE", raising=False)
    with pytest.raises(ValidationError, match="needs PACS_SIGNATURE_KEY_FILE"):
        SignatureSettings()
    monkeypatch.setenv("PACS_SIGNATURE_KEY_FILE", str(pki["key"]))
    monkeypatch.setenv("PACS_SIGNATURE_CERTIFICATE_FILE", str(pki["cert"]))
    monkeypatch.setenv("PACS_SIGNATURE_MAC_ALGORITHM", "SHA512")
    monkeypatch.setenv("PACS_SIGNATURE_TRUST_ANCHORS", str(pki["ca"]))
    settings = SignatureSettings()
    [path] = _study(tmp_path, 1)
    ds = pydicom.dcmread(path)
    settings.signer().sign(ds)
    [report] = verify(ds, trust_anchors=settings.anchors())
    assert (report.status, report.mac_algorithm) == (SignatureStatus.VALID, "SHA512")
    monkeypatch.setenv("PACS_SIGNATURE_KEY_FILE", str(pki["cert"]))
    with pytest.raises(SignatureSetupError, match="not a usable private key"):
        SignatureSettings().signer()
