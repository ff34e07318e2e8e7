"""The soak's clients: threads that each behave like a small modality plus a
viewer — C-STORE (pynetdicom or DCMTK storescu), C-FIND, C-MOVE, STOW-RS,
QIDO-RS, WADO-RS — and retry failed stores later, as a modality would."""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_e2e.corpus import SeriesSpec, dataset_bytes, write_study
from pacs_e2e.dcmtk import DCMTK_ENV, tool
from pacs_e2e.dicomweb import multipart_body, parse_multipart
from pacs_e2e.soak_records import (
    C_FIND,
    C_MOVE,
    C_STORE,
    QIDO_RS,
    STOW_RS,
    WADO_RS,
    Ledger,
    SentInstance,
    Verdict,
    dimse_verdict,
    http_verdict,
    part10_dataset,
)

TIMEOUT_SECONDS = 30.0
# Relative frequency of each operation a client picks.
DEFAULT_WEIGHTS: dict[str, int] = {C_STORE: 4, STOW_RS: 2, C_FIND: 2, C_MOVE: 1, QIDO_RS: 2, WADO_RS: 2}
_RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
_DRAIN_RETRY_DELAYS: tuple[float, ...] = (0.5, 1.0)
_THINK_SECONDS = (0.02, 0.2)
# storescu -v: the verdict in "I: Received Store Response (...)".
_STORESCU_RETRYABLE = ("Refused: OutOfResources", "Error: CannotUnderstand", "not sent")
_DICOM_JSON_VALUE = "Value"
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class Endpoints:
    gateway_port: int
    called_ae_title: str
    move_destination: str
    dicomweb_url: str  # .../dicom-web
    token: str


@dataclass
class _Pending:
    due: float
    instances: list[SentInstance]
    via: str
    attempts: int = 1


@dataclass
class _Study:
    patient_id: str
    study_instance_uid: str
    instances: list[SentInstance] = field(default_factory=list)


