"""Fuzzing STOW-RS request bodies against the running dicomweb-api.

Bodies mix good instances with bad parts (garbage, truncated DICOM, wrong or
missing or garbled part headers) and play boundary games (quoted, mismatched,
too long, missing, preamble and epilogue junk, LF line ends, a truncated
body, no close delimiter) and Content-Type games; some declare a body far
larger than allowed.  Every answer is a 2xx listing each failure with its
reason, or a 4xx saying why — never a 5xx.  Good parts of a well-formed body
are stored (and indexed), bad parts never, and the process serves on.
"""

from __future__ import annotations

import http.client
import io
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from python_multipart.multipart import parse_options_header

from pacs_common.localrun.runner import LocalSystem, ServiceProcess
from pacs_e2e.index import IndexReader
from pacs_e2e.system import running_system

pytestmark = [pytest.mark.fuzz, pytest.mark.e2e]

DICOM = "application/dicom"
MAX_BODY_BYTES = 256 * 1024
ANSWERS = {200, 202, 409, 400, 413, 415}
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
PIXEL_BYTES = 8 * 8
# RFC 2045 tspecials: a boundary holding one is sent quoted.
TSPECIALS = frozenset('()<>@,;:\\"/[]?=')


def instance_bytes() -> tuple[str, bytes]:
    """A small valid Secondary Capture instance: (SOP Instance UID, Part 10 bytes)."""
    uid = UID(f"2.25.1{uuid.uuid4().int:039d}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "2.25.1000"
    ds.SeriesInstanceUID = "2.25.1001"
    ds.PatientID = "FUZZ-STOW"
    ds.PatientName = "Fuzz^Stow"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(PIXEL_BYTES))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return uid, buffer.getvalue()


# -- parts and bodies ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartSpec:
    """``kind``: good, garbage, truncated, wrong-type, no-headers, garbled-header."""

    kind: str
    content_type: str = DICOM
    junk: bytes = b""
    cut: int = 0


@dataclass(frozen=True, slots=True)
class BodySpec:
    parts: list[PartSpec]
    boundary: str
    game: str  # none, quoted, mismatch, too-long, missing, preamble, epilogue, lf-only, truncated, no-close
    header: str  # ok, missing, mixed, json-type, random
    random_header: str = ""
    truncate_at: int = 0


@dataclass
class Built:
    content_type: str | None
    body: bytes
    good_uids: list[str] = field(default_factory=list)
    bad_uids: list[str] = field(default_factory=list)
    bad_parts: int = 0
    well_formed: bool = True


def _media_type(content_type: str) -> str:
    """The media type the server sees (a header without one counts as DICOM)."""
    return parse_options_header(content_type)[0].decode("latin-1").lower()


_bad_types = st.sampled_from(
    ["application/json", "text/plain", "image/jpeg", "application/dicom+xml"]
) | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\r\n"), max_size=40
).filter(lambda t: _media_type(t) not in ("", DICOM))
parts = st.one_of(
    st.just(PartSpec("good")),
    st.builds(PartSpec, st.just("garbage"), junk=st.binary(max_size=300)),
    st.builds(PartSpec, st.just("truncated"), cut=st.integers(1, PIXEL_BYTES - 1)),
    st.builds(PartSpec, st.just("wrong-type"), content_type=_bad_types),
    st.builds(PartSpec, st.just("no-headers"), junk=st.binary(max_size=100)),
    st.builds(PartSpec, st.just("garbled-header"), junk=st.binary(min_size=1, max_size=60)),
)
_boundary_chars = st.characters(codec="ascii", categories=["L", "N"]) | st.sampled_from("'()+_,-./:=?")
bodies = st.builds(
    BodySpec,
    parts=st.lists(parts, min_size=0, max_size=4),
    boundary=st.text(_boundary_chars, min_size=1, max_size=70).filter(lambda b: not b.endswith(" ")),
    game=st.sampled_from(
        ["none"] * 12
        + [
            "quoted",
            "mismatch",
            "too-long",
            "missing",
            "preamble",
            "epilogue",
            "lf-only",
            "truncated",
            "no-close",
        ]
    ),
    header=st.sampled_from(["ok"] * 12 + ["missing", "mixed", "json-type", "random"]),
    random_header=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
    ).filter(lambda h: h == h.strip()),
    truncate_at=st.integers(min_value=0, max_value=2**20),
)


