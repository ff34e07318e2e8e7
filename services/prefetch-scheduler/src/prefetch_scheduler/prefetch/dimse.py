"""C-FIND and C-MOVE against a remote PACS (pynetdicom, blocking: callers
run these in a thread).

Each operation opens its own association and closes it, so a remote that
restarts between two operations costs nothing, and the per-remote
association limit (:mod:`.throttle`) counts exactly what is open.  Failures
come back as :class:`RemoteError` with a message an operator can act on
("association refused by ORTHANC at 127.0.0.1:4242: connection refused").
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any, Final

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_common.resilience import CircuitOpenError, Dependencies, remote_ae_dependency
from prefetch_scheduler.prefetch.models import RemoteStudy

__all__ = [
    "AssociationFailedError",
    "DimseTimeouts",
    "MoveResult",
    "OperationFailedError",
    "Peer",
    "RemoteError",
    "RemotePacs",
    "StudyQuery",
]

logger = logging.getLogger(__name__)

# Statuses (PS3.4 C.4.1.1.4, C.4.2.1.5).
SUCCESS: Final = 0x0000
PENDING: Final = frozenset({0xFF00, 0xFF01})
CANCELLED: Final = 0xFE00
SOME_SUBOPERATIONS_FAILED: Final = 0xB000
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
OUT_OF_RESOURCES_MATCHES: Final = 0xA701
OUT_OF_RESOURCES_SUBOPERATIONS: Final = 0xA702
_STATUS_MEANINGS: Final = {
    MOVE_DESTINATION_UNKNOWN: "move destination unknown",
    OUT_OF_RESOURCES_MATCHES: "out of resources: unable to calculate number of matches",
    OUT_OF_RESOURCES_SUBOPERATIONS: "out of resources: unable to perform sub-operations",
    CANCELLED: "cancelled",
}


class RemoteError(Exception):
    """The remote PACS could not do what was asked (the message says why)."""


class AssociationFailedError(RemoteError):
    """No association: refused, rejected, aborted, timed out."""


class OperationFailedError(RemoteError):
    """The association came up, the operation failed."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    def __str__(self) -> str:
        return f"{self.ae_title} at {self.host}:{self.port}"


@dataclass(frozen=True)
class DimseTimeouts:
    connect: float = 10.0
    find: float = 30.0
    move: float = 600.0


@dataclass(frozen=True)
class StudyQuery:
    patient_id: str
    # Studies on or after this date (None: any date).
    earliest: date | None = None


@dataclass(frozen=True)
class MoveResult:
    completed: int
    failed: int
    warning: int


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _study(identifier: Dataset, source: str) -> RemoteStudy | None:
    uid = _text(identifier.get("StudyInstanceUID"))
    if uid is None:
        return None
    modalities_value = identifier.get("ModalitiesInStudy")
    if modalities_value is None or modalities_value == "":
        modalities: tuple[str, ...] = ()
    elif isinstance(modalities_value, str):
        modalities = tuple(m for m in modalities_value.split("\\") if m)
    else:
        modalities = tuple(str(m) for m in modalities_value if str(m))
    count_value = identifier.get("NumberOfStudyRelatedInstances")
    try:
        count = int(count_value) if count_value not in (None, "") else None
    except (TypeError, ValueError):
        count = None
    return RemoteStudy(
        study_instance_uid=uid,
        source=source,
        study_date=_text(identifier.get("StudyDate")),
        study_time=_text(identifier.get("StudyTime")),
        modalities=modalities,
        description=_text(identifier.get("StudyDescription")),
        body_part=_text(identifier.get("BodyPartExamined")),
        accession_number=_text(identifier.get("AccessionNumber")),
        instances=count,
    )


