"""Fuzzing the DICOM Upper Layer stream of the real gateway process.

One gateway process for the module (``python -m dimse_gateway`` through the
local runner, on a database and broker namespace of its own, no other
service).  Raw TCP sockets send it: random bytes, PDUs of every type with
random bodies and length fields up to 4 GiB, mutated copies of a valid
A-ASSOCIATE-RQ (built with pynetdicom's PDU classes), PDUs in the wrong state
(P-DATA-TF or A-RELEASE-RQ before any association, A-ASSOCIATE-RQ twice) and
garbage after an accepted association.

Every case: the connection ends with A-ASSOCIATE-RJ, A-ABORT or a close (a
mutation that is still a valid request may be accepted: the fuzzer then
aborts it itself), never a hang; after every batch a well-behaved C-ECHO
succeeds; the gateway's RSS is sampled before and after (printed, not
asserted tightly); nothing is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.system import running_system

pytestmark = [pytest.mark.fuzz]

GATEWAY_AE = "PACS"
# How long one case may take to be answered or closed (the gateway's ARTIM is 2 s here).
CASE_TIMEOUT_SECONDS = 6.0
# A gateway that says nothing for this long waits for more bytes (a PDU longer than what was sent).
SILENCE_SECONDS = 0.5

A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_AC_TYPE = 0x02
A_ASSOCIATE_RJ_TYPE = 0x03
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_ABORT_TYPE = 0x07
ENDED = frozenset({"rejected", "aborted", "closed"})
# Each case is a connection to a real process (two threads there): a quarter
# of the profile's examples per test ("ci": 15, "long": 1250) keeps make test
# within its budget and still scales with make fuzz.
_PROFILE = settings.default
BATCH = settings(max_examples=max((_PROFILE.max_examples if _PROFILE else 60) // 4, 5))


# -- the gateway --------------------------------------------------------------------------------


@dataclass
class FuzzTarget:
    system: LocalSystem
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def port(self) -> int:
        return self.system.gateway_port

    @property
    def pid(self) -> int:
        pid = self.system.gateways[0].pid
        assert pid is not None
        return pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.system.gateways[0].alive()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    base = tmp_path_factory.mktemp("fuzz-pdu")
    # The gateway alone: nothing may reach a worker or an index anyway.
    with running_system(
        base,
        workers=0,
        query_services=0,
        dicomweb_services=0,
        extra_env={
            "PACS_GATEWAY_ACSE_TIMEOUT_SECONDS": "2",
            "PACS_GATEWAY_NETWORK_TIMEOUT_SECONDS": "2",
            # Stalled cases hold their connection until the 2 s timeout; the
            # well-formed checks between batches must not meet the limit.
            "PACS_GATEWAY_MAX_ASSOCIATIONS": "500",
        },
    ) as system:
        yield from _fuzzed(system, base)


def _fuzzed(system: LocalSystem, base: Path) -> Iterator[FuzzTarget]:
    fuzz = FuzzTarget(system)
    rss_before = fuzz.rss_kib()
    yield fuzz
    assert fuzz.alive(), "the gateway process died"
    rss_after = fuzz.rss_kib()
    stored = [p for p in (base / "data" / "hot").rglob("*") if p.is_file()]
    print(
        f"\nPDU fuzz: {sum(fuzz.outcomes.values())} cases {dict(fuzz.outcomes)}; "
        f"gateway RSS {rss_before} KiB before, {rss_after} KiB after"
    )
    assert stored == [], f"fuzzing stored objects: {stored[:5]}"
    assert _instances(system.database_url) == 0
    # Bounded: no per-case leak (a generous bound; the figure is printed above).
    assert rss_after < rss_before + 200 * 1024


def _instances(database_url: str) -> int:
    async def count() -> int:
        connection = await asyncpg.connect(database_url)
        try:
            return int(await connection.fetchval("SELECT count(*) FROM instance"))
        finally:
            await connection.close()

    return asyncio.run(count())


# -- the wire -------------------------------------------------------------------------------------


def valid_associate_rq(calling: str = "FUZZER", called: str = GATEWAY_AE) -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing Verification."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 104)
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


VALID_RQ = valid_associate_rq()
A_ABORT_PDU = bytes([A_ABORT_TYPE, 0]) + struct.pack(">I", 4) + bytes(4)


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return bytes([pdu_type, 0]) + struct.pack(">I", len(body) if length is None else length) + body


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_pdu_type(sock: socket.socket, timeout: float) -> str:
    """What the gateway answered: the PDU type it sent, "closed", or "silent"."""
    sock.settimeout(timeout)
    try:
        header = sock.recv(6)
    except TimeoutError:
        return "silent"
    except ConnectionResetError:
        return "closed"
    if not header:
        return "closed"
    return {
        A_ASSOCIATE_AC_TYPE: "accepted",
        A_ASSOCIATE_RJ_TYPE: "rejected",
        A_ABORT_TYPE: "aborted",
    }.get(header[0], f"pdu-0x{header[0]:02x}")


def _drain_until_closed(sock: socket.socket, timeout: float) -> bool:
    """True when the gateway closed the connection within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def send_case(target: FuzzTarget, payload: bytes, *, half_close: bool) -> str:
    """Send ``payload`` on a new connection; the connection's fate.

    ``half_close``: the fuzzer then stops sending (as a peer that went away
    mid-PDU would); otherwise the gateway must decide on what it got."""
    with contextlib.closing(_connect(target.port)) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            outcome = "closed"
        else:
            outcome = _read_pdu_type(sock, CASE_TIMEOUT_SECONDS if half_close else SILENCE_SECONDS)
        if outcome == "accepted":
            # Still a valid request: accepted is right; end it as a peer would.
            with contextlib.suppress(OSError):
                sock.sendall(A_ABORT_PDU)
            outcome = "accepted+aborted"
        elif outcome == "silent" and not half_close:
            # Waiting for the rest of a PDU longer than what was sent: go away.
            sock.shutdown(socket.SHUT_WR)
            outcome = _read_pdu_type(sock, CASE_TIMEOUT_SECONDS)
        # After an A-ASSOCIATE-RJ or A-ABORT the requestor closes (PS3.8 Sta13).
    target.outcomes[outcome] += 1
    return outcome


