"""Settings of DICOM digital signatures (``PACS_SIGNATURE_*``) and the loading
of the key, certificate and trust anchors they name.

* ``PACS_SIGNATURE_KEY_FILE``: the signer's RSA private key (PEM, or DER);
  ``PACS_SIGNATURE_KEY_PASSWORD`` if it is encrypted;
* ``PACS_SIGNATURE_CERTIFICATE_FILE``: the signer's X.509 certificate (PEM or DER);
* ``PACS_SIGNATURE_TRUST_ANCHORS``: comma-separated CA certificate files
  (PEM files may hold several certificates) a signer must be issued by;
  empty: signatures are checked for integrity only;
* ``PACS_SIGNATURE_PURPOSE``: CID 7007 code value of new signatures (default
  14, Source Signature);
* ``PACS_SIGNATURE_MAC_ALGORITHM``: SHA256 (default), SHA384 or SHA512;
* ``PACS_SIGNATURE_SIGN_ON_INGEST``: sign received instances (default false;
  needs the key and certificate).

Signing an instance on export or ingest::

    signer = SignatureSettings().signer()   # once, at start-up (fails fast)
    signer.sign(dataset)                    # per instance, before it is written
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key, load_pem_private_key
from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydicom.dataset import Dataset

from pacs_common.dicom.signatures import MacAlgorithm, SignaturePurpose, sign

__all__ = [
    "SignatureSettings",
    "SignatureSetupError",
    "Signer",
    "load_certificate",
    "load_certificates",
    "load_private_key",
]


class SignatureSetupError(ValueError):
    """A key, certificate or trust anchor file that cannot be used."""


class SignatureSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_SIGNATURE_", extra="ignore")

    key_file: Path | None = None
    key_password: SecretStr | None = None
    certificate_file: Path | None = None
    trust_anchors: Annotated[list[Path], NoDecode] = []
    purpose: SignaturePurpose = SignaturePurpose.SOURCE
    mac_algorithm: MacAlgorithm = "SHA256"
    sign_on_ingest: bool = False

    @model_validator(mode="after")
    def _signer_configured(self) -> SignatureSettings:
        if self.sign_on_ingest and (self.key_file is None or self.certificate_file is None):
            raise ValueError(
                "PACS_SIGNATURE_SIGN_ON_INGEST needs PACS_SIGNATURE_KEY_FILE and PACS_SIGNATURE_CERTIFICATE_FILE"
            )
        return self

    @field_validator("trust_anchors", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p.strip()) for p in value.split(",") if p.strip()]
        return value

    def signer(self) -> Signer:
        """The configured key and certificate (raises :class:`SignatureSetupError`)."""
        if self.key_file is None or self.certificate_file is None:
            raise SignatureSetupError(
                "signing needs PACS_SIGNATURE_KEY_FILE and PACS_SIGNATURE_CERTIFICATE_FILE"
            )
        password = self.key_password.get_secret_value().encode() if self.key_password else None
        return Signer(
            key=load_private_key(self.key_file, password),
            certificate=load_certificate(self.certificate_file),
            purpose=self.purpose,
            mac_algorithm=self.mac_algorithm,
        )

    def anchors(self) -> list[x509.Certificate] | None:
        """The trust anchors, or None when none are configured (trust not checked)."""
        if not self.trust_anchors:
            return None
        return [c for path in self.trust_anchors for c in load_certificates(path)]


@dataclass(frozen=True, slots=True)
class Signer:
    """What :func:`pacs_common.dicom.signatures.sign` needs besides the dataset."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    purpose: SignaturePurpose = SignaturePurpose.SOURCE
    mac_algorithm: MacAlgorithm = "SHA256"

    def sign(self, dataset: Dataset, *, elements: Sequence[str | int] | None = None) -> None:
        """Add this signer's signature to ``dataset`` (see :func:`pacs_common.dicom.signatures.sign`)."""
        sign(
            dataset,
            self.key,
            self.certificate,
            purpose=self.purpose,
            elements=elements,
            mac_algorithm=self.mac_algorithm,
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureSetupError(f"cannot read {path}: {exc.strerror}") from exc


def load_private_key(path: Path, password: bytes | None = None) -> rsa.RSAPrivateKey:
    data = _read(path)
    try:
        key = (
            load_pem_private_key(data, password)
            if b"-----BEGIN" in data
            else load_der_private_key(data, password)
        )
    except (ValueError, TypeError) as exc:
        raise SignatureSetupError(f"{path} is not a usable private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SignatureSetupError(f"{path} is not an RSA key (Base RSA Digital Signature Profile)")
    return key


def load_certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise SignatureSetupError(f"{path} holds no readable X.509 certificate: {exc}") from exc


def load_certificate(path: Path) -> x509.Certificate:
    return load_certificates(path)[0]
