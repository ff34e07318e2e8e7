"""Storage Commitment push model SCP (PS3.4 J): N-ACTION in, N-EVENT-REPORT out.

The N-ACTION is recorded (table ``storage_commitment``) and answered at
once; a worker thread then checks every referenced instance against the
index — stored, with the SOP Class the requester named — and reports:

* Event Type 1 when all are committed, 2 when some failed (Failed SOP
  Sequence with Failure Reason 0x0112 no such object instance or 0x0119
  class-instance conflict);
* on the requester's association while it is open, else on a new
  association to the requester's AE as found in the remote-node registry,
  proposing SCP/SCU role selection with this AE as SCP (PS3.4 J.3.3);
* retried with the configured delays; the row ends REPORTED, or
  REPORT_FAILED with the last error.

An instance that is missing may still be in the ingest queue (C-STORE
answered, not indexed yet), so missing ones are looked for again for a
short while before they are reported as failed.

The report on the requester's association must follow the N-ACTION
response on the wire: the worker starts only when the DUL has sent the
P-DATA that carries it (EVT_DIMSE_SENT arms, EVT_PDU_SENT fires).
"""

from __future__ import annotations

import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import build_role

from dimse_gateway import workflow_contexts as wf
from dimse_gateway.audit import DimseAudit
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.sockets import disable_nagle
from pacs_common.db.blocking import BlockingPool
from pacs_common.workflow import commitment as repository
from pacs_common.workflow.commitment import (
    CommitmentOutcome,
    CommitmentRecord,
    ReferencedInstance,
    RemoteAddress,
)
from pacs_common.workflow.settings import WorkflowSettings

logger = logging.getLogger(__name__)

ACTION_REQUEST_COMMITMENT = 1
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2
# How long the worker waits for the N-ACTION response to be sent.
_RESPONSE_SENT_WAIT_SECONDS = 10.0

#: Where a requester AE is reached, or None when it is not registered.
RequesterResolver = Callable[[str], RemoteAddress | None]


class ReportError(Exception):
    """A report could not be delivered; the message goes into ``last_error``."""


@dataclass
class _ResponseGate:
    """Opens when the N-ACTION response has left (see the module docstring)."""

    assoc: Association
    message_id: int
    sent: threading.Event = field(default_factory=threading.Event)
    armed: bool = False