def _probe(host: str, port: int, timeout: float) -> str:
    """Why no association came up, as far as TCP can tell."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return "connection timed out"
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the association was aborted or timed out"


def _comment(status: Dataset) -> str:
    comment = _text(status.get("ErrorComment"))
    return f" ({comment})" if comment else ""


class RemotePacs:
    """A Study Root Query/Retrieve SCU speaking as ``calling_ae_title``."""

    def __init__(
        self, calling_ae_title: str, timeouts: DimseTimeouts, *, breakers: Dependencies | None = None
    ) -> None:
        self._calling = calling_ae_title
        self._timeouts = timeouts
        # One circuit breaker per remote AE: a peer that keeps refusing is
        # not dialled (and waited for) by every job until it recovers.
        self._breakers = breakers or Dependencies()

    def _associate(self, peer: Peer, context: str, dimse_timeout: float) -> Association:
        breaker = self._breakers.breaker(remote_ae_dependency(peer.ae_title, peer.host, peer.port))
        try:
            with breaker.attempt(AssociationFailedError):
                return self._request_association(peer, context, dimse_timeout)
        except CircuitOpenError as exc:
            raise AssociationFailedError(f"not associating with {peer}: {exc}") from exc

    def _request_association(self, peer: Peer, context: str, dimse_timeout: float) -> Association:
        ae = AE(ae_title=self._calling)
        ae.connection_timeout = self._timeouts.connect
        ae.acse_timeout = self._timeouts.connect
        ae.dimse_timeout = dimse_timeout
        ae.network_timeout = max(dimse_timeout, self._timeouts.connect)
        ae.add_requested_context(context)
        tls_args = (peer.ssl_context, peer.host) if peer.ssl_context is not None else None
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
            raise AssociationFailedError(f"association rejected by {peer}: {reason or 'no reason given'}")
        why = _probe(peer.host, peer.port, self._timeouts.connect)
        raise AssociationFailedError(f"association refused by {peer}: {why}")

    def find_studies(self, peer: Peer, query: StudyQuery) -> list[RemoteStudy]:
        """C-FIND at STUDY level: the patient's studies, with the attributes
        the selection rules look at."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientID = query.patient_id
        identifier.StudyInstanceUID = ""
        identifier.StudyDate = f"{query.earliest:%Y%m%d}-" if query.earliest is not None else ""
        identifier.StudyTime = ""
        identifier.AccessionNumber = ""
        identifier.ModalitiesInStudy = ""
        identifier.StudyDescription = ""
        identifier.BodyPartExamined = ""
        identifier.NumberOfStudyRelatedInstances = ""
        context = StudyRootQueryRetrieveInformationModelFind
        assoc = self._associate(peer, context, self._timeouts.find)
        studies: list[RemoteStudy] = []
        try:
            for status, response in checked_responses(assoc.send_c_find(identifier, context), peer, "C-FIND"):
                code = int(status.Status)
                if code in PENDING:
                    study = _study(response, peer.ae_title) if response is not None else None
                    if study is not None:
                        studies.append(study)
                elif code != SUCCESS:
                    meaning = _STATUS_MEANINGS.get(code, "failed")
                    raise OperationFailedError(
                        f"C-FIND at {peer}: status 0x{code:04X} ({meaning}){_comment(status)}"
                    )
        finally:
            assoc.release()
        return studies

    def send_move(self, peer: Peer, identifier: Dataset, destination: str) -> tuple[Dataset, MoveResult]:
        """One Study Root C-MOVE: its final response and the sub-operation
        counts (no association, or no final response, raises)."""
        context = StudyRootQueryRetrieveInformationModelMove
        assoc = self._associate(peer, context, self._timeouts.move)
        try:
            final: Dataset | None = None
            for status, _ in checked_responses(
                assoc.send_c_move(identifier, destination, context), peer, "C-MOVE"
            ):
                if int(status.Status) not in PENDING:
                    final = status
        finally:
            assoc.release()
        if final is None:
            raise OperationFailedError(f"C-MOVE at {peer}: no final response")
        result = MoveResult(
            completed=int(final.get("NumberOfCompletedSuboperations", 0) or 0),
            failed=int(final.get("NumberOfFailedSuboperations", 0) or 0),
            warning=int(final.get("NumberOfWarningSuboperations", 0) or 0),
        )
        return final, result

    def move_study(self, peer: Peer, study_instance_uid: str, destination: str) -> MoveResult:
        """C-MOVE one study to ``destination``; raises :class:`RemoteError`
        unless every sub-operation succeeded (warnings count as success)."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_instance_uid
        final, result = self.send_move(peer, identifier, destination)
        code = int(final.Status)
        if code == SUCCESS or (code == SOME_SUBOPERATIONS_FAILED and result.failed == 0):
            return result
        if code == SOME_SUBOPERATIONS_FAILED:
            raise OperationFailedError(
                f"C-MOVE at {peer} to {destination}: {result.failed} of "
                f"{result.failed + result.completed + result.warning} instances failed{_comment(final)}"
            )
        meaning = _STATUS_MEANINGS.get(code, "failed")
        if code == MOVE_DESTINATION_UNKNOWN:
            meaning = f"{peer.ae_title} does not know the move destination {destination}"
        raise OperationFailedError(f"C-MOVE at {peer}: status 0x{code:04X} ({meaning}){_comment(final)}")


def checked_responses(
    responses: Iterator[tuple[Dataset, Dataset | None]], peer: Peer, operation: str
) -> Iterator[tuple[Dataset, Dataset | None]]:
    """The responses; an empty status (pynetdicom's way of saying the DIMSE
    timeout passed or the association was aborted) raises."""
    for status, identifier in responses:
        if "Status" not in status:
            raise OperationFailedError(f"{operation} at {peer}: no response (timed out or aborted)")
        yield status, identifier
