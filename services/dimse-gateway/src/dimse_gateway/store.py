"""C-STORE SCP: a thin adapter from pynetdicom to the shared InstanceReceiver.

pynetdicom runs this in the association's thread with the dataset already on
disk (``STORE_RECV_CHUNKED_DATASET``): the bytes exactly as received behind a
Part 10 file meta header.  The handler validates, stores write-once,
publishes, and only then answers success; every failure maps to a named
failure status with an ErrorComment saying why.

While the archive is overloaded (:mod:`pacs_common.backpressure`: ingest
backlog or storage write latency over their limits) the handler stores
nothing and answers 0xA700 "Refused: Out of Resources", which a sender
retries later.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from opentelemetry import trace
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dimse_gateway import statuses
from dimse_gateway.associations import called_ae_title
from dimse_gateway.audit import DimseAudit
from dimse_gateway.metrics import GatewayMetrics
from pacs_common.backpressure import Backpressure
from pacs_common.dicom.received import InvalidDatasetError
from pacs_common.messaging.broker import PublishError
from pacs_common.messaging.models import IngestSource
from pacs_common.receiving import InstanceReceiver, MissingIdentityError
from pacs_common.storage.base import StorageError

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_ERROR_COMMENT_MAX = 64  # ErrorComment is LO


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return status


class StoreHandler:
    """Handles EVT_C_STORE."""

    def __init__(
        self,
        receiver: InstanceReceiver,
        metrics: GatewayMetrics,
        audit: DimseAudit | None = None,
        backpressure: Backpressure | None = None,
    ) -> None:
        self._receiver = receiver
        self._metrics = metrics
        self._audit = audit
        self._backpressure = backpressure

    def __call__(self, event: Event) -> Dataset:
        started = time.perf_counter()
        request = cast(C_STORE, event.request)
        assoc = event.assoc
        requestor = assoc.requestor
        source = IngestSource(
            protocol="dimse",
            calling_ae_title=requestor.ae_title,
            called_ae_title=called_ae_title(event),
            peer=f"{requestor.address}:{requestor.port}",
        )
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        with tracer.start_as_current_span(
            "C-STORE",
            attributes={
                "dicom.sop_instance_uid": sop_instance_uid,
                "dicom.calling_ae": source.calling_ae_title or "",
            },
        ):
            status, study_uid = self._store(event, source, sop_instance_uid)
        if self._audit is not None:
            self._audit.instance_received(assoc, study_uid, stored=status.Status == statuses.SUCCESS)
        self._metrics.store_seconds.observe(time.perf_counter() - started)
        self._metrics.operations.labels("C-STORE", f"0x{int(status.Status):04X}").inc()
        return status

    def _store(self, event: Event, source: IngestSource, sop_instance_uid: str) -> tuple[Dataset, str | None]:
        """The response status, and the study of the instance when stored."""
        refusal = self._backpressure.refusal() if self._backpressure is not None else None
        if refusal is not None:
            self._metrics.backpressure_refusals.labels(refusal.reason.value).inc()
            logger.warning(
                "C-STORE refused: %s",
                refusal.message,
                extra={"sop_instance_uid": sop_instance_uid, "reason": refusal.reason.value},
            )
            return _status(statuses.OUT_OF_RESOURCES, refusal.message), None
        try:
            received = self._receiver.receive(
                event.dataset_path,
                source,
                announced_sop_class_uid=str(cast(C_STORE, event.request).AffectedSOPClassUID),
                announced_sop_instance_uid=sop_instance_uid,
            )
        except MissingIdentityError as exc:  # includes a dataset that is not the announced instance
            logger.warning("C-STORE refused: %s", exc, extra={"sop_instance_uid": sop_instance_uid})
            return _status(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
        except InvalidDatasetError as exc:
            logger.warning("C-STORE refused: %s", exc, extra={"sop_instance_uid": sop_instance_uid})
            return _status(statuses.CANNOT_UNDERSTAND, str(exc)), None
        except StorageError as exc:
            logger.error("C-STORE failed, storage: %s", exc, extra={"sop_instance_uid": sop_instance_uid})
            return _status(statuses.OUT_OF_RESOURCES, "storage unavailable"), None
        except PublishError as exc:
            logger.error("C-STORE failed, broker: %s", exc, extra={"sop_instance_uid": sop_instance_uid})
            return _status(statuses.OUT_OF_RESOURCES, "ingest queue unavailable"), None
        except Exception:
            logger.exception("C-STORE failed", extra={"sop_instance_uid": sop_instance_uid})
            return _status(statuses.OUT_OF_RESOURCES, "internal error"), None
        self._metrics.store_bytes.inc(received.location.size)
        return _status(statuses.SUCCESS), received.identity.study_instance_uid
