"""Transfer syntax conversion for sending stored instances to a peer.

An instance is sent in the transfer syntax it was stored in whenever the peer
accepted that syntax: its bytes go out unchanged.  Only when the peer refused
it does the sender convert, choosing with :func:`choose_transfer_syntax`:

1. the stored syntax, if accepted (no conversion);
2. an uncompressed syntax — Explicit VR Little Endian, then Implicit VR
   Little Endian, then Deflated Explicit VR Little Endian — when the stored
   pixel data can be decoded (pydicom with the pylibjpeg / gdcm plugins);
3. a *lossless* compressed syntax pydicom can encode (RLE Lossless, JPEG 2000
   Lossless, JPEG-LS Lossless when its plugin is installed).

Lossy compression is never chosen: converting must not lose more than the
archive holds.  Instances stored in the retired Explicit VR Big Endian are
sent only to peers that accept it.  A lossy stored image may still be decompressed (its Lossy
Image Compression attribute stays "01").

Converting decodes the whole pixel data of one instance in memory (the
codecs work on whole frames), so the sender converts one instance at a time,
file to file; everything else streams.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

logger = logging.getLogger(__name__)

#: Uncompressed syntaxes in order of preference (Big Endian is retired: never offered).
UNCOMPRESSED: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
)
#: Lossless compressed syntaxes the sender may encode into, in order of preference.
LOSSLESS_ENCODINGS: tuple[UID, ...] = (RLELossless, JPEG2000Lossless, JPEGLSLossless)

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class TranscodeError(Exception):
    """The instance could not be converted; ``str(exc)`` says why, reason first."""


def is_native(transfer_syntax: str) -> bool:
    """Whether pixel data in this syntax is native (not encapsulated)."""
    return not UID(transfer_syntax).is_encapsulated


def can_decode(transfer_syntax: str) -> bool:
    """Whether pixel data in this syntax can be decoded here."""
    uid = UID(transfer_syntax)
    if not uid.is_encapsulated:
        return uid.is_transfer_syntax
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def can_encode(transfer_syntax: str) -> bool:
    """Whether pixel data can be encoded into this (lossless) syntax here."""
    uid = UID(transfer_syntax)
    if uid in UNCOMPRESSED:
        return True
    if uid not in LOSSLESS_ENCODINGS:
        return False
    try:
        return bool(get_encoder(uid).is_available)
    except NotImplementedError:
        return False


def choose_transfer_syntax(
    stored: str, accepted: Iterable[str], *, has_pixel_data: bool = True
) -> UID | None:
    """The syntax to send an instance stored in ``stored`` in, given the
    syntaxes the peer ``accepted`` for its SOP class; None when there is no
    way to send it (nothing accepted, or a conversion that cannot be done)."""
    offered = [UID(ts) for ts in accepted]
    stored_uid = UID(stored)
    if stored_uid in offered:
        return stored_uid
    if not stored_uid.is_little_endian:
        # Retired Explicit VR Big Endian: pydicom cannot rewrite it as little
        # endian (every OW/OF value would need swapping); sent only as stored.
        return None
    if has_pixel_data and stored_uid.is_encapsulated and not can_decode(stored_uid):
        return None
    for candidate in UNCOMPRESSED:
        if candidate in offered:
            return candidate
    for candidate in LOSSLESS_ENCODINGS:
        # Without pixel data an "encapsulated" syntax is just Explicit VR Little Endian.
        if candidate in offered and (not has_pixel_data or can_encode(candidate)):
            return candidate
    return None


def has_pixel_data(dataset: Dataset) -> bool:
    return any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS)


def transcode_file(source: Path, target: Path, transfer_syntax: str) -> None:
    """Write the Part 10 file ``source`` to ``target`` in ``transfer_syntax``.

    Raises :class:`TranscodeError` when the pixel data cannot be decoded or
    encoded (no codec, unsupported pixel format, corrupt data).
    """
    target_uid = UID(transfer_syntax)
    if not target_uid.is_transfer_syntax:
        raise TranscodeError(f"not a transfer syntax: {transfer_syntax}")
    try:
        dataset = dcmread(source)
    except Exception as exc:
        raise TranscodeError(f"unreadable object: {exc}") from exc
    stored = UID(dataset.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    try:
        with warnings.catch_warnings():
            # pydicom warns about the colour-space changes decoding makes;
            # those are the point of decoding.
            warnings.simplefilter("ignore")
            _convert(dataset, stored, target_uid)
        dataset.save_as(target, enforce_file_format=True)
    except TranscodeError:
        raise
    except Exception as exc:
        raise TranscodeError(f"cannot convert {stored.name} to {target_uid.name}: {exc}") from exc
    logger.debug("transcoded %s: %s -> %s", source.name, stored.name, target_uid.name)


def _convert(dataset: Dataset, stored: UID, target: UID) -> None:
    """Change ``dataset`` in place so that it is written in ``target``."""
    pixels = has_pixel_data(dataset)
    if pixels and stored.is_encapsulated and stored != target:
        if not can_decode(stored):
            raise TranscodeError(f"no decoder for {stored.name}")
        # To Explicit VR Little Endian, converting YCbCr to RGB where the
        # codec returns RGB, and updating the photometric attributes.  The
        # instance stays the same instance: a change of transfer syntax
        # keeps its SOP Instance UID (pydicom would make a new one).
        dataset.decompress(generate_instance_uid=False)
    if pixels and target.is_encapsulated and target != stored:
        if not can_encode(target):
            raise TranscodeError(f"no lossless encoder for {target.name}")
        dataset.compress(target, generate_instance_uid=False)
        return
    dataset.file_meta.TransferSyntaxUID = target
