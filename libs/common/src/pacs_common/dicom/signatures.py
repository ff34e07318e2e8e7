"""DICOM digital signatures (PS3.15 Annex C, PS3.3 C.12.1.1.3 Digital Signatures Macro).

:func:`sign` adds one signature to the top level of a dataset: an item of the
MAC Parameters Sequence (4FFE,0001) (MAC ID Number, MAC Calculation Transfer
Syntax UID, MAC Algorithm, Data Elements Signed) and an item of the Digital
Signatures Sequence (FFFA,FFFA) (MAC ID Number, Digital Signature UID and
DateTime, Certificate Type ``X509_1993_SIG``, Certificate of Signer (DER),
Signature, Digital Signature Purpose Code Sequence).  Nothing else in the
dataset changes.  Base RSA Digital Signature Profile: the MAC (SHA256,
SHA384 or SHA512) is signed with RSA PKCS #1 v1.5.

The byte stream that is MAC'd (PS3.3 C.12.1.1.3.1): the signed elements in
tag order, each encoded in the MAC Calculation Transfer Syntax (Explicit VR
Little Endian for native data; the object's own transfer syntax when its
pixel data are encapsulated), followed by the attributes of the Digital
Signatures Sequence item except Certificate of Signer, Signature and the
Certified Timestamp.  Elements are encoded by pydicom
(:func:`pydicom.filewriter.write_data_element`); sequences follow the
standard's rules: the Value Length of a sequence and of its items is left
out, Item Delimitation Items are left out, and every sequence ends with the
Sequence Delimitation Item tag (without its length), however the sequence
was encoded in the file.  Encapsulated pixel data are encoded the same way
(the item tags of their offset table and fragments, without item lengths).

:func:`verify` checks every signature of a dataset and reports, per
signature, ``valid``, ``invalid`` (the MAC or the RSA signature does not
match: a signed element changed, or one is missing), ``untrusted-certificate``
(the signer's certificate is not issued by one of the trust anchors) or
``expired`` (the signer's or its anchor's certificate is outside its
validity period at the verification time).

Which element changed: a signature holds one MAC over all signed elements,
so from the signed object alone no verifier can tell which one changed; the
report then lists the signed elements.  When the caller has a reference
copy (e.g. the original stored in the archive), pass it as ``reference`` and
the report names the signed elements whose encoding differs from it.

Signatures nested inside sequence items are not examined; only those of the
top-level dataset are.
"""

from __future__ import annotations

import copy
import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import BaseModel
from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "CERTIFICATE_TYPE",
    "MAC_ALGORITHMS",
    "PURPOSES",
    "SIGNING_MAC_ALGORITHMS",
    "SignatureError",
    "SignaturePurpose",
    "SignatureReport",
    "SignatureStatus",
    "sign",
    "signed_element_bytes",
    "verify",
]

CERTIFICATE_TYPE: Final = "X509_1993_SIG"
PURPOSE_SCHEME: Final = "ASTM-sigpurpose"

MAC_PARAMETERS_SEQUENCE: Final = BaseTag(0x4FFE0001)
DIGITAL_SIGNATURES_SEQUENCE: Final = BaseTag(0xFFFAFFFA)
_LENGTH_TO_END: Final = BaseTag(0x00080001)
_TRAILING_PADDING: Final = BaseTag(0xFFFCFFFC)
_SEQUENCE_DELIMITER: Final = b"\xfe\xff\xdd\xe0"
_ITEM: Final = b"\xfe\xff\x00\xe0"

# Attributes of the Digital Signatures Sequence item that are not in the MAC.
_NOT_IN_MAC: Final = frozenset(
    {
        BaseTag(0x04000115),  # Certificate of Signer
        BaseTag(0x04000120),  # Signature
        BaseTag(0x04000305),  # Certified Timestamp Type
        BaseTag(0x04000310),  # Certified Timestamp
    }
)

#: Identifying attributes always signed when present (the Creator RSA
#: profile's minimum; the Base RSA profile itself names none).
_IDENTIFYING: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

#: MAC Algorithm (0400,0015) defined terms this module verifies.
MAC_ALGORITHMS: Final = ("SHA256", "SHA384", "SHA512", "SHA1", "RIPEMD160", "MD5")
#: ... and those it signs with (SHA-1, RIPEMD-160 and MD5 are not recommended).
SIGNING_MAC_ALGORITHMS: Final = ("SHA256", "SHA384", "SHA512")
MacAlgorithm = Literal["SHA256", "SHA384", "SHA512"]