class CommitmentHandler:
    """Handles EVT_N_ACTION of the push model and reports in worker threads.

    Call :meth:`resume_pending` once at start-up (reports a previous process
    could not finish) and :meth:`close` at shutdown.
    """

    def __init__(
        self,
        pool: BlockingPool,
        settings: WorkflowSettings,
        metrics: GatewayMetrics,
        *,
        ae_title: str,
        resolve_requester: RequesterResolver | None = None,
        audit: DimseAudit | None = None,
        ssl_context_factory: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._ae_title = ae_title
        self._resolve = resolve_requester or self._resolve_from_registry
        self._audit = audit
        # TLS towards requesters marked `tls` in the registry.
        self._ssl_context_factory = ssl_context_factory
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.commitment_workers, thread_name_prefix="commitment"
        )
        self._stopping = threading.Event()
        self._gates: list[_ResponseGate] = []
        self._gates_lock = threading.Lock()

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_N_ACTION, self.on_action),
            (evt.EVT_DIMSE_SENT, self._on_dimse_sent),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
        ]

    # -- the request ---------------------------------------------------------

    def on_action(self, event: Event) -> tuple[Dataset, Dataset | None]:
        answer = self._action(event)
        self._metrics.operations.labels("N-ACTION", f"0x{int(answer.Status):04X}").inc()
        if self._audit is not None:
            self._audit.workflow_change(event, "N-ACTION", answer)
        return answer, None

    def _action(self, event: Event) -> Dataset:
        request = cast(N_ACTION, event.request)
        if str(request.RequestedSOPClassUID) != wf.STORAGE_COMMITMENT_PUSH_MODEL:
            return wf.status(wf.NO_SUCH_SOP_CLASS, "only Storage Commitment push model here")
        if str(request.RequestedSOPInstanceUID) != wf.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE:
            return wf.status(wf.NO_SUCH_SOP_INSTANCE, "not the well-known push model instance")
        if request.ActionTypeID != ACTION_REQUEST_COMMITMENT:
            return wf.status(wf.NO_SUCH_ACTION, f"no action type {request.ActionTypeID}")
        try:
            transaction_uid, requested = _parse_action(lambda: event.action_information)
        except ValueError as exc:
            logger.warning("storage commitment refused: %s", exc)
            return wf.status(wf.INVALID_ARGUMENT_VALUE, str(exc))
        requester = event.assoc.requestor.ae_title
        try:
            record = self._pool.run(
                lambda pool: repository.record_request(pool, transaction_uid, requester, requested)
            )
        except Exception as exc:
            logger.error("storage commitment not recorded: %r", exc, exc_info=exc)
            return wf.status(wf.PROCESSING_FAILURE, "commitment store unavailable; retry later")
        gate = _ResponseGate(event.assoc, int(request.MessageID or 0))
        with self._gates_lock:
            self._gates.append(gate)
        logger.info(
            "storage commitment requested",
            extra={"transaction_uid": transaction_uid, "requester": requester, "instances": len(requested)},
        )
        self._executor.submit(self._process, record, gate)
        return wf.status(wf.SUCCESS)

    def _on_dimse_sent(self, event: Event) -> None:
        message = event.message
        if type(message).__name__ != "N_ACTION_RSP":
            return
        responded_to = getattr(message.command_set, "MessageIDBeingRespondedTo", None)
        with self._gates_lock:
            for gate in self._gates:
                if gate.assoc is event.assoc and gate.message_id == responded_to:
                    gate.armed = True

    def _on_pdu_sent(self, event: Event) -> None:
        if not isinstance(event.pdu, P_DATA_TF):
            return
        with self._gates_lock:
            opened = [g for g in self._gates if g.assoc is event.assoc and g.armed]
            self._gates = [g for g in self._gates if g not in opened]
        for gate in opened:
            gate.sent.set()

    # -- the check and the report ----------------------------------------------

    def resume_pending(self) -> int:
        """Check and report, on new associations, the requests still PENDING."""
        pending = self._pool.run(lambda pool: repository.list_pending(pool, limit=1000))
        for record in pending:
            self._executor.submit(self._process, record, None)
        return len(pending)

    def _process(self, record: CommitmentRecord, gate: _ResponseGate | None) -> None:
        try:
            outcome = self._check(record.requested)
            self._pool.run(lambda pool: repository.record_outcome(pool, record.pk, outcome))
            if gate is not None:
                _wait_for_response(gate)
            self._report(record, outcome, gate.assoc if gate is not None else None)
        except Exception:
            logger.exception("storage commitment %s failed", record.transaction_uid)
        finally:
            if gate is not None:
                with self._gates_lock:
                    self._gates = [g for g in self._gates if g is not gate]

    def _check(self, requested: list[ReferencedInstance]) -> CommitmentOutcome:
        deadline = time.monotonic() + self._settings.commitment_settle_seconds
        waiting = {r.sop_instance_uid for r in requested}
        stored: dict[str, str] = {}
        while True:
            found = self._stored(sorted(waiting))
            stored.update(found)
            waiting -= found.keys()
            if not waiting or time.monotonic() >= deadline:
                break
            if self._stopping.wait(self._settings.commitment_poll_seconds):
                break
        succeeded: list[ReferencedInstance] = []
        failed: list[ReferencedInstance] = []
        for item in requested:
            sop_class = stored.get(item.sop_instance_uid)
            if sop_class is None:
                failed.append(item.model_copy(update={"failure_reason": wf.NO_SUCH_OBJECT_INSTANCE}))
            elif sop_class != item.sop_class_uid:
                failed.append(item.model_copy(update={"failure_reason": wf.CLASS_INSTANCE_CONFLICT}))
            else:
                succeeded.append(item)
        return CommitmentOutcome(succeeded=succeeded, failed=failed)

    def _report(
        self, record: CommitmentRecord, outcome: CommitmentOutcome, assoc: Association | None
    ) -> None:
        event_type = EVENT_SOME_FAILED if outcome.failed else EVENT_ALL_COMMITTED
        information = self.event_information(record.transaction_uid, outcome)
        delays = [0.0, *self._settings.commitment_report_retry_seconds]
        for attempt, delay in enumerate(delays, start=1):
            if delay and self._stopping.wait(delay):
                return  # shutting down: stays PENDING, resumed at the next start
            final = attempt == len(delays)
            try:
                if assoc is not None and _open(assoc):
                    how = "the requester's association"
                    self._send_on(assoc, information, event_type)
                else:
                    how = "a new association"
                    self._send_on_new_association(record.requester_ae_title, information, event_type)
            except Exception as exc:
                error = f"{exc}"[:500] or repr(exc)
                logger.warning(
                    "storage commitment report %s attempt %d failed: %s",
                    record.transaction_uid,
                    attempt,
                    error,
                )
                self._record_attempt(record.pk, error, final=final)
                assoc = None  # next attempts: a new association
                continue
            self._record_attempt(record.pk, None, final=True)
            logger.info(
                "storage commitment reported",
                extra={"transaction_uid": record.transaction_uid, "via": how, "event_type": event_type},
            )
            return

    def _stored(self, uids: list[str]) -> dict[str, str]:
        return self._pool.run(lambda pool: repository.stored_sop_classes(pool, uids))

    def _record_attempt(self, pk: int, error: str | None, *, final: bool) -> None:
        self._pool.run(lambda pool: repository.record_attempt(pool, pk, error=error, final=final))

    def event_information(self, transaction_uid: str, outcome: CommitmentOutcome) -> Dataset:
        information = Dataset()
        information.TransactionUID = transaction_uid
        if outcome.succeeded:
            information.RetrieveAETitle = self._ae_title
            information.ReferencedSOPSequence = [_item(i) for i in outcome.succeeded]
        if outcome.failed:
            information.FailedSOPSequence = [_item(i) for i in outcome.failed]
        return information

    def _send_on(self, assoc: Association, information: Dataset, event_type: int) -> None:
        assoc.dimse_timeout = self._settings.commitment_report_timeout_seconds
        answer, _ = assoc.send_n_event_report(
            information,
            event_type,
            wf.STORAGE_COMMITMENT_PUSH_MODEL,
            wf.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
        )
        _check_answer(answer)

    def _send_on_new_association(self, requester: str, information: Dataset, event_type: int) -> None:
        address = self._resolve(requester)
        if address is None:
            raise ReportError(f"{requester} is not a registered node allowed to use commitment")
        tls_args = None
        if address.tls:
            if self._ssl_context_factory is None:
                raise ReportError(f"{requester} wants TLS and no TLS client context is configured")
            tls_args = (self._ssl_context_factory(), address.host)
        ae = AE(ae_title=self._ae_title)
        ae.acse_timeout = self._settings.commitment_connect_timeout_seconds
        ae.network_timeout = self._settings.commitment_report_timeout_seconds
        ae.dimse_timeout = self._settings.commitment_report_timeout_seconds
        ae.add_requested_context(wf.STORAGE_COMMITMENT_PUSH_MODEL, wf.TRANSFER_SYNTAXES)
        # PS3.4 J.3.3: the association requester (this AE) takes the SCP role.
        role = build_role(wf.STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
        assoc = ae.associate(
            address.host, address.port, ae_title=address.ae_title, ext_neg=[role], tls_args=tls_args
        )
        if not assoc.is_established:
            what = "rejected" if assoc.is_rejected else "aborted or unreachable"
            raise ReportError(f"association to {address.ae_title}@{address.host}:{address.port} {what}")
        disable_nagle(assoc)
        try:
            answer, _ = assoc.send_n_event_report(
                information,
                event_type,
                wf.STORAGE_COMMITMENT_PUSH_MODEL,
                wf.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
            )
            _check_answer(answer)
        finally:
            if assoc.is_established:
                assoc.release()

    def _resolve_from_registry(self, ae_title: str) -> RemoteAddress | None:
        return self._pool.run(lambda pool: repository.find_remote_node(pool, ae_title))

    def close(self) -> None:
        """Stop waiting between attempts; unfinished reports stay PENDING."""
        self._stopping.set()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _wait_for_response(gate: _ResponseGate) -> None:
    deadline = time.monotonic() + _RESPONSE_SENT_WAIT_SECONDS
    while not gate.sent.wait(0.05):
        if not gate.assoc.is_established:
            return
        if time.monotonic() >= deadline:
            logger.warning("N-ACTION response not seen leaving; reporting anyway")
            return


def _open(assoc: Association) -> bool:
    """Established and the requester has not asked to release it."""
    if not assoc.is_established:
        return False
    return not isinstance(assoc.dul.peek_next_pdu(), A_RELEASE)


def _check_answer(answer: Dataset) -> None:
    if "Status" not in answer:
        raise ReportError("no N-EVENT-REPORT response from the requester")
    code = int(answer.Status)
    if code != wf.SUCCESS:
        raise ReportError(f"the requester answered the N-EVENT-REPORT with 0x{code:04X}")


def _item(instance: ReferencedInstance) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.sop_class_uid
    item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    if instance.failure_reason is not None:
        item.FailureReason = instance.failure_reason
    return item


def _parse_action(read: Callable[[], Dataset]) -> tuple[str, list[ReferencedInstance]]:
    """Transaction UID and Referenced SOP Sequence; ValueError when unusable."""
    try:
        information = read()
        transaction_uid = str(information.get("TransactionUID") or "").strip()
        items = information.get("ReferencedSOPSequence") or []
        requested = [
            ReferencedInstance(
                sop_class_uid=str(item.get("ReferencedSOPClassUID") or "").strip(),
                sop_instance_uid=str(item.get("ReferencedSOPInstanceUID") or "").strip(),
            )
            for item in items
        ]
    except Exception as exc:
        raise ValueError(f"cannot read the action information: {exc}") from exc
    if not transaction_uid:
        raise ValueError("Transaction UID missing")
    if not requested:
        raise ValueError("Referenced SOP Sequence missing or empty")
    if any(not r.sop_class_uid or not r.sop_instance_uid for r in requested):
        raise ValueError("a Referenced SOP Sequence item lacks a UID")
    return transaction_uid, requested