def assert_still_serving(target: FuzzTarget) -> None:
    ae = AE(ae_title="GOODCLIENT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", target.port, ae_title=GATEWAY_AE)
    assert assoc.is_established, "the gateway stopped accepting associations"
    try:
        assert int(assoc.send_c_echo().Status) == 0x0000
    finally:
        assoc.release()


@pytest.fixture
def serving(target: FuzzTarget) -> Iterator[FuzzTarget]:
    """The target; a good C-ECHO must succeed after the test's batch."""
    yield target
    assert target.alive(), "the gateway process died"
    assert_still_serving(target)


# -- strategies ----------------------------------------------------------------------------------

pdu_types = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 6, 7]), st.integers(0, 255))
length_fields = st.one_of(
    st.integers(0, 64),
    st.integers(0, 0xFFFF),
    st.sampled_from([0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0x10000000]),
)


@st.composite
def mutated_associate_rq(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID_RQ)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif at + 2 <= len(data):
            # An item's or the PDU's length field (2 or 4 bytes) set to anything.
            width = 4 if at < 2 else 2
            value = draw(st.integers(0, 0xFFFFFFFF if width == 4 else 0xFFFF))
            data[at : at + width] = value.to_bytes(width, "big")[: len(data) - at]
    return bytes(data)


# -- cases -----------------------------------------------------------------------------------------


@BATCH
@given(payload=st.binary(min_size=1, max_size=4096))
def test_random_bytes_are_refused(serving: FuzzTarget, payload: bytes) -> None:
    assert send_case(serving, payload, half_close=True) in ENDED


@BATCH
@given(pdu_type=pdu_types, length=length_fields, body=st.binary(max_size=512))
def test_pdus_of_any_type_and_length_before_association_are_refused(
    serving: FuzzTarget, pdu_type: int, length: int, body: bytes
) -> None:
    outcome = send_case(serving, pdu(pdu_type, body, length), half_close=True)
    assert outcome in ENDED, f"type 0x{pdu_type:02x} length {length}: {outcome}"