_HASHLIB_NAMES: Final = {
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA512": "sha512",
    "SHA1": "sha1",
    "RIPEMD160": "ripemd160",
    "MD5": "md5",
}
# DER DigestInfo prefixes (RFC 8017 9.2 note 1) of hashes `cryptography` has no class for.
_DIGEST_INFO_PREFIX: Final = {"RIPEMD160": bytes.fromhex("3021300906052b2403020105000414")}


class SignaturePurpose(StrEnum):
    """PS3.16 CID 7007 Signature Purpose (coding scheme ASTM-sigpurpose)."""

    AUTHOR = "1"
    COAUTHOR = "2"
    CO_PARTICIPANT = "3"
    TRANSCRIPTIONIST = "4"
    VERIFICATION = "5"
    VALIDATION = "6"
    CONSENT = "7"
    SIGNATURE_WITNESS = "8"
    EVENT_WITNESS = "9"
    IDENTITY_WITNESS = "10"
    CONSENT_WITNESS = "11"
    INTERPRETER = "12"
    REVIEW = "13"
    SOURCE = "14"
    ADDENDUM = "15"
    MODIFICATION = "16"
    ADMINISTRATIVE = "17"
    TIMESTAMP = "18"


#: Code meanings of CID 7007.
PURPOSES: Final[dict[SignaturePurpose, str]] = {
    SignaturePurpose.AUTHOR: "Author's Signature",
    SignaturePurpose.COAUTHOR: "Coauthor's Signature",
    SignaturePurpose.CO_PARTICIPANT: "Co-participant's Signature",
    SignaturePurpose.TRANSCRIPTIONIST: "Transcriptionist/Recorder Signature",
    SignaturePurpose.VERIFICATION: "Verification Signature",
    SignaturePurpose.VALIDATION: "Validation Signature",
    SignaturePurpose.CONSENT: "Consent Signature",
    SignaturePurpose.SIGNATURE_WITNESS: "Signature Witness Signature",
    SignaturePurpose.EVENT_WITNESS: "Event Witness Signature",
    SignaturePurpose.IDENTITY_WITNESS: "Identity Witness Signature",
    SignaturePurpose.CONSENT_WITNESS: "Consent Witness Signature",
    SignaturePurpose.INTERPRETER: "Interpreter Signature",
    SignaturePurpose.REVIEW: "Review Signature",
    SignaturePurpose.SOURCE: "Source Signature",
    SignaturePurpose.ADDENDUM: "Addendum Signature",
    SignaturePurpose.MODIFICATION: "Modification Signature",
    SignaturePurpose.ADMINISTRATIVE: "Administrative (Error/Edit) Signature",
    SignaturePurpose.TIMESTAMP: "Timestamp Signature",
}


class SignatureError(ValueError):
    """A signature cannot be created (a bad key, certificate or element list)."""


class SignatureStatus(StrEnum):
    VALID = "valid"
    INVALID = "invalid"
    UNTRUSTED_CERTIFICATE = "untrusted-certificate"
    EXPIRED = "expired"


class SignatureReport(BaseModel):
    """The verification of one signature of a dataset."""

    status: SignatureStatus
    reason: str
    mac_id: int | None
    signature_uid: str | None
    signer_subject: str | None
    signer_issuer: str | None
    signed_at: str | None
    purpose: str | None
    mac_algorithm: str | None
    #: None when no trust anchors were given (trust was not checked).
    certificate_trusted: bool | None
    certificate_not_after: datetime | None
    #: The signed elements (keyword, or the tag as ``(gggg,eeee)``).
    signed_elements: list[str]
    #: Signed elements the dataset no longer has.
    missing_elements: list[str]
    #: Signed elements that differ from the reference copy (only with ``reference``).
    changed_elements: list[str]


# --------------------------------------------------------------------------- encoding


def _name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


class _MacStream(DicomBytesIO):
    """Where the MAC's bytes are written.  ``source_implicit``: the object is
    encoded in Implicit VR, where an "OB or OW" element (pixel data, overlay
    data) is OW (PS3.5 A.1)."""

    def __init__(self, implicit: bool, source_implicit: bool) -> None:
        super().__init__()
        self.is_little_endian = True
        self.is_implicit_VR = implicit
        self.source_implicit = source_implicit