class SoakClient:
    """One client thread; ``run`` until ``stop`` is set, then ``drain``."""

    def __init__(  # noqa: PLR0917 - the client's whole context, each distinct
        self,
        number: int,
        endpoints: Endpoints,
        ledger: Ledger,
        workdir: Path,
        rng: random.Random,
        stop: threading.Event,
        weights: dict[str, int] | None = None,
    ) -> None:
        self.number = number
        self.ae_title = f"SOAK{number:02d}"
        self._endpoints = endpoints
        self._ledger = ledger
        self._workdir = workdir
        self._rng = rng
        self._stop = stop
        self._weights = weights or DEFAULT_WEIGHTS
        self._pending: list[_Pending] = []
        self._retry_delays = _RETRY_DELAYS
        self._studies: list[_Study] = []
        self._made = 0
        self._ae = AE(ae_title=self.ae_title)
        self._ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self._ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self._ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        for attribute in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self._ae, attribute, TIMEOUT_SECONDS)
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"Bearer {endpoints.token}"

    @property
    def pending(self) -> int:
        return sum(len(p.instances) for p in self._pending)

    def run(self) -> None:
        operations: dict[str, Callable[[], None]] = {
            C_STORE: self._store_new,
            STOW_RS: self._stow_new,
            C_FIND: self._find,
            C_MOVE: self._move,
            QIDO_RS: self._qido,
            WADO_RS: self._wado,
        }
        kinds = list(self._weights)
        weights = [self._weights[k] for k in kinds]
        while not self._stop.is_set():
            if not self._retry_due():
                operations[self._rng.choices(kinds, weights)[0]]()
            self._stop.wait(self._rng.uniform(*_THINK_SECONDS))

    def drain(self, deadline: float) -> None:
        """Retry every store not yet acknowledged until ``deadline``: every
        dependency is up again, so without the back-off of the load phase."""
        self._retry_delays = _DRAIN_RETRY_DELAYS
        for pending in self._pending:
            pending.due = min(pending.due, time.monotonic())
        while self._pending and time.monotonic() < deadline:
            if not self._retry_due():
                time.sleep(0.2)
        for pending in self._pending:
            for instance in pending.instances:
                self._ledger.give_up(instance)

    def close(self) -> None:
        self._http.close()

    # -- stores ----------------------------------------------------------------

    def _new_study(self) -> _Study:
        self._made += 1
        patient_id = f"SOAK{self.number:02d}-{self._made:05d}"
        files = write_study(
            self._workdir / f"c{self.number:02d}",
            patient_id=patient_id,
            patient_name=f"Soak^Client{self.number:02d}",
            study_date="20261204",
            accession_number=uuid.uuid4().hex[:16],
            series=[SeriesSpec("CT", self._rng.randint(1, 3))],
            size=16,
        )
        study = _Study(patient_id, files.study_instance_uid)
        for series_uid, paths in files.series.items():
            for path in paths:
                sop = _sop_uid(path)
                study.instances.append(SentInstance.of(path, files.study_instance_uid, series_uid, sop))
        return study

    def _store_new(self) -> None:
        study = self._new_study()
        self._deliver(study.instances, C_STORE, attempts=0)
        self._studies.append(study)

    def _stow_new(self) -> None:
        study = self._new_study()
        self._deliver(study.instances, STOW_RS, attempts=0)
        self._studies.append(study)

    def _retry_due(self) -> bool:
        now = time.monotonic()
        for pending in self._pending:
            if pending.due <= now:
                self._pending.remove(pending)
                self._deliver(pending.instances, pending.via, attempts=pending.attempts)
                return True
        return False

    def _deliver(self, instances: list[SentInstance], via: str, *, attempts: int) -> None:
        if via == STOW_RS:
            failed = self._stow(instances)
        elif self._rng.random() < 0.5:
            failed = self._store_pynetdicom(instances)
        else:
            failed = self._store_storescu(instances)
        for instance in instances:
            if instance in failed:
                self._ledger.attempt_failed(instance)
            else:
                self._ledger.acknowledge(instance, via)
        if failed:
            delay = self._retry_delays[min(attempts, len(self._retry_delays) - 1)]
            self._pending.append(_Pending(time.monotonic() + delay, failed, via, attempts + 1))

    def _store_pynetdicom(self, instances: list[SentInstance]) -> list[SentInstance]:
        started = time.monotonic()
        assoc = self._associate()
        if isinstance(assoc, str):
            for _ in instances:
                self._ledger.record(C_STORE, Verdict.RETRYABLE, assoc, time.monotonic() - started)
            return list(instances)
        failed: list[SentInstance] = []
        try:
            for instance in instances:
                began = time.monotonic()
                try:
                    status = assoc.send_c_store(instance.path)
                except RuntimeError:  # the association went away
                    status = Dataset()
                if "Status" not in status:
                    verdict, detail = Verdict.RETRYABLE, "association aborted"
                else:
                    code = int(status.Status)
                    verdict, detail = dimse_verdict(C_STORE, code), f"0x{code:04X}"
                self._ledger.record(C_STORE, verdict, detail, time.monotonic() - began)
                if verdict != Verdict.OK:
                    failed.append(instance)
        finally:
            _release(assoc)
        return failed

    def _store_storescu(self, instances: list[SentInstance]) -> list[SentInstance]:
        started = time.monotonic()
        timeouts = ["-to", "30", "-ta", "30", "-td", "30"]
        args = [tool("storescu"), "-nh", "-v", "-aet", self.ae_title, "-aec", self._endpoints.called_ae_title]
        args += [*timeouts, "127.0.0.1", str(self._endpoints.gateway_port), *(str(i.path) for i in instances)]
        try:
            done = subprocess.run(
                args, env=DCMTK_ENV, capture_output=True, text=True, timeout=120, check=False
            )
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            output = ""
        outcomes = _storescu_outcomes(output)
        seconds = (time.monotonic() - started) / max(1, len(instances))
        failed: list[SentInstance] = []
        for instance in instances:
            outcome = outcomes.get(str(instance.path))
            if outcome == "Success":
                verdict, detail = Verdict.OK, "Success"
            elif outcome is None:
                rejected = "Association Rejected" in output
                verdict, detail = Verdict.RETRYABLE, "association rejected" if rejected else "no association"
            elif outcome.startswith(_STORESCU_RETRYABLE):
                verdict, detail = Verdict.RETRYABLE, f"storescu: {outcome}"
            else:
                verdict, detail = Verdict.VIOLATION, f"storescu: {outcome}"
            self._ledger.record(C_STORE, verdict, detail, seconds)
            if verdict != Verdict.OK:
                failed.append(instance)
        return failed

    def _stow(self, instances: list[SentInstance]) -> list[SentInstance]:
        started = time.monotonic()
        boundary = uuid.uuid4().hex
        body = multipart_body([("application/dicom", i.path.read_bytes()) for i in instances], boundary)
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            response = self._http.post(
                f"{self._endpoints.dicomweb_url}/studies",
                data=body,
                headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
                timeout=TIMEOUT_SECONDS,
            )
        except requests.RequestException as exc:
            return self._all_failed(STOW_RS, instances, Verdict.RETRYABLE, _request_error(exc), started)
        seconds = (time.monotonic() - started) / max(1, len(instances))
        if response.status_code not in (200, 202, 409):
            verdict = http_verdict(response.status_code)
            return self._all_failed(STOW_RS, instances, verdict, f"HTTP {response.status_code}", started)
        stored, reasons = _stow_outcome(response)
        failed: list[SentInstance] = []
        for instance in instances:
            uid = instance.sop_instance_uid
            if uid in stored:
                self._ledger.record(STOW_RS, Verdict.OK, f"HTTP {response.status_code}", seconds)
                continue
            reason = reasons.get(uid)
            if reason is None:
                verdict, detail = Verdict.VIOLATION, f"HTTP {response.status_code}, instance not in response"
            else:
                verdict = dimse_verdict(STOW_RS, reason)
                detail = f"HTTP {response.status_code} FailureReason 0x{reason:04X}"
            self._ledger.record(STOW_RS, verdict, detail, seconds)
            failed.append(instance)
        return failed

    def _all_failed(
        self, kind: str, instances: list[SentInstance], verdict: Verdict, detail: str, started: float
    ) -> list[SentInstance]:
        seconds = (time.monotonic() - started) / max(1, len(instances))
        for _ in instances:
            self._ledger.record(kind, verdict, detail, seconds)
        return list(instances)

    # -- reads -------------------------------------------------------------------

    def _acknowledged_study(self) -> _Study | None:
        acknowledged = self._ledger.acknowledged_instances()
        done = [s for s in self._studies if all(i.sop_instance_uid in acknowledged for i in s.instances)]
        return self._rng.choice(done) if done else None

    def _find(self) -> None:
        study = self._acknowledged_study()
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = study.patient_id if study else f"SOAK{self.number:02d}-*"
        query.StudyInstanceUID = ""
        query.NumberOfStudyRelatedInstances = ""
        self._dimse_query(
            C_FIND, lambda assoc: assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        )

    def _move(self) -> None:
        study = self._acknowledged_study()
        if study is None:
            return
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study.study_instance_uid
        destination = self._endpoints.move_destination
        self._dimse_query(
            C_MOVE,
            lambda assoc: assoc.send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove),
        )

    def _dimse_query(self, kind: str, send: Callable[[Association], object]) -> None:
        started = time.monotonic()
        assoc = self._associate()
        if isinstance(assoc, str):
            self._ledger.record(kind, Verdict.RETRYABLE, assoc, time.monotonic() - started)
            return
        final: int | None = None
        try:
            responses = send(assoc)
            for status, _identifier in responses:  # type: ignore[attr-defined]
                if "Status" in status:
                    code = int(status.Status)
                    if code not in (0xFF00, 0xFF01):
                        final = code
                else:
                    final = None
        except RuntimeError:
            final = None
        finally:
            _release(assoc)
        if final is None:
            self._ledger.record(kind, Verdict.RETRYABLE, "association aborted", time.monotonic() - started)
        else:
            self._ledger.record(
                kind, dimse_verdict(kind, final), f"0x{final:04X}", time.monotonic() - started
            )

    def _qido(self) -> None:
        study = self._acknowledged_study()
        patient = study.patient_id if study else f"SOAK{self.number:02d}-*"
        self._get(QIDO_RS, "/studies", {"PatientID": patient}, "application/dicom+json")

    def _wado(self) -> None:
        study = self._acknowledged_study()
        if study is None:
            return
        instance = self._rng.choice(study.instances)
        path = (
            f"/studies/{instance.study_instance_uid}/series/{instance.series_instance_uid}"
            f"/instances/{instance.sop_instance_uid}"
        )
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        response = self._get(WADO_RS, path, {}, accept, record=False)
        if response is None:
            return
        started = time.monotonic()
        try:
            (part,) = parse_multipart(response.headers.get("content-type", ""), response.content)
            same = part10_dataset(part.body) == dataset_bytes(instance.path)
        except ValueError as exc:
            self._ledger.record(WADO_RS, Verdict.VIOLATION, f"unreadable response: {exc}", 0.0)
            return
        verdict = Verdict.OK if same else Verdict.VIOLATION
        detail = "HTTP 200" if same else "HTTP 200, dataset differs from the one sent"
        self._ledger.record(WADO_RS, verdict, detail, time.monotonic() - started)

    def _get(
        self, kind: str, path: str, params: dict[str, str], accept: str, *, record: bool = True
    ) -> requests.Response | None:
        started = time.monotonic()
        try:
            response = self._http.get(
                f"{self._endpoints.dicomweb_url}{path}",
                params=params,
                headers={"Accept": accept},
                timeout=TIMEOUT_SECONDS,
            )
        except requests.RequestException as exc:
            self._ledger.record(kind, Verdict.RETRYABLE, _request_error(exc), time.monotonic() - started)
            return None
        seconds = time.monotonic() - started
        status = response.status_code
        if kind == WADO_RS and status == 404:
            self._ledger.record(kind, Verdict.NOT_YET, "HTTP 404", seconds)
            return None
        verdict = http_verdict(status)
        if verdict != Verdict.OK or record:
            self._ledger.record(kind, verdict, f"HTTP {status}", seconds)
        return response if verdict == Verdict.OK else None

    def _associate(self) -> Association | str:
        """An established association, or why there is none (retryable)."""
        try:
            assoc = self._ae.associate(
                "127.0.0.1", self._endpoints.gateway_port, ae_title=self._endpoints.called_ae_title
            )
        except (OSError, RuntimeError) as exc:
            return f"no association: {type(exc).__name__}"
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            return "association rejected"
        if assoc.is_aborted:
            return "association aborted"
        return "no association"