def _part(spec: PartSpec, built: Built) -> bytes:
    """Headers and content of one part (without delimiters)."""
    if spec.kind == "good":
        uid, data = instance_bytes()
        built.good_uids.append(uid)
        return f"Content-Type: {DICOM}\r\n\r\n".encode() + data
    if spec.kind == "garbage":
        return f"Content-Type: {DICOM}\r\n\r\n".encode() + spec.junk
    if spec.kind == "truncated":
        uid, data = instance_bytes()
        built.bad_uids.append(uid)
        return f"Content-Type: {DICOM}\r\n\r\n".encode() + data[: len(data) - spec.cut]  # inside Pixel Data
    if spec.kind == "wrong-type":
        uid, data = instance_bytes()
        built.bad_uids.append(uid)
        return f"Content-Type: {spec.content_type}\r\n\r\n".encode() + data
    if spec.kind == "no-headers":
        return b"\r\n" + spec.junk
    return b"Content-Type: " + DICOM.encode() + b"\r\n" + spec.junk.replace(b"\r\n", b"") + b"\r\n\r\nabc"


def build(spec: BodySpec) -> Built:
    built = Built(None, b"")
    boundary = spec.boundary
    contents = [_part(p, built) for p in spec.parts]
    built.bad_parts = sum(p.kind != "good" for p in spec.parts)
    body_boundary = boundary if spec.game != "mismatch" else boundary + "x"
    eol = "\r\n" if spec.game != "lf-only" else "\n"
    out = bytearray()
    if spec.game == "preamble":
        out += b"preamble junk\r\n"
    for content in contents:
        out += f"--{body_boundary}{eol}".encode() + content + eol.encode()
    if spec.game != "no-close":
        out += f"--{body_boundary}--{eol}".encode()
    if spec.game in ("preamble", "epilogue"):
        out += b"epilogue junk\r\n"
    if spec.game == "truncated" and out:
        out = out[: spec.truncate_at % len(out)]
    built.body = bytes(out)

    quoted = spec.game == "quoted" or any(c in TSPECIALS for c in boundary)
    header_boundary = f'"{boundary}"' if quoted else boundary
    if spec.game == "too-long":
        header_boundary = boundary + "b" * 71
    related = f'multipart/related; type="{DICOM}"'
    built.content_type = {
        "ok": f"{related}; boundary={header_boundary}",
        "missing": None,
        "mixed": f"multipart/mixed; boundary={header_boundary}",
        "json-type": f'multipart/related; type="application/dicom+json"; boundary={header_boundary}',
        "random": spec.random_header,
    }[spec.header]
    if spec.header == "ok" and spec.game == "missing":
        built.content_type = related
    # Only these are bodies whose parts the server must judge one by one.
    # (A preamble is legal MIME, but the parser refuses it: 400 with the reason.)
    body_games_fine = spec.game in ("none", "quoted", "epilogue")
    # A header line without a colon breaks the multipart syntax itself.
    garbled = any(p.kind == "garbled-header" for p in spec.parts)
    built.well_formed = spec.header == "ok" and body_games_fine and bool(spec.parts) and not garbled
    return built


# -- the running service -----------------------------------------------------------


@dataclass(repr=False)
class Stow:
    service: ServiceProcess
    index: IndexReader
    session: requests.Session
    stored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def url(self) -> str:
        return f"{self.service.base_url}/dicom-web/studies"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    env = {
        "PACS_AUTH_ANONYMOUS_ROLE": "administrator",
        "PACS_DICOMWEB_MAX_STOW_REQUEST_BYTES": str(MAX_BODY_BYTES),
    }
    with running_system(tmp_path_factory.mktemp("pacs-fuzz-stow"), extra_env=env) as system:
        yield system


@pytest.fixture(scope="module")
def stow(pacs: LocalSystem) -> Iterator[Stow]:
    (service,) = pacs.dicomweb_services
    with requests.Session() as session:
        state = Stow(service, IndexReader(pacs.database_url), session)
        yield state
    print(f"\nSTOW-RS fuzz: {sum(state.statuses.values())} requests, statuses {dict(state.statuses)}")


def _reason_of(response: requests.Response) -> str:
    try:
        document: Any = response.json()
    except ValueError:
        return response.text
    return str(document.get("detail", "")) if isinstance(document, dict) else ""


