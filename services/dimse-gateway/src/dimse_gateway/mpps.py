"""Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET.

A thin adapter: it decodes the attribute list, hands it to
:mod:`pacs_common.workflow.mpps` through the blocking pool, and maps the
outcome to a status.  The repository writes the state and publishes the
``mpps.*`` event in one transaction, so the modality is told success only
when both happened (see that module for the reasoning).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.events import Event, EventHandlerType

from dimse_gateway import workflow_contexts as wf
from dimse_gateway.audit import DimseAudit
from dimse_gateway.metrics import GatewayMetrics
from pacs_common.db.blocking import BlockingPool
from pacs_common.messaging.broker import PublishError
from pacs_common.messaging.models import MppsEvent
from pacs_common.workflow import mpps as repository
from pacs_common.workflow.dicom_json import to_json
from pacs_common.workflow.mpps import MppsRecord, MppsRefusal, MppsRefusedError

logger = logging.getLogger(__name__)

_REFUSAL_STATUS: dict[MppsRefusal, int] = {
    MppsRefusal.DUPLICATE: wf.DUPLICATE_SOP_INSTANCE,
    MppsRefusal.INVALID_STATUS: wf.INVALID_ATTRIBUTE_VALUE,
    MppsRefusal.MISSING_STATUS: wf.MISSING_ATTRIBUTE,
    MppsRefusal.FINISHED: wf.PROCESSING_FAILURE,
    MppsRefusal.UNKNOWN: wf.NO_SUCH_SOP_INSTANCE,
}


class EventPublisher(Protocol):
    """What the handler needs of :class:`pacs_common.messaging.BlockingPublisher`."""

    def publish_event_async(self, event: Any) -> Awaitable[None]: ...


class MppsHandler:
    """Handles EVT_N_CREATE and EVT_N_SET of the MPPS SOP Class."""

    def __init__(
        self,
        pool: BlockingPool,
        publisher: EventPublisher,
        metrics: GatewayMetrics,
        audit: DimseAudit | None = None,
    ) -> None:
        self._pool = pool
        self._publish: Callable[[MppsEvent], Awaitable[None]] = publisher.publish_event_async
        self._metrics = metrics
        self._audit = audit

    def handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_N_CREATE, self.on_create), (evt.EVT_N_SET, self.on_set)]

    def on_create(self, event: Event) -> tuple[Dataset, Dataset | None]:
        request = cast(N_CREATE, event.request)
        answer, attribute_list = self._create(event, request)
        self._count("N-CREATE", answer)
        if self._audit is not None:
            created = attribute_list.get("AffectedSOPInstanceUID") if attribute_list is not None else None
            uid = str(request.AffectedSOPInstanceUID or created or "") or None
            self._audit.workflow_change(event, "N-CREATE", answer, sop_instance_uid=uid)
        return answer, attribute_list

    def on_set(self, event: Event) -> tuple[Dataset, Dataset | None]:
        request = cast(N_SET, event.request)
        answer = self._set(event, request)
        self._count("N-SET", answer)
        if self._audit is not None:
            uid = str(request.RequestedSOPInstanceUID or "") or None
            self._audit.workflow_change(event, "N-SET", answer, sop_instance_uid=uid)
        return answer, None

    def _create(self, event: Event, request: N_CREATE) -> tuple[Dataset, Dataset | None]:
        if str(request.AffectedSOPClassUID) != wf.MODALITY_PERFORMED_PROCEDURE_STEP:
            return wf.status(wf.NO_SUCH_SOP_CLASS, "only MPPS is created here"), None
        attributes = _decode(lambda: event.attribute_list)
        if attributes is None:
            return wf.status(wf.PROCESSING_FAILURE, "cannot decode the attribute list"), None
        given_uid = request.AffectedSOPInstanceUID
        sop_instance_uid = str(given_uid) if given_uid else str(generate_uid())
        calling = event.assoc.requestor.ae_title
        try:
            created: MppsRecord = self._pool.run(
                lambda pool: repository.create(
                    pool, sop_instance_uid, attributes, calling_ae_title=calling, publish=self._publish
                )
            )
        except MppsRefusedError as exc:
            logger.warning(
                "MPPS N-CREATE refused: %s", exc.reason, extra={"sop_instance_uid": sop_instance_uid}
            )
            return wf.status(_REFUSAL_STATUS[exc.refusal], exc.reason), None
        except Exception as exc:
            return self._failed("N-CREATE", sop_instance_uid, exc), None
        logger.info(
            "MPPS created",
            extra={"sop_instance_uid": sop_instance_uid, "worklist_item": created.worklist_item_fk},
        )
        reply: Dataset | None = None
        if not given_uid:  # PS3.7 10.1.5.1.4: the SCP names the instance it created
            reply = Dataset()
            reply.AffectedSOPInstanceUID = sop_instance_uid
        return wf.status(wf.SUCCESS), reply

    def _set(self, event: Event, request: N_SET) -> Dataset:
        if str(request.RequestedSOPClassUID) != wf.MODALITY_PERFORMED_PROCEDURE_STEP:
            return wf.status(wf.NO_SUCH_SOP_CLASS, "only MPPS is modified here")
        sop_instance_uid = str(request.RequestedSOPInstanceUID or "")
        if not sop_instance_uid:
            return wf.status(wf.NO_SUCH_SOP_INSTANCE, "no Requested SOP Instance UID")
        modifications = _decode(lambda: event.modification_list)
        if modifications is None:
            return wf.status(wf.PROCESSING_FAILURE, "cannot decode the modification list")
        try:
            updated: MppsRecord = self._pool.run(
                lambda pool: repository.update(pool, sop_instance_uid, modifications, publish=self._publish)
            )
        except MppsRefusedError as exc:
            logger.warning("MPPS N-SET refused: %s", exc.reason, extra={"sop_instance_uid": sop_instance_uid})
            return wf.status(_REFUSAL_STATUS[exc.refusal], exc.reason)
        except Exception as exc:
            return self._failed("N-SET", sop_instance_uid, exc)
        logger.info("MPPS updated", extra={"sop_instance_uid": sop_instance_uid, "status": updated.status})
        return wf.status(wf.SUCCESS)

    @staticmethod
    def _failed(operation: str, sop_instance_uid: str, exc: Exception) -> Dataset:
        """Nothing was kept (the transaction rolled back): say so, never success."""
        if isinstance(exc, PublishError):
            logger.error(
                "MPPS %s failed, broker: %s", operation, exc, extra={"sop_instance_uid": sop_instance_uid}
            )
            return wf.status(wf.PROCESSING_FAILURE, "MPPS event queue unavailable; retry later")
        logger.error(
            "MPPS %s failed: %r", operation, exc, extra={"sop_instance_uid": sop_instance_uid}, exc_info=exc
        )
        return wf.status(wf.PROCESSING_FAILURE, "MPPS store unavailable; retry later")

    def _count(self, operation: str, answer: Dataset) -> None:
        self._metrics.operations.labels(operation, f"0x{int(answer.Status):04X}").inc()


def _decode(read: Callable[[], Dataset]) -> dict[str, Any] | None:
    """The dataset a peer sent as DICOM JSON (Unicode), None when it cannot be read."""
    try:
        return to_json(read())
    except Exception:
        logger.warning("undecodable dataset", exc_info=True)
        return None
