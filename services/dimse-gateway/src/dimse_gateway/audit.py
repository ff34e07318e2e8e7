"""The gateway's audit trail: DIMSE activity as audit records, queued for the
:class:`~pacs_common.audit.BackgroundAuditWriter` (never waited for in an
association thread, never failing a DICOM operation).

* C-STORE: one "DICOM Instances Transferred" (Create) per association, when
  it is released or aborted, listing the studies received;
* C-FIND: a Query per request (the patient and study it names);
* C-MOVE / C-GET: "DICOM Instances Transferred" (Read) per request, with the
  destination and the studies sent;
* MPPS N-CREATE / N-SET: a Procedure Record; Storage Commitment N-ACTION:
  Instances Accessed (Execute);
* a refused association (A-ASSOCIATE-RJ, with its result / source / reason),
  a request the AE-title policy refused (0x0124), a failed TLS handshake:
  Security Alerts.

The actor is always the calling AE title, from the peer's address.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType

from pacs_common.audit import (
    AuditAction,
    AuditActor,
    AuditEventId,
    AuditObject,
    AuditOutcome,
    AuditRecord,
)

logger = logging.getLogger(__name__)

DIMSE_METHOD: Final = "dimse"
_SUCCESS: Final = 0x0000
_PENDING: Final = (0xFF00, 0xFF01)
_MINOR: Final = (0xB000, 0xB006, 0xB007, 0xFE00)  # warnings, partial failures, cancel


class AuditSink(Protocol):
    """Where records go (:class:`pacs_common.audit.BackgroundAuditWriter`)."""

    def submit(self, record: AuditRecord) -> bool: ...


def outcome_of_status(status: int | None) -> AuditOutcome:
    """A DIMSE status as an EventOutcomeIndicator."""
    if status == _SUCCESS:
        return AuditOutcome.SUCCESS
    if status in _MINOR:
        return AuditOutcome.MINOR_FAILURE
    return AuditOutcome.SERIOUS_FAILURE


def actor_of(assoc: Association) -> AuditActor:
    requestor = assoc.requestor
    return AuditActor(
        name=str(requestor.ae_title).strip() or "unknown", method=DIMSE_METHOD, address=requestor.address
    )


def _studies(uids: Iterable[str]) -> list[AuditObject]:
    return [AuditObject(type="study", id=uid) for uid in dict.fromkeys(uids) if uid]


@dataclass
class _Received:
    """What one association stored so far."""

    studies: dict[str, None] = field(default_factory=dict)
    stored: int = 0
    failed: int = 0


class DimseAudit:
    """Builds the gateway's audit records and hands them to ``sink``."""

    def __init__(self, sink: AuditSink, ae_title: str) -> None:
        self._sink = sink
        self._ae_title = ae_title
        self._received: dict[int, _Received] = {}
        self._lock = threading.Lock()

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
            (evt.EVT_REJECTED, self._on_rejected),
        ]

    def _submit(self, record: AuditRecord) -> None:
        try:
            self._sink.submit(record)
        except Exception:  # the DICOM operation goes on whatever happens here
            logger.exception("audit record not queued")

    # -- C-STORE ---------------------------------------------------------------

    def instance_received(self, assoc: Association, study_uid: str | None, *, stored: bool) -> None:
        """One C-STORE answered; the association's event is written at its end."""
        with self._lock:
            received = self._received.setdefault(id(assoc), _Received())
            if stored:
                received.stored += 1
                if study_uid:
                    received.studies[study_uid] = None
            else:
                received.failed += 1

    def _on_end(self, event: Event) -> None:
        with self._lock:
            received = self._received.pop(id(event.assoc), None)
        if received is None:
            return
        if received.failed == 0:
            outcome = AuditOutcome.SUCCESS
        else:
            outcome = AuditOutcome.MINOR_FAILURE if received.stored else AuditOutcome.SERIOUS_FAILURE
        self._submit(
            AuditRecord(
                event=AuditEventId.INSTANCES_TRANSFERRED,
                action=AuditAction.CREATE,
                outcome=outcome,
                actor=actor_of(event.assoc),
                objects=_studies(received.studies),
                details={
                    "operation": "C-STORE",
                    "called_ae_title": self._ae_title,
                    "stored": received.stored,
                    "failed": received.failed,
                    "association": event.event.name,
                },
            )
        )

    # -- C-FIND ---------------------------------------------------------------

    def query(self, event: Event, sop_class_uid: str, status: int) -> None:
        """One C-FIND answered (final status ``status``)."""
        objects: list[AuditObject] = []
        details: dict[str, Any] = {"operation": "C-FIND", "status": f"0x{status:04X}"}
        query_text: str | None = None
        try:
            identifier: Dataset = event.identifier
            details["level"] = str(identifier.get("QueryRetrieveLevel", ""))
            query_text = identifier.to_json(bulk_data_threshold=64)
            patient = str(identifier.get("PatientID", "") or "")
            if patient and "*" not in patient and "?" not in patient:
                objects.append(AuditObject(type="patient", id=patient))
            study_uids = identifier.get("StudyInstanceUID", "") or ""
            values = [study_uids] if isinstance(study_uids, str) else list(study_uids)
            objects += _studies(str(v) for v in values if v and "*" not in str(v))
        except Exception:  # an undecodable identifier was answered already; audit what is known
            logger.debug("C-FIND identifier not decodable for the audit", exc_info=True)
        objects.insert(0, AuditObject(type="query", id=sop_class_uid, query=query_text))
        self._submit(
            AuditRecord(
                event=AuditEventId.QUERY,
                action=AuditAction.EXECUTE,
                outcome=outcome_of_status(status),
                actor=actor_of(event.assoc),
                objects=objects,
                details=details,
            )
        )

    # -- C-MOVE / C-GET ------------------------------------------------------

    def transferred(
        self,
        assoc: Association,
        operation: str,
        status: int | None,
        study_uids: Iterable[str],
        *,
        destination: str,
        instances: int,
    ) -> None:
        """One C-MOVE / C-GET answered: the instances sent to ``destination``."""
        self._submit(
            AuditRecord(
                event=AuditEventId.INSTANCES_TRANSFERRED,
                action=AuditAction.READ,
                outcome=outcome_of_status(status),
                actor=actor_of(assoc),
                objects=_studies(study_uids),
                details={
                    "operation": operation,
                    "destination": destination,
                    "instances": instances,
                    "status": None if status is None else f"0x{status:04X}",
                },
            )
        )

    # -- MPPS and Storage Commitment -------------------------------------------

    def workflow_change(
        self,
        event: Event,
        operation: str,
        answer: Dataset,
        *,
        sop_instance_uid: str | None = None,
    ) -> None:
        """An MPPS N-CREATE / N-SET or a Storage Commitment N-ACTION answered."""
        status = int(answer.Status)
        if operation == "N-ACTION":
            event_id, action = AuditEventId.INSTANCES_ACCESSED, AuditAction.EXECUTE
        else:
            event_id = AuditEventId.PROCEDURE_RECORD
            action = AuditAction.CREATE if operation == "N-CREATE" else AuditAction.UPDATE
        objects = [AuditObject(type="instance", id=sop_instance_uid)] if sop_instance_uid else []
        self._submit(
            AuditRecord(
                event=event_id,
                action=action,
                outcome=outcome_of_status(status),
                actor=actor_of(event.assoc),
                objects=objects,
                details={"operation": operation, "status": f"0x{status:04X}"},
            )
        )

    # -- refused associations --------------------------------------------------

    def _on_rejected(self, event: Event) -> None:
        primitive = event.assoc.acceptor.primitive
        called = event.assoc.requestor.primitive
        details: dict[str, Any] = {
            "operation": "A-ASSOCIATE",
            "called_ae_title": str(called.called_ae_title).strip() if called is not None else None,
            "reason": getattr(primitive, "reason_str", None) if primitive is not None else None,
        }
        if primitive is not None and primitive.result is not None:
            # PS3.8 Table 9-21: Result, Source, Reason/Diag. of the A-ASSOCIATE-RJ.
            details["result"] = primitive.result
            details["source"] = primitive.result_source
            details["diagnostic"] = primitive.diagnostic
        self._submit(
            AuditRecord(
                event=AuditEventId.SECURITY_ALERT,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.MINOR_FAILURE,
                actor=actor_of(event.assoc),
                details=details,
            )
        )

    def request_refused(self, assoc: Association, operation: str, sop_class_uid: str, reason: str) -> None:
        """A DIMSE request the AE-title policy answered 0x0124 (Refused: Not Authorized)."""
        self._submit(
            AuditRecord(
                event=AuditEventId.SECURITY_ALERT,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.MINOR_FAILURE,
                actor=actor_of(assoc),
                objects=[AuditObject(type="query", id=sop_class_uid)] if sop_class_uid else [],
                details={
                    "operation": operation,
                    "status": "0x0124",
                    "reason": reason,
                    "called_ae_title": self._ae_title,
                },
            )
        )

    def tls_handshake_failed(self, address: str, reason: str, detail: str) -> None:
        """A TLS connection refused before any PDU (Node Authentication failure, PS3.15 A.5.3.11)."""
        host = address.rsplit(":", 1)[0]
        self._submit(
            AuditRecord(
                event=AuditEventId.SECURITY_ALERT,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SERIOUS_FAILURE,
                actor=AuditActor(name="unknown", method="dicom-tls", address=host),
                details={
                    "operation": "TLS handshake",
                    "event_type": "Node Authentication",
                    "reason": reason,
                    "detail": detail[:256],
                    "peer": address,
                },
            )
        )