def _release(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except (OSError, RuntimeError):
        assoc.abort()


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _request_error(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "response cut off mid-body"
    if isinstance(exc, requests.ConnectionError):
        return "connection refused/reset"
    if isinstance(exc, requests.Timeout):
        return "timeout"
    return type(exc).__name__


def _storescu_outcomes(output: str) -> dict[str, str]:
    """File → storescu's verdict, from its -v output (see pacs_e2e.dcmtk.store_outcomes)."""
    outcomes: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
            outcomes[current] = "not sent"
        elif line.startswith("I: Received Store Response") and current is not None:
            outcomes[current] = line.partition("(")[2].rstrip(")") or line
            current = None
    return outcomes


def _stow_outcome(response: requests.Response) -> tuple[set[str], dict[str, int]]:
    """The SOP Instance UIDs stored, and the failure reason of each one not stored."""
    try:
        body = response.json()
    except ValueError:
        return set(), {}
    stored: set[str] = set()
    reasons: dict[str, int] = {}
    for item in _sequence(body, _REFERENCED_SOP_SEQUENCE):
        stored.update(_values(item, _REFERENCED_SOP_INSTANCE_UID))
    for item in _sequence(body, _FAILED_SOP_SEQUENCE):
        for uid in _values(item, _REFERENCED_SOP_INSTANCE_UID):
            reason = _values(item, _FAILURE_REASON)
            reasons[uid] = int(reason[0]) if reason else 0xFFFF
    return stored, reasons


def _sequence(body: object, tag: str) -> Sequence[dict[str, object]]:
    if not isinstance(body, dict):
        return []
    element = body.get(tag)
    items = element.get(_DICOM_JSON_VALUE, []) if isinstance(element, dict) else []
    return [i for i in items if isinstance(i, dict)]


def _values(item: dict[str, object], tag: str) -> list[str]:
    element = item.get(tag)
    values = element.get(_DICOM_JSON_VALUE, []) if isinstance(element, dict) else []
    return [str(v) for v in values]