def _source_implicit(dataset: Dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None:
        return bool(syntax == ImplicitVRLittleEndian)
    return bool(dataset.original_encoding[0]) if dataset.original_encoding[0] is not None else False


def _write_element(fp: _MacStream, element: DataElement, encodings: list[str], parent: Dataset) -> None:
    """One element in signature format: pydicom's encoding, except that sequences
    and encapsulated values drop their lengths and delimiters per PS3.3 C.12.1.1.3.1."""
    if " or " in element.VR:  # e.g. "OB or OW": resolved as when the object is written
        element = copy.copy(element)
        if element.VR == "OB or OW" and fp.source_implicit:
            element.VR = "OW"
        else:
            correct_ambiguous_vr_element(element, parent, True)
    if element.VR == "SQ":
        _write_header(fp, element)
        for item in element.value:
            fp.write(_ITEM)
            _write_items_elements(fp, item, encodings)
        fp.write(_SEQUENCE_DELIMITER)
    elif element.is_undefined_length:  # encapsulated pixel data: items of fragments
        _write_header(fp, element)
        for fragment in _items_of(bytes(element.value)):
            fp.write(_ITEM)  # the item tag without the item length, as for sequence items
            fp.write(fragment)
        fp.write(_SEQUENCE_DELIMITER)
    else:
        write_data_element(fp, element, encodings=encodings)


def _items_of(value: bytes) -> Iterator[bytes]:
    """The item values (Basic Offset Table, fragments) of encapsulated data."""
    offset = 0
    while offset + 8 <= len(value):
        tag, length = struct.unpack_from("<4sL", value, offset)
        if tag != _ITEM:
            break
        yield value[offset + 8 : offset + 8 + length]
        offset += 8 + length


def _write_header(fp: _MacStream, element: DataElement) -> None:
    fp.write_tag(element.tag)
    if not fp.is_implicit_VR:
        fp.write(str(element.VR).encode("ascii") + b"\x00\x00")


def _write_items_elements(fp: _MacStream, item: Dataset, encodings: list[str]) -> None:
    item_encodings = _encodings(item, encodings)
    for element in item:  # a Dataset iterates in tag order
        if element.tag.element == 0:  # group lengths are never part of a MAC
            continue
        _write_element(fp, element, item_encodings, item)


def _encodings(dataset: Dataset, inherited: list[str]) -> list[str]:
    """The Python encodings of a dataset's (or item's) Specific Character Set."""
    value = dataset.get("SpecificCharacterSet")
    if not value:
        return inherited
    return convert_encodings(value if isinstance(value, str) else list(value))


def _implicit(transfer_syntax: str) -> bool:
    return transfer_syntax == ImplicitVRLittleEndian


def signed_element_bytes(
    dataset: Dataset, tag: BaseTag, transfer_syntax: str = ExplicitVRLittleEndian
) -> bytes:
    """One element of ``dataset`` as it enters a MAC."""
    fp = _MacStream(_implicit(transfer_syntax), _source_implicit(dataset))
    _write_element(fp, dataset[tag], _encodings(dataset, ["iso8859"]), dataset)
    return fp.getvalue()


def _is_signable(element: DataElement) -> bool:
    tag = element.tag
    if tag.group < 0x0008 or tag.element == 0 or tag in (_LENGTH_TO_END, MAC_PARAMETERS_SEQUENCE):
        return False
    if tag.group == 0xFFFA or tag == _TRAILING_PADDING or tag.group == 0xFFFE:
        return False
    if element.VR == "UN":
        return False
    if element.VR == "SQ":
        return all(_is_signable_in_item(e) for item in element.value for e in item)
    return True


def _is_signable_in_item(element: DataElement) -> bool:
    if element.VR == "UN":
        return False
    if element.VR == "SQ":
        return all(_is_signable_in_item(e) for item in element.value for e in item)
    return True


def _mac_stream(
    dataset: Dataset, tags: Iterable[BaseTag], signature_item: Dataset, transfer_syntax: str
) -> bytes:
    fp = _MacStream(_implicit(transfer_syntax), _source_implicit(dataset))
    encodings = _encodings(dataset, ["iso8859"])
    wanted = set(tags)
    for element in dataset:  # a Dataset iterates in tag order
        if element.tag in wanted:
            _write_element(fp, element, encodings, dataset)
    for element in signature_item:
        if element.tag not in _NOT_IN_MAC:
            _write_element(fp, element, encodings, signature_item)
    return fp.getvalue()


def _mac_transfer_syntax(dataset: Dataset) -> str:
    """Explicit VR Little Endian, unless the pixel data are encapsulated: then
    the object's own (encapsulated) transfer syntax, the only one its pixel
    data can be encoded in without decompressing them."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_encapsulated and "PixelData" in dataset:
        return str(syntax)
    return ExplicitVRLittleEndian


def _supported_transfer_syntax(uid: str) -> bool:
    syntax = UID(uid)
    return uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or (
        syntax.is_transfer_syntax and syntax.is_encapsulated and syntax.is_little_endian
    )


# --------------------------------------------------------------------------- signing


def _signature_hash(name: str) -> hashes.HashAlgorithm:
    algorithms: dict[str, hashes.HashAlgorithm] = {
        "SHA256": hashes.SHA256(),
        "SHA384": hashes.SHA384(),
        "SHA512": hashes.SHA512(),
        "SHA1": hashes.SHA1(),
        "MD5": hashes.MD5(),
    }
    return algorithms[name]


def _dicom_datetime(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S.%f%z")


def _next_mac_id(dataset: Dataset) -> int:
    used: set[int] = set()
    for keyword in ("MACParametersSequence", "DigitalSignaturesSequence"):
        for item in dataset.get(keyword, []):
            if "MACIDNumber" in item:
                used.add(int(item.MACIDNumber))
    mac_id = next((n for n in range(0x10000) if n not in used), None)
    if mac_id is None:
        raise SignatureError("every MAC ID number is in use")
    return mac_id


def _tags_to_sign(dataset: Dataset, elements: Sequence[str | int] | None) -> list[BaseTag]:
    if elements is None:
        return [e.tag for e in dataset if _is_signable(e)]
    try:
        wanted = {Tag(e) for e in elements} | {Tag(k) for k in _IDENTIFYING if k in dataset}
    except ValueError as exc:
        raise SignatureError(f"not an element to sign: {exc}") from exc
    tags: list[BaseTag] = []
    for tag in sorted(wanted):
        if tag not in dataset:
            raise SignatureError(f"{_name(tag)} is to be signed but the dataset does not have it")
        if not _is_signable(dataset[tag]):
            raise SignatureError(f"{_name(tag)} cannot be signed (PS3.3 C.12.1.1.3.1.1)")
        tags.append(tag)
    return tags


def sign(
    dataset: Dataset,
    key: rsa.RSAPrivateKey,
    certificate: x509.Certificate,
    *,
    purpose: SignaturePurpose | None = SignaturePurpose.SOURCE,
    elements: Sequence[str | int] | None = None,
    mac_algorithm: MacAlgorithm = "SHA256",
    now: datetime | None = None,
) -> None:
    """Add one signature to ``dataset`` (in place; nothing else changes).

    ``elements``: keywords or tags of the top-level elements to sign; by
    default every signable one.  The identifying UIDs (SOP Class / Instance,
    Study, Series) are always signed when present.  Raises
    :class:`SignatureError` for a key that does not match the certificate,
    an unsupported algorithm or an element that cannot be signed.
    ``now``: the Digital Signature DateTime (default: the current time).
    """
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SignatureError("the Base RSA Digital Signature Profile needs an RSA private key")
    if mac_algorithm not in SIGNING_MAC_ALGORITHMS:
        raise SignatureError(
            f"MAC algorithm {mac_algorithm} is not one of {', '.join(SIGNING_MAC_ALGORITHMS)}"
        )
    certified = certificate.public_key()
    if (
        not isinstance(certified, rsa.RSAPublicKey)
        or key.public_key().public_numbers() != certified.public_numbers()
    ):
        raise SignatureError("the private key does not belong to the certificate")
    tags = _tags_to_sign(dataset, elements)
    if not tags:
        raise SignatureError("nothing to sign")
    transfer_syntax = _mac_transfer_syntax(dataset)
    mac_id = _next_mac_id(dataset)

    item = Dataset()
    item.MACIDNumber = mac_id
    item.DigitalSignatureUID = generate_uid()
    item.DigitalSignatureDateTime = _dicom_datetime((now or datetime.now(UTC)).astimezone(UTC))
    item.CertificateType = CERTIFICATE_TYPE
    item.CertificateOfSigner = certificate.public_bytes(Encoding.DER)
    if purpose is not None:
        code = Dataset()
        code.CodeValue = purpose.value
        code.CodingSchemeDesignator = PURPOSE_SCHEME
        code.CodeMeaning = PURPOSES[purpose]
        item.DigitalSignaturePurposeCodeSequence = DicomSequence([code])

    stream = _mac_stream(dataset, tags, item, transfer_syntax)
    digest = hashlib.new(_HASHLIB_NAMES[mac_algorithm], stream).digest()
    item.Signature = key.sign(digest, padding.PKCS1v15(), Prehashed(_signature_hash(mac_algorithm)))

    parameters = Dataset()
    parameters.MACIDNumber = mac_id
    parameters.MACCalculationTransferSyntaxUID = transfer_syntax
    parameters.MACAlgorithm = mac_algorithm
    parameters.DataElementsSigned = list(tags)

    if "MACParametersSequence" not in dataset:
        dataset.MACParametersSequence = DicomSequence()
    if "DigitalSignaturesSequence" not in dataset:
        dataset.DigitalSignaturesSequence = DicomSequence()
    dataset.MACParametersSequence.append(parameters)
    dataset.DigitalSignaturesSequence.append(item)


# --------------------------------------------------------------------------- verifying


def verify(
    dataset: Dataset,
    *,
    trust_anchors: Sequence[x509.Certificate] | None,
    at: datetime | None = None,
    reference: Dataset | None = None,
) -> list[SignatureReport]:
    """A report per signature at the top level of ``dataset`` (empty: unsigned).

    ``trust_anchors``: the CA (or pinned signer) certificates the signer's
    certificate must be issued by; ``None`` checks no trust.  ``at``: when
    certificates must be valid (default: now).  ``reference``: a copy to
    name the changed elements against.
    """
    moment = (at or datetime.now(UTC)).astimezone(UTC)
    parameters = {
        int(item.MACIDNumber): item
        for item in dataset.get("MACParametersSequence", [])
        if "MACIDNumber" in item
    }
    return [
        _verify_one(dataset, item, parameters, trust_anchors=trust_anchors, at=moment, reference=reference)
        for item in dataset.get("DigitalSignaturesSequence", [])
    ]


def _purpose(item: Dataset) -> str | None:
    codes = item.get("DigitalSignaturePurposeCodeSequence", [])
    if not codes:
        return None
    code = codes[0]
    return f"({code.get('CodeValue', '')}, {code.get('CodingSchemeDesignator', '')}, {code.get('CodeMeaning', '')})"


def _verify_one(
    dataset: Dataset,
    item: Dataset,
    parameters: dict[int, Dataset],
    *,
    trust_anchors: Sequence[x509.Certificate] | None,
    at: datetime,
    reference: Dataset | None,
) -> SignatureReport:
    mac_id = int(item.MACIDNumber) if "MACIDNumber" in item else None
    report = SignatureReport(
        status=SignatureStatus.INVALID,
        reason="",
        mac_id=mac_id,
        signature_uid=str(item.get("DigitalSignatureUID", "")) or None,
        signer_subject=None,
        signer_issuer=None,
        signed_at=str(item.get("DigitalSignatureDateTime", "")) or None,
        purpose=_purpose(item),
        mac_algorithm=None,
        certificate_trusted=None,
        certificate_not_after=None,
        signed_elements=[],
        missing_elements=[],
        changed_elements=[],
    )

    def invalid(reason: str) -> SignatureReport:
        report.status, report.reason = SignatureStatus.INVALID, reason
        return report

    params = parameters.get(mac_id) if mac_id is not None else None
    if params is None:
        return invalid("no MAC Parameters Sequence item with this MAC ID Number")
    algorithm = str(params.get("MACAlgorithm", ""))
    report.mac_algorithm = algorithm or None
    if algorithm not in MAC_ALGORITHMS:
        return invalid(f"unsupported MAC algorithm {algorithm!r}")
    transfer_syntax = str(params.get("MACCalculationTransferSyntaxUID", ""))
    if not _supported_transfer_syntax(transfer_syntax):
        return invalid(f"unsupported MAC calculation transfer syntax {transfer_syntax!r}")
    signed = params.get("DataElementsSigned")
    values: list[int] = [] if signed is None else [signed] if isinstance(signed, int) else list(signed)
    tags = [BaseTag(t) for t in values]
    report.signed_elements = [_name(t) for t in tags]
    report.missing_elements = [_name(t) for t in tags if t not in dataset]
    if reference is not None:
        report.changed_elements = _changed(dataset, reference, tags, transfer_syntax)
    if str(item.get("CertificateType", "")) != CERTIFICATE_TYPE or "CertificateOfSigner" not in item:
        return invalid(f"no {CERTIFICATE_TYPE} certificate of the signer")
    try:
        certificate = x509.load_der_x509_certificate(_unpadded_der(bytes(item.CertificateOfSigner)))
    except ValueError:
        return invalid("the certificate of the signer cannot be read")
    report.signer_subject = certificate.subject.rfc4514_string()
    report.signer_issuer = certificate.issuer.rfc4514_string()
    report.certificate_not_after = certificate.not_valid_after_utc
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        return invalid("the signer's certificate has no RSA key (Base RSA Digital Signature Profile)")
    if "Signature" not in item:
        return invalid("no Signature")

    try:
        stream = _mac_stream(dataset, tags, item, transfer_syntax)
    except Exception as exc:  # a value pydicom cannot encode: the object was damaged
        return invalid(f"the signed elements cannot be encoded: {exc}")
    digest = hashlib.new(_HASHLIB_NAMES[algorithm], stream).digest()
    if not _signature_matches(public_key, bytes(item.Signature), digest, algorithm):
        what = ", ".join(report.changed_elements or report.missing_elements)
        if what:
            return invalid(f"the signature does not match: changed or missing: {what}")
        return invalid(
            f"the signature does not match: one or more of the {len(tags)} signed elements "
            "(or the signature's own attributes) changed"
        )

    if trust_anchors is not None:
        anchor = _issuing_anchor(certificate, trust_anchors)
        report.certificate_trusted = anchor is not None
        if anchor is None:
            report.status = SignatureStatus.UNTRUSTED_CERTIFICATE
            report.reason = (
                f"the signer's certificate (issuer {report.signer_issuer}) is not issued by a trust anchor"
            )
            return report
        for which, cert in (("signer's", certificate), ("trust anchor's", anchor)):
            if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
                report.status = SignatureStatus.EXPIRED
                report.reason = (
                    f"the {which} certificate is valid from {cert.not_valid_before_utc.isoformat()} "
                    f"to {cert.not_valid_after_utc.isoformat()}, not at {at.isoformat()}"
                )
                return report
    elif not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
        report.status = SignatureStatus.EXPIRED
        report.reason = (
            f"the signer's certificate is valid from {certificate.not_valid_before_utc.isoformat()} "
            f"to {certificate.not_valid_after_utc.isoformat()}, not at {at.isoformat()}"
        )
        return report
    report.status = SignatureStatus.VALID
    report.reason = "the signature matches" + (
        "" if trust_anchors is not None else " (certificate trust not checked: no trust anchors)"
    )
    return report


def _unpadded_der(data: bytes) -> bytes:
    """DER without the pad byte an odd length gets in an OB value."""
    if len(data) < 2:
        return data
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    count = first & 0x7F
    return data[: 2 + count + int.from_bytes(data[2 : 2 + count], "big")]


def _signature_matches(public_key: rsa.RSAPublicKey, signature: bytes, digest: bytes, algorithm: str) -> bool:
    try:
        if algorithm in _DIGEST_INFO_PREFIX:
            recovered = public_key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
            return recovered == _DIGEST_INFO_PREFIX[algorithm] + digest
        public_key.verify(signature, digest, padding.PKCS1v15(), Prehashed(_signature_hash(algorithm)))
    except (InvalidSignature, ValueError):
        return False
    return True


def _issuing_anchor(
    certificate: x509.Certificate, trust_anchors: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The anchor that is the certificate itself, or that issued (signed) it."""
    for anchor in trust_anchors:
        if anchor == certificate:
            return anchor
        try:
            certificate.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return anchor
    return None


def _changed(
    dataset: Dataset, reference: Dataset, tags: Sequence[BaseTag], transfer_syntax: str
) -> list[str]:
    changed: list[str] = []
    for tag in tags:
        if tag not in dataset or tag not in reference:
            if (tag in dataset) != (tag in reference):
                changed.append(_name(tag))
            continue
        try:
            if signed_element_bytes(dataset, tag, transfer_syntax) != signed_element_bytes(
                reference, tag, transfer_syntax
            ):
                changed.append(_name(tag))
        except Exception:
            changed.append(_name(tag))
    return changed
