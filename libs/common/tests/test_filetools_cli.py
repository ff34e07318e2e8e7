"""``pacs dump``, ``convert``, ``send`` and the XML/JSON commands as a user
runs them: folders walked recursively, one line per file, bad files
reported while the others go on; checked against DCMTK (storescp,
dcm2xml, xml2dcm)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pacs_common.cli import convert, dump, send, to_json, to_xml
from pacs_common.cli.common import CliError
from pacs_common.dicom.json_files import dataset_differences
from pacs_common.dicom.transcode import can_encode
from pacs_common.testing.storage_servers import free_port

STORESCP = Path("/usr/bin/storescp")
DCM2XML = Path("/usr/bin/dcm2xml")
XML2DCM = Path("/usr/bin/xml2dcm")
DATA_ROOT = Path(pydicom.__file__).parent / "data"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pacs")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (dump, to_json, to_xml, convert, send):
        module.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args))


def _file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(path)


def _folder(tmp_path: Path) -> Path:
    """CT_small, a nested MR_small and JPEG 2000 file, and a text file."""
    source = tmp_path / "in"
    (source / "nested").mkdir(parents=True)
    shutil.copy(_file("CT_small.dcm"), source / "ct.dcm")
    shutil.copy(_file("MR_small.dcm"), source / "nested" / "mr.dcm")
    shutil.copy(_file("JPEG2000.dcm"), source / "nested" / "j2k.dcm")
    (source / "nested" / "README.txt").write_text("not DICOM\n")
    return source


def _is_part10(path: str) -> bool:
    try:
        pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return False
    return True


# -- dump ----------------------------------------------------------------------


def test_dump_every_shipped_file_reports_each_one(capsys: pytest.CaptureFixture[str]) -> None:
    files = [p for p in get_testdata_files() + get_charset_files() if Path(p).is_file()]
    readable = {p for p in files if _is_part10(p)}

    code = _cli(["dump", str(DATA_ROOT / "test_files"), str(DATA_ROOT / "charset_files")])

    captured = capsys.readouterr()
    assert code == 1  # the text, JSON and raw files among them
    ok = {line.split()[1] for line in captured.out.splitlines() if line.startswith("OK ")}
    errors = [line for line in captured.err.splitlines() if line.startswith("ERROR ")]
    assert ok == readable
    assert len(errors) == len(files) - len(readable)
    assert all("not a DICOM file" in line for line in errors)
    assert "Traceback" not in captured.err


def test_dump_indents_sequences_and_summarises_pixels(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["dump", str(_file("rtplan.dcm")), str(_file("JPEG2000.dcm"))]) == 0

    out = capsys.readouterr().out
    assert "(300A,0010) SQ DoseReferenceSequence  (2 item(s))" in out
    assert "\n  Item 1\n    (300A,0012) IS DoseReferenceNumber  '1'" in out
    assert "(0002,0010) UI TransferSyntaxUID  1.2.840.10008.1.2  (Implicit VR Little Endian)" in out
    assert "# pixels: 1024 rows x 256 columns, 1 frame(s), 1 sample(s) per pixel" in out
    assert "# transfer syntax: JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91), compressed" in out
    assert "# no pixel data" in out


def test_dump_json_is_the_dicom_json_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _folder(tmp_path)

    code = _cli(["dump", "--json", str(source / "ct.dcm"), str(source / "nested" / "README.txt")])

    assert code == 1
    ct, readme = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert ct["status"] == "OK"
    assert ct["dataset"]["00100010"]["Value"] == [{"Alphabetic": "CompressedSamples^CT1"}]
    assert ct["dataset"]["00020010"]["Value"] == [ExplicitVRLittleEndian]
    assert ct["dataset"]["7FE00010"]["BulkDataURI"].endswith("#7FE00010")
    assert ct["pixels"]["rows"] == 128 and ct["pixels"]["compressed"] is False
    assert readme["status"] == "ERROR" and "not a DICOM file" in readme["error"]


# -- folders with bad files -------------------------------------------------------


def test_folder_with_a_non_dicom_file_reports_it_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _folder(tmp_path)
    out = tmp_path / "json"

    code = _cli(["to-json", str(source), "-o", str(out), "--json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (report["succeeded"], report["failed"]) == (3, 1)
    (failure,) = [f for f in report["files"] if f["status"] == "ERROR"]
    assert failure["path"].endswith("README.txt") and "not a DICOM file" in failure["detail"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")) == [
        "ct.dcm.json",
        "nested/j2k.dcm.json",
        "nested/mr.dcm.json",
    ]


def test_from_json_reports_broken_documents_and_missing_bulk_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    assert _cli(["to-json", str(_file("CT_small.dcm")), "-o", str(docs), "--bulk-data", "files"]) == 0
    (docs / "broken.json").write_text("{not json")
    (docs / "array.json").write_text("[1, 2]")
    good = tmp_path / "good"
    assert _cli(["from-json", str(docs / "CT_small.dcm.json"), "-o", str(good)]) == 0
    shutil.rmtree(docs / "CT_small.dcm.bulk")
    capsys.readouterr()

    code = _cli(["from-json", str(docs), "-o", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 1
    assert "broken.json: not JSON" in err
    assert "array.json: not a DICOM JSON object" in err
    assert "CT_small.dcm.json: not a valid DICOM model" in err and "BulkDataURI" in err
    assert pydicom.dcmread(good / "CT_small.dcm").pixel_array.shape == (128, 128)


# -- convert -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_implicit.dcm", "SC_rgb_small_odd.dcm"],
)
def test_convert_explicit_rle_explicit_keeps_the_pixels(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _file(name)
    rle, back = tmp_path / "rle", tmp_path / "back"

    assert _cli(["convert", str(source), "-o", str(rle), "--transfer-syntax", "rle"]) == 0
    assert _cli(["convert", str(rle), "-o", str(back), "-t", "explicit-le"]) == 0

    assert "(RLE Lossless)" in capsys.readouterr().out
    original, compressed, restored = (pydicom.dcmread(d / name) for d in (source.parent, rle, back))
    assert compressed.file_meta.TransferSyntaxUID == RLELossless
    assert restored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert restored.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(restored.pixel_array, original.pixel_array)


def test_convert_by_uid_and_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not can_encode(JPEG2000Lossless):
        pytest.skip("no JPEG 2000 encoder installed")
    source = _folder(tmp_path)

    code = _cli(["convert", str(source), "-o", str(tmp_path / "out"), "-t", str(JPEG2000Lossless)])

    captured = capsys.readouterr()
    assert code == 1
    assert "README.txt: unreadable object" in captured.err
    converted = pydicom.dcmread(tmp_path / "out" / "nested" / "mr.dcm")
    assert converted.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(converted.pixel_array, pydicom.dcmread(source / "nested" / "mr.dcm").pixel_array)
    with pytest.raises(CliError, match="unknown transfer syntax"):
        _cli(["convert", str(source), "-o", str(tmp_path / "x"), "-t", "jpeg-magic"])


# -- send ------------------------------------------------------------------------------


@contextmanager
def _storescp(received: Path, *extra: str) -> Iterator[int]:
    """DCMTK's storescp accepting every transfer syntax, writing to ``received``."""
    if not STORESCP.exists():
        pytest.skip("DCMTK storescp is not installed")
    port = free_port()
    received.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [str(STORESCP), "+xa", "-od", str(received), "-aet", "STORESCP", *extra, str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("storescp did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with _storescp(tmp_path / "received") as port:
        yield port, tmp_path / "received"


def test_send_delivers_a_folder_to_dcmtk_storescp(
    tmp_path: Path, storescp: tuple[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    port, received = storescp
    source = _folder(tmp_path)

    code = _cli(["send", str(source), "--host", "127.0.0.1", "--port", str(port), "--called-ae", "STORESCP"])

    captured = capsys.readouterr()
    assert code == 1  # the README
    assert "README.txt: not a DICOM file" in captured.err
    assert captured.out.count("status 0x0000 (Success)") == 3
    assert "[3/3]" in captured.out
    assert "pacs send: 3 file(s) OK, 1 failed" in captured.out
    sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in source.rglob("*.dcm")}
    stored = [pydicom.dcmread(p) for p in received.iterdir()]
    assert {str(ds.SOPInstanceUID) for ds in stored} == sent
    j2k = next(
        ds
        for ds in stored
        if ds.SOPInstanceUID == pydicom.dcmread(source / "nested" / "j2k.dcm").SOPInstanceUID
    )
    assert (
        j2k.file_meta.TransferSyntaxUID
        == pydicom.dcmread(source / "nested" / "j2k.dcm").file_meta.TransferSyntaxUID
    )


def test_send_to_nobody_is_one_clear_error(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    with pytest.raises(CliError, match="no association"):
        _cli(
            [
                "send",
                str(source / "ct.dcm"),
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--called-ae",
                "NOBODY",
                "--timeout",
                "2",
            ]
        )


# -- DCMTK and the Native DICOM Model ------------------------------------------------

DCMTK_XML_FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "SC_rgb_small_odd.dcm", "test-SR.dcm"]


@pytest.mark.parametrize("name", DCMTK_XML_FILES)
def test_from_xml_reads_dcmtk_native_model(name: str, tmp_path: Path) -> None:
    if not DCM2XML.exists():
        pytest.skip("DCMTK dcm2xml is not installed")
    source = _file(name)
    document = tmp_path / f"{name}.xml"
    result = subprocess.run(
        [str(DCM2XML), "--native-format", "+Eb", str(source)], capture_output=True, check=True
    )
    document.write_bytes(result.stdout)

    assert _cli(["from-xml", str(document), "-o", str(tmp_path / "out")]) == 0

    copy, original = pydicom.dcmread(tmp_path / "out" / name), pydicom.dcmread(source)
    if "PixelData" in original and original["PixelData"].VR == "OW":
        # DCMTK 3.6.7 writes OW InlineBinary as big endian 16-bit words; we
        # read it as little endian (PS3.18/19), so the words come swapped.
        swapped = np.frombuffer(copy.PixelData, dtype="<u2").byteswap().tobytes()
        assert swapped == original.PixelData
        del copy.PixelData, original.PixelData
    assert dataset_differences(original, copy) == []


def test_xml2dcm_reads_our_native_model(tmp_path: Path) -> None:
    if not XML2DCM.exists():
        pytest.skip("DCMTK xml2dcm is not installed")
    source = _file("CT_small.dcm")
    assert _cli(["to-xml", str(source), "-o", str(tmp_path)]) == 0
    result = subprocess.run(
        [str(XML2DCM), str(tmp_path / "CT_small.dcm.xml"), str(tmp_path / "x.dcm")],
        capture_output=True,
        text=True,
        check=False,
    )
    if "'data-set' expected" in result.stderr:
        pytest.skip("this DCMTK's xml2dcm reads only its own XML format, not the Native DICOM Model")
    assert result.returncode == 0, result.stderr
    copy = pydicom.dcmread(tmp_path / "x.dcm")
    assert copy.PatientName == "CompressedSamples^CT1"
    assert np.array_equal(copy.pixel_array, pydicom.dcmread(source).pixel_array)


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_send_over_tls_verifies_the_peer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, cert = _self_signed_certificate(tmp_path)
    source = _file("CT_small.dcm")
    with _storescp(tmp_path / "received", "+tls", str(key), str(cert), "-ic") as port:
        base = ["send", str(source), "--host", "127.0.0.1", "--port", str(port), "--called-ae", "STORESCP"]
        with pytest.raises(CliError):  # its certificate is not trusted
            _cli([*base, "--tls", "--timeout", "5"])
        assert _cli([*base, "--tls", "--ca-file", str(cert)]) == 0

    assert "status 0x0000 (Success)" in capsys.readouterr().out
    (stored,) = (tmp_path / "received").iterdir()
    assert pydicom.dcmread(stored).SOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID


def test_two_inputs_with_the_same_name_do_not_overwrite_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder, name in (("a", "CT_small.dcm"), ("b", "MR_small.dcm")):
        (tmp_path / folder).mkdir()
        shutil.copy(_file(name), tmp_path / folder / "image.dcm")

    code = _cli(
        ["convert", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out"), "-t", "implicit"]
    )

    assert code == 1
    assert f"ERROR {tmp_path / 'b' / 'image.dcm'}: its output" in capsys.readouterr().err
    assert pydicom.dcmread(tmp_path / "out" / "image.dcm").Modality == "CT"


def test_binary_values_of_a_big_endian_file_are_little_endian_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PS3.18 F.2.7: InlineBinary holds little endian words whatever the file's byte order."""
    little, big = _file("MR_small.dcm"), _file("MR_small_bigendian.dcm")
    assert _cli(["to-json", str(little), str(big), "-o", str(tmp_path)]) == 0
    models = [json.loads((tmp_path / f"{p.name}.json").read_text()) for p in (little, big)]

    assert models[0]["7FE00010"] == models[1]["7FE00010"]
    assert models[1]["00020010"]["Value"] == ["1.2.840.10008.1.2.2"]
