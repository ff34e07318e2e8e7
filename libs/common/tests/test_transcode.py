"""Transfer syntax choice and conversion, on pydicom's real test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from pacs_common.dicom.transcode import TranscodeError, choose_transfer_syntax, transcode_file


def _path(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} missing"
    return Path(path)


def test_stored_syntax_wins_when_accepted() -> None:
    accepted = [ImplicitVRLittleEndian, JPEGLosslessSV1, ExplicitVRLittleEndian]
    assert choose_transfer_syntax(JPEGLosslessSV1, accepted) == JPEGLosslessSV1


def test_uncompressed_preferred_explicit_first() -> None:
    accepted = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert choose_transfer_syntax(JPEG2000, accepted) == ExplicitVRLittleEndian
    assert choose_transfer_syntax(ExplicitVRLittleEndian, [ImplicitVRLittleEndian]) == ImplicitVRLittleEndian


def test_lossless_compression_only() -> None:
    # Only lossy syntaxes accepted: nothing we would send.
    assert choose_transfer_syntax(ExplicitVRLittleEndian, [JPEGBaseline8Bit, JPEG2000]) is None
    assert choose_transfer_syntax(ExplicitVRLittleEndian, [JPEG2000Lossless]) == JPEG2000Lossless
    assert choose_transfer_syntax(ExplicitVRLittleEndian, []) is None


def test_big_endian_is_sent_only_as_stored() -> None:
    assert (
        choose_transfer_syntax(ExplicitVRBigEndian, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) is None
    )
    assert choose_transfer_syntax(ExplicitVRBigEndian, [ExplicitVRBigEndian]) == ExplicitVRBigEndian


def test_without_pixel_data_any_listed_syntax_is_a_rewrite() -> None:
    assert (
        choose_transfer_syntax(ExplicitVRLittleEndian, [JPEGLosslessSV1], has_pixel_data=False) is None
    )  # not a lossless encoding we list
    assert choose_transfer_syntax(ExplicitVRLittleEndian, [RLELossless], has_pixel_data=False) == RLELossless


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", ExplicitVRLittleEndian),  # JPEG Lossless SV1
        ("JPEG2000.dcm", ImplicitVRLittleEndian),
        ("MR_small_RLE.dcm", DeflatedExplicitVRLittleEndian),
    ],
)
def test_decompress_matches_the_decoded_pixels(name: str, target: UID, tmp_path: Path) -> None:
    source = _path(name)
    out = tmp_path / "out.dcm"
    transcode_file(source, out, target)
    original = dcmread(source)
    converted = dcmread(out)
    assert converted.file_meta.TransferSyntaxUID == target
    assert converted.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(converted.pixel_array, original.pixel_array)


@pytest.mark.parametrize("target", [RLELossless, JPEG2000Lossless])
def test_compress_losslessly(target: UID, tmp_path: Path) -> None:
    source = _path("CT_small.dcm")
    out = tmp_path / "out.dcm"
    transcode_file(source, out, target)
    converted = dcmread(out)
    assert converted.file_meta.TransferSyntaxUID == target
    assert np.array_equal(converted.pixel_array, dcmread(source).pixel_array)


def test_implicit_to_explicit_keeps_every_element(tmp_path: Path) -> None:
    source = _path("MR_small_implicit.dcm")
    out = tmp_path / "out.dcm"
    transcode_file(source, out, ExplicitVRLittleEndian)
    original, converted = dcmread(source), dcmread(out)
    assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert [e.tag for e in converted] == [e.tag for e in original]
    assert converted.PixelData == original.PixelData


def test_unreadable_source_is_a_transcode_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(TranscodeError):
        transcode_file(bad, tmp_path / "out.dcm", ExplicitVRLittleEndian)