@BATCH
@given(payload=mutated_associate_rq())
def test_mutated_associate_requests_are_refused_or_accepted_cleanly(
    serving: FuzzTarget, payload: bytes
) -> None:
    # Half-closed: a mutation that lengthened a length field ends at the
    # connection's end, not after the timer (test_a_stalled_... covers that).
    outcome = send_case(serving, payload, half_close=True)
    assert outcome in ENDED | {"accepted+aborted"}, outcome


@BATCH
@given(garbage=st.binary(min_size=1, max_size=2048))
def test_garbage_after_an_accepted_association_aborts_it(serving: FuzzTarget, garbage: bytes) -> None:
    with contextlib.closing(_connect(serving.port)) as sock:
        sock.sendall(VALID_RQ)
        assert _read_pdu_type(sock, CASE_TIMEOUT_SECONDS) == "accepted"
        sock.settimeout(CASE_TIMEOUT_SECONDS)
        sock.recv(65536)  # the rest of the A-ASSOCIATE-AC, if any
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        assert _drain_until_closed(sock, CASE_TIMEOUT_SECONDS), "association not ended"
    serving.outcomes["garbage-after-association"] += 1


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(pdu(P_DATA_TF_TYPE, struct.pack(">I", 2) + b"\x01\x03"), id="p-data-before-associate"),
        pytest.param(pdu(A_RELEASE_RQ_TYPE, bytes(4)), id="release-before-associate"),
        pytest.param(pdu(A_ASSOCIATE_AC_TYPE, VALID_RQ[6:]), id="associate-ac-from-requestor"),
        pytest.param(pdu(0x08, bytes(4)), id="unknown-type"),
        pytest.param(pdu(A_ASSOCIATE_RQ_TYPE, VALID_RQ[6:], 0xFFFFFFFF), id="rq-claiming-4-gib"),
    ],
)
def test_pdus_in_the_wrong_state_are_refused(serving: FuzzTarget, payload: bytes) -> None:
    assert send_case(serving, payload, half_close=False) in ENDED


def test_a_pdu_longer_than_the_limit_is_refused_before_it_is_read(serving: FuzzTarget) -> None:
    """A P-DATA-TF claiming 256 MiB, then up to 32 MiB of it: the gateway
    closes at the header instead of reading (and allocating) as the bytes come."""
    with contextlib.closing(_connect(serving.port)) as sock:
        sock.sendall(VALID_RQ)
        assert _read_pdu_type(sock, CASE_TIMEOUT_SECONDS) == "accepted"
        sock.settimeout(CASE_TIMEOUT_SECONDS)
        sock.recv(65536)
        sent = 0
        with contextlib.suppress(OSError):
            sock.sendall(pdu(P_DATA_TF_TYPE, b"", 256 * 1024 * 1024))
            chunk = bytes(64 * 1024)
            while sent < 32 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        # Only the socket buffers took any of it.
        assert sent < 32 * 1024 * 1024, "the gateway kept reading an oversized PDU"
    serving.outcomes["oversized-p-data"] += 1


def test_a_second_associate_request_aborts_the_association(serving: FuzzTarget) -> None:
    with contextlib.closing(_connect(serving.port)) as sock:
        sock.sendall(VALID_RQ)
        assert _read_pdu_type(sock, CASE_TIMEOUT_SECONDS) == "accepted"
        sock.settimeout(CASE_TIMEOUT_SECONDS)
        sock.recv(65536)
        sock.sendall(VALID_RQ)
        answer = _read_pdu_type(sock, CASE_TIMEOUT_SECONDS)
        assert answer in ("aborted", "closed"), answer
    serving.outcomes["associate-twice"] += 1


def test_a_stalled_truncated_pdu_is_closed_by_the_timer(serving: FuzzTarget) -> None:
    """Half an A-ASSOCIATE-RQ and then silence: the read times out (network
    timeout, 2 s here) and the connection is closed, freeing its threads."""
    with contextlib.closing(_connect(serving.port)) as sock:
        sock.sendall(VALID_RQ[: len(VALID_RQ) // 2])
        assert _drain_until_closed(sock, 8.0), "a stalled connection was kept open"
    serving.outcomes["stalled"] += 1
