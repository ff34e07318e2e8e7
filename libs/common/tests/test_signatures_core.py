"""DICOM digital signatures (PS3.15 Annex C): signing and verifying, checked
against DCMTK's dcmsign in both directions, with test certificates made here."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from pacs_common.dicom.signatures import (
    SignatureError,
    SignaturePurpose,
    SignatureStatus,
    sign,
    verify,
)

DCMSIGN = shutil.which("dcmsign")
needs_dcmsign = pytest.mark.skipif(DCMSIGN is None, reason="DCMTK dcmsign is not installed")
NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Identity:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        key = directory / f"{name}.key.pem"
        cert = directory / f"{name}.pem"
        key.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        cert.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return key, cert


def _identity(
    name: str, issuer: Identity | None, *, ca: bool, not_before: datetime, not_after: datetime
) -> Identity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return Identity(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


@dataclass(frozen=True)
class Pki:
    ca: Identity
    signer: Identity
    expired: Identity
    stranger: Identity  # issued by another CA


@pytest.fixture(scope="module")
def pki() -> Pki:
    year = timedelta(days=365)
    ca = _identity("PACS Test CA", None, ca=True, not_before=NOW - year, not_after=NOW + year)
    other = _identity("Other CA", None, ca=True, not_before=NOW - year, not_after=NOW + year)
    return Pki(
        ca=ca,
        signer=_identity("Dr Signer", ca, ca=False, not_before=NOW - year, not_after=NOW + year),
        expired=_identity(
            "Old Signer", ca, ca=False, not_before=NOW - 2 * year, not_after=NOW - timedelta(days=1)
        ),
        stranger=_identity("Stranger", other, ca=False, not_before=NOW - year, not_after=NOW + year),
    )


def _instance(transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "MÜLLER^JOHN"
    ds.PatientID = "PAT-1"
    ds.Modality = "OT"
    ds.SliceThickness = "1.25"
    ds.InstanceNumber = 7
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    reference.ReferencedSOPInstanceUID = generate_uid()
    code = Dataset()
    code.CodeValue = "121311"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Localizer"
    reference.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([reference, Dataset()])
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(16))
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _tamper(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1
    changed = path.with_name(f"tampered-{path.name}")
    changed.write_bytes(data.replace(old, new))
    return changed


def _dcmsign_verify(path: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    assert DCMSIGN is not None
    return subprocess.run(
        [DCMSIGN, "--verify", "+cf", str(ca), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sign_adds_only_the_two_sequences_and_verifies(pki: Pki) -> None:
    ds = _instance()
    before = {e.tag: e.value for e in ds}
    sign(ds, pki.signer.key, pki.signer.certificate, purpose=SignaturePurpose.AUTHOR)
    after = {e.tag: e.value for e in ds}
    assert set(after) - set(before) == {0x4FFE0001, 0xFFFAFFFA}
    assert all(after[tag] == value for tag, value in before.items())
    parameters = ds.MACParametersSequence[0]
    assert parameters.MACCalculationTransferSyntaxUID == ExplicitVRLittleEndian
    assert parameters.MACAlgorithm == "SHA256"
    assert 0x00080018 in parameters.DataElementsSigned and 0x7FE00010 in parameters.DataElementsSigned
    item = ds.DigitalSignaturesSequence[0]
    assert item.MACIDNumber == parameters.MACIDNumber == 0
    assert item.CertificateType == "X509_1993_SIG"
    code = item.DigitalSignaturePurposeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "1",
        "ASTM-sigpurpose",
        "Author's Signature",
    )
    [report] = verify(ds, trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.VALID, report.reason
    assert report.signer_subject == "CN=Dr Signer"
    assert report.purpose == "(1, ASTM-sigpurpose, Author's Signature)"
    assert report.certificate_trusted is True


def test_a_second_signature_gets_its_own_mac_id(pki: Pki, tmp_path: Path) -> None:
    ds = _instance()
    sign(ds, pki.signer.key, pki.signer.certificate)
    sign(ds, pki.signer.key, pki.signer.certificate, elements=["PatientName"], mac_algorithm="SHA512")
    assert [i.MACIDNumber for i in ds.DigitalSignaturesSequence] == [0, 1]
    assert list(ds.MACParametersSequence[1].DataElementsSigned) == [
        0x00080016,
        0x00080018,
        0x00100010,
        0x0020000D,
        0x0020000E,
    ]
    reread = pydicom.dcmread(_save(ds, tmp_path / "two.dcm"))
    assert [r.status for r in verify(reread, trust_anchors=[pki.ca.certificate])] == [
        SignatureStatus.VALID
    ] * 2


@needs_dcmsign
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_dcmsign_accepts_our_signature_and_sees_a_changed_byte(
    pki: Pki, tmp_path: Path, transfer_syntax: str
) -> None:
    _, ca = pki.ca.write(tmp_path, "ca")
    ds = _instance(transfer_syntax)
    sign(ds, pki.signer.key, pki.signer.certificate)
    signed = _save(ds, tmp_path / "signed.dcm")
    result = _dcmsign_verify(signed, ca)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Signature Verification : OK" in result.stdout + result.stderr

    tampered = _tamper(signed, b"PAT-1", b"PAT-2")
    result = _dcmsign_verify(tampered, ca)
    assert result.returncode != 0
    assert "signature is invalid" in result.stdout + result.stderr
    [report] = verify(pydicom.dcmread(tampered), trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.INVALID


@needs_dcmsign
@pytest.mark.parametrize("mac", ["+m2", "+m5", "+mr"])  # SHA256, SHA512, RIPEMD160 (dcmsign's default)
def test_we_accept_dcmsign_signatures_and_see_a_changed_byte(pki: Pki, tmp_path: Path, mac: str) -> None:
    assert DCMSIGN is not None
    key, cert = pki.signer.write(tmp_path, "signer")
    plain = _save(_instance(), tmp_path / "plain.dcm")
    signed = tmp_path / "dcmsign.dcm"
    subprocess.run(
        [DCMSIGN, "--sign", str(key), str(cert), "-pw", mac, "+sp", "14", str(plain), str(signed)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    original = pydicom.dcmread(signed)
    [report] = verify(original, trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.VALID, report.reason
    assert report.purpose == "(14, ASTM-sigpurpose, Source Signature)"

    tampered = pydicom.dcmread(_tamper(signed, "MÜLLER".encode("latin-1"), b"MULLER"))
    [report] = verify(tampered, trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.INVALID
    assert "PatientName" in report.signed_elements
    # Against the original, the changed element is named.
    [report] = verify(tampered, trust_anchors=[pki.ca.certificate], reference=original)
    assert report.status is SignatureStatus.INVALID
    assert report.changed_elements == ["PatientName"]
    assert "PatientName" in report.reason


@needs_dcmsign
def test_encapsulated_pixel_data_are_signed_in_their_own_transfer_syntax(pki: Pki, tmp_path: Path) -> None:
    _, ca = pki.ca.write(tmp_path, "ca")
    ds = _instance(JPEGBaseline8Bit)
    ds.PixelData = encapsulate([b"\xff\xd8fake-frame-1\xff\xd9", b"\xff\xd8frame2\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    sign(ds, pki.signer.key, pki.signer.certificate)
    assert ds.MACParametersSequence[0].MACCalculationTransferSyntaxUID == JPEGBaseline8Bit
    signed = _save(ds, tmp_path / "jpeg.dcm")
    result = _dcmsign_verify(signed, ca)
    assert result.returncode == 0, result.stdout + result.stderr
    [report] = verify(pydicom.dcmread(signed), trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.VALID, report.reason
    [report] = verify(
        pydicom.dcmread(_tamper(signed, b"frame2", b"frame3")), trust_anchors=[pki.ca.certificate]
    )
    assert report.status is SignatureStatus.INVALID


def test_a_certificate_from_another_ca_is_untrusted(pki: Pki) -> None:
    ds = _instance()
    sign(ds, pki.stranger.key, pki.stranger.certificate)
    [report] = verify(ds, trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.UNTRUSTED_CERTIFICATE
    assert report.certificate_trusted is False
    # Integrity alone (no anchors) is fine.
    [report] = verify(ds, trust_anchors=None)
    assert report.status is SignatureStatus.VALID and report.certificate_trusted is None


def test_an_expired_certificate_is_reported(pki: Pki) -> None:
    ds = _instance()
    sign(ds, pki.expired.key, pki.expired.certificate)
    [report] = verify(ds, trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.EXPIRED
    # It was valid a week ago.
    [report] = verify(ds, trust_anchors=[pki.ca.certificate], at=NOW - timedelta(days=7))
    assert report.status is SignatureStatus.VALID
    # A valid certificate, verified after it ended.
    ds = _instance()
    sign(ds, pki.signer.key, pki.signer.certificate)
    [report] = verify(ds, trust_anchors=[pki.ca.certificate], at=NOW + timedelta(days=400))
    assert report.status is SignatureStatus.EXPIRED


def test_a_removed_signed_element_is_named(pki: Pki) -> None:
    ds = _instance()
    sign(ds, pki.signer.key, pki.signer.certificate)
    del ds.PatientID
    [report] = verify(ds, trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.INVALID
    assert report.missing_elements == ["PatientID"]


def test_changes_outside_the_signed_elements_keep_the_signature_valid(pki: Pki) -> None:
    ds = _instance()
    sign(ds, pki.signer.key, pki.signer.certificate, elements=["PatientID"])
    ds.PatientName = "SOMEONE^ELSE"
    [report] = verify(ds, trust_anchors=[pki.ca.certificate])
    assert report.status is SignatureStatus.VALID


def test_bad_requests_are_refused(pki: Pki) -> None:
    ds = _instance()
    with pytest.raises(SignatureError, match="does not belong"):
        sign(ds, pki.ca.key, pki.signer.certificate)
    with pytest.raises(SignatureError, match="does not have"):
        sign(ds, pki.signer.key, pki.signer.certificate, elements=["AccessionNumber"])
    with pytest.raises(SignatureError, match="not an element"):
        sign(ds, pki.signer.key, pki.signer.certificate, elements=["NoSuchKeyword"])
    with pytest.raises(SignatureError, match="MAC algorithm"):
        sign(ds, pki.signer.key, pki.signer.certificate, mac_algorithm="MD5")  # type: ignore[arg-type]
    assert "DigitalSignaturesSequence" not in ds
    assert verify(ds, trust_anchors=None) == []


@needs_dcmsign
@pytest.mark.parametrize(
    ("who", "ours", "theirs"),
    [
        ("stranger", SignatureStatus.UNTRUSTED_CERTIFICATE, "unable to get local issuer certificate"),
        ("expired", SignatureStatus.EXPIRED, "certificate was expired"),
    ],
)
def test_dcmsign_agrees_on_untrusted_and_expired_certificates(
    pki: Pki, tmp_path: Path, who: str, ours: SignatureStatus, theirs: str
) -> None:
    identity: Identity = getattr(pki, who)
    _, ca = pki.ca.write(tmp_path, "ca")
    ds = _instance()
    sign(ds, identity.key, identity.certificate)
    signed = _save(ds, tmp_path / "signed.dcm")
    [report] = verify(pydicom.dcmread(signed), trust_anchors=[pki.ca.certificate])
    assert report.status is ours
    result = _dcmsign_verify(signed, ca)
    assert result.returncode != 0
    assert theirs in result.stdout + result.stderr