def _sequence_uids(document: dict[str, Any], tag: str) -> list[str]:
    items = document.get(tag, {}).get("Value", [])
    return [str(i.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value", [""])[0]) for i in items]


def _check(stow: Stow, built: Built, response: requests.Response) -> None:
    status = response.status_code
    stow.statuses[status] += 1
    assert status in ANSWERS, f"{status}: {response.text[:500]}"
    if built.well_formed:
        assert status in (200, 202, 409), f"a well-formed body refused whole: {status} {response.text[:300]}"
    if status >= 400 and status != 409:
        assert _reason_of(response).strip(), f"{status} without a reason"
        stow.refused += built.good_uids + built.bad_uids
        return
    document = response.json()
    referenced = _sequence_uids(document, REFERENCED_SOP_SEQUENCE)
    failures = document.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    for failure in failures:
        assert failure.get(FAILURE_REASON, {}).get("Value"), f"a failure without a reason: {failure}"
    assert not set(referenced) & set(built.bad_uids), "a bad part was reported stored"
    assert set(referenced) <= set(built.good_uids), "stored something that was not sent as a good part"
    if status == 202:
        assert "Warning" in response.headers
    if built.well_formed:
        assert set(referenced) == set(built.good_uids), "a good part of a well-formed body was not stored"
        assert len(failures) == built.bad_parts, "not every bad part is listed as failed"
        expected = 200 if not failures else 202 if referenced else 409
        assert status == expected
    stow.stored += referenced
    stow.refused += [u for u in built.good_uids + built.bad_uids if u not in referenced]


def _post(stow: Stow, built: Built) -> requests.Response:
    headers = {"Accept": "application/dicom+json"}
    if built.content_type is not None:
        headers["Content-Type"] = built.content_type
    return stow.session.post(stow.url, data=built.body, headers=headers, timeout=60)


# -- the properties ------------------------------------------------------------------


@given(spec=bodies)
@example(
    spec=BodySpec([PartSpec("good"), PartSpec("wrong-type", content_type="text/plain")], "b1", "none", "ok")
)
@example(spec=BodySpec([PartSpec("good"), PartSpec("truncated", cut=5)], "b2", "no-close", "ok"))
@example(spec=BodySpec([PartSpec("garbled-header", junk=b"\xff\xfe")], "b3", "none", "ok"))
@example(
    spec=BodySpec([PartSpec("good")], "b4", "none", "random", random_header="multipart/related; boundary=")
)
def test_stow_answers_every_body_with_a_reason(stow: Stow, spec: BodySpec) -> None:
    built = build(spec)
    response = _post(stow, built)
    _check(stow, built, response)


@settings(max_examples=10)  # a small input space: a few cases cover it
@given(
    declared=st.integers(min_value=MAX_BODY_BYTES + 1, max_value=2**63 - 1)
    | st.sampled_from(["-1", "abc", "1e9"])
)
def test_stow_refuses_huge_or_bogus_declared_lengths(stow: Stow, declared: int | str) -> None:
    _, data = instance_bytes()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    host, port = stow.service.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", "/dicom-web/studies")
        connection.putheader("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        connection.putheader("Content-Length", str(declared))
        connection.endheaders()
        connection.send(body)
        response = connection.getresponse()
        status = response.status
        text = response.read().decode(errors="replace")
    finally:
        connection.close()
    stow.statuses[status] += 1
    assert 400 <= status < 500, f"{status}: {text[:300]}"
    assert text.strip(), "refused without a reason"


def test_stow_stored_good_parts_only_and_serves_on(stow: Stow, pacs: LocalSystem) -> None:
    """Run last: what was reported stored is indexed, nothing else is, and
    the same process (never restarted) still stores a good instance."""
    uid, data = instance_bytes()
    good = Built(None, b"", good_uids=[uid])
    boundary = "final"
    good.body = (
        f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
    )
    good.content_type = f'multipart/related; type="{DICOM}"; boundary={boundary}'
    response = _post(stow, good)
    assert response.status_code == 200, response.text
    stow.stored.append(uid)

    stow.index.wait_for_instances(stow.stored, timeout=60)
    time.sleep(0.5)  # anything wrongly queued would be indexed by now too
    assert stow.index.count_instances(stow.refused) == 0, "a refused part was indexed"
    assert stow.service.alive()
    assert "restarted by the runner" not in stow.service.log_path.read_text(errors="replace")
