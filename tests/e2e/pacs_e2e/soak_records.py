"""What the soak records: every client operation with its verdict, and the
instances the PACS acknowledged (the ones that must not be lost).

A verdict says whether an outcome is acceptable while dependencies restart:
success; a *retryable* failure (the sender is told to try again: C-STORE
0xA7xx/0xC0xx, an association refused or aborted, HTTP 502/503/504, a refused
connection); "not yet" (a read of an instance acknowledged but not yet
indexed); anything else is a *violation*.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pacs_e2e.corpus import dataset_bytes

C_STORE = "C-STORE"
C_FIND = "C-FIND"
C_MOVE = "C-MOVE"
STOW_RS = "STOW-RS"
QIDO_RS = "QIDO-RS"
WADO_RS = "WADO-RS"
OPERATION_KINDS: tuple[str, ...] = (C_STORE, C_FIND, C_MOVE, STOW_RS, QIDO_RS, WADO_RS)

RETRYABLE_HTTP = frozenset({502, 503, 504})
SUCCESS = 0x0000
# C-MOVE: sub-operations complete, one or more failed (a destination or the
# archive was briefly unavailable): the requester repeats the move.
MOVE_SUBOPERATIONS_FAILED = 0xB000


class Verdict(StrEnum):
    OK = "ok"
    RETRYABLE = "retryable"
    NOT_YET = "not-yet-indexed"
    VIOLATION = "violation"


def dimse_verdict(kind: str, status: int) -> Verdict:
    """The verdict on the final status of a DIMSE operation."""
    if status == SUCCESS:
        return Verdict.OK
    # 0xA7xx out of resources, 0xCxxx unable to process: "try again later".
    if (status & 0xFF00) == 0xA700 or (status & 0xF000) == 0xC000:
        return Verdict.RETRYABLE
    if kind == C_MOVE and status == MOVE_SUBOPERATIONS_FAILED:
        return Verdict.RETRYABLE
    return Verdict.VIOLATION


def http_verdict(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.OK
    if status in RETRYABLE_HTTP:
        return Verdict.RETRYABLE
    return Verdict.VIOLATION


def part10_dataset(data: bytes) -> bytes:
    """The encoded dataset of a Part 10 object, without preamble and file meta."""
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 object")
    # (0002,0000) UL, explicit VR: tag (4) + "UL" (2) + length (2) + value (4)
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


@dataclass(frozen=True)
class SentInstance:
    """One generated instance, as a client sent it."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    dataset_sha256: str

    @classmethod
    def of(cls, path: Path, study: str, series: str, sop: str) -> SentInstance:
        digest = hashlib.sha256(dataset_bytes(path)).hexdigest()
        return cls(sop, study, series, path, digest)


@dataclass(frozen=True)
class Operation:
    kind: str
    verdict: Verdict
    detail: str
    seconds: float
    at: float  # time.monotonic() at the end of the operation


@dataclass
class Ledger:
    """Thread-safe record of the soak's client side."""

    operations: list[Operation] = field(default_factory=list)
    acknowledged: dict[str, SentInstance] = field(default_factory=dict)
    acknowledged_via: dict[str, str] = field(default_factory=dict)
    failed_attempts: Counter[str] = field(default_factory=Counter)
    given_up: dict[str, SentInstance] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: str, verdict: Verdict, detail: str, seconds: float) -> None:
        with self._lock:
            self.operations.append(Operation(kind, verdict, detail, seconds, time.monotonic()))

    def acknowledge(self, instance: SentInstance, via: str) -> None:
        with self._lock:
            self.acknowledged[instance.sop_instance_uid] = instance
            self.acknowledged_via[instance.sop_instance_uid] = via
            self.given_up.pop(instance.sop_instance_uid, None)

    def attempt_failed(self, instance: SentInstance) -> None:
        with self._lock:
            self.failed_attempts[instance.sop_instance_uid] += 1

    def give_up(self, instance: SentInstance) -> None:
        with self._lock:
            if instance.sop_instance_uid not in self.acknowledged:
                self.given_up[instance.sop_instance_uid] = instance

    def snapshot(self) -> list[Operation]:
        with self._lock:
            return list(self.operations)

    def acknowledged_instances(self) -> dict[str, SentInstance]:
        with self._lock:
            return dict(self.acknowledged)

    def counts(self) -> Counter[tuple[str, Verdict]]:
        return Counter((op.kind, op.verdict) for op in self.snapshot())

    def failures(self) -> Counter[tuple[str, Verdict, str]]:
        return Counter((op.kind, op.verdict, op.detail) for op in self.snapshot() if op.verdict != Verdict.OK)
