"""Round trips of every file pydicom ships (its test files and its character set files): file -> DICOM JSON -> file and
file -> Native DICOM Model XML -> file, through ``pacs to-json/from-json``
and ``pacs to-xml/from-xml``, bulk data inline and in files.

The result is compared with the original element by element (tag, VR,
value, recursively into sequences, file meta included).  What cannot be
equal, and why, is listed here; each such file is still run through the
command, which must report it as a per-file ERROR, and then skipped with
its reason (``pytest -rs`` lists them; ``test_every_shipped_file_is_classified``
counts them).

* NOT_PART10: no Part 10 header (raw datasets without file meta, text,
  JSON, gzip, ICC profile): the tools read Part 10 files only.
* UNCONVERTIBLE: deliberately broken values pydicom refuses to put in the
  JSON model (``badVR.dcm``: an IS value "1A").
* Group Length elements (gggg,0000) outside group 0002 are retired (PS3.5
  7.2) and pydicom never writes them: they are left out of the comparison.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.errors import InvalidDicomError

from pacs_common.cli import to_json, to_xml
from pacs_common.dicom.json_files import dataset_differences

DATA_ROOT = Path(pydicom.__file__).parent / "data"
ALL_FILES = sorted({Path(p) for p in get_testdata_files() + get_charset_files() if Path(p).is_file()})

NOT_PART10 = {
    "test_files/ExplVR_BigEndNoMeta.dcm",
    "test_files/ExplVR_LitEndNoMeta.dcm",
    "test_files/README.txt",
    "test_files/crayons.icc",
    "test_files/dicomdirtests/README.txt",
    "test_files/dicomdirtests/TINY_ALPHA/README",
    "test_files/no_meta.dcm",
    "test_files/rtplan.dump",
    "test_files/rtstruct.dcm",
    "test_files/rtstruct.dump",
    "test_files/test1.json",
    "test_files/test_PN.json",
    "test_files/zipMR.gz",
    "charset_files/FileInfo.txt",
}
UNCONVERTIBLE = {"test_files/badVR.dcm": "deliberately invalid IS value '1A': pydicom cannot convert it"}
MODES = [("json", "inline"), ("json", "files"), ("xml", "inline"), ("xml", "files")]


def _name(path: Path) -> str:
    return path.relative_to(DATA_ROOT).as_posix()


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pacs")
    commands = parser.add_subparsers(dest="command", required=True)
    to_json.add_parser(commands)
    to_xml.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_every_shipped_file_is_classified() -> None:
    names = Counter(_name(p) for p in ALL_FILES)
    unreadable = set()
    for path in ALL_FILES:
        try:
            pydicom.dcmread(path)
        except InvalidDicomError:
            unreadable.add(_name(path))
    assert unreadable == NOT_PART10
    assert set(UNCONVERTIBLE) <= set(names)
    compared = len(ALL_FILES) - len(NOT_PART10) - len(UNCONVERTIBLE)
    print(
        f"pydicom test files: {len(ALL_FILES)}; compared: {compared}; "
        f"skipped: {len(NOT_PART10)} not Part 10, {len(UNCONVERTIBLE)} unconvertible"
    )
    assert compared > 150


@pytest.mark.parametrize(("fmt", "bulk"), MODES, ids=[f"{f}-{b}" for f, b in MODES])
@pytest.mark.parametrize("source", ALL_FILES, ids=_name)
def test_round_trip_keeps_every_element(
    source: Path, fmt: str, bulk: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    documents, files = tmp_path / "doc", tmp_path / "dcm"
    code = _cli(
        [f"to-{fmt}", str(source), "-o", str(documents), "--bulk-data", bulk, "--bulk-threshold", "64"]
    )
    captured = capsys.readouterr()
    name = _name(source)
    if name in NOT_PART10 or name in UNCONVERTIBLE:
        assert code == 1
        assert f"ERROR {source}:" in captured.err
        reason = UNCONVERTIBLE.get(name, "not a Part 10 file")
        assert ("not a DICOM file" if name in NOT_PART10 else "cannot convert") in captured.err
        pytest.skip(f"{name}: {reason}")
    assert code == 0, captured.err
    assert f"OK {source}" in captured.out

    assert _cli([f"from-{fmt}", str(documents), "-o", str(files)]) == 0, capsys.readouterr().err
    (written,) = files.iterdir()
    assert written.name == source.name
    original, copy = pydicom.dcmread(source), pydicom.dcmread(written)
    assert dataset_differences(original.file_meta, copy.file_meta, "meta.") == []
    assert dataset_differences(original, copy) == []
    if bulk == "files" and len(original.get("PixelData") or b"") > 64:
        assert any((documents / f"{source.name}.bulk").iterdir())
