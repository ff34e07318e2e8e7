"""C-GET SCP for the Patient Root and Study Root Q/R information models.

Like C-MOVE (see :mod:`dimse_gateway.move` and :mod:`dimse_gateway.sending`)
but the C-STORE sub-operations go back over the requestor's own
association: the requestor proposed storage contexts with SCP/SCU role
selection (it the SCP, us the SCU), and each instance is sent in its stored
transfer syntax when one of those contexts accepted it, else converted to
one that was accepted.  An instance whose SOP class has no such context is a
failed sub-operation, and so is an archived one (its restore is
requested).  Pending responses carry the counts; the final
response is 0x0000 / 0xB000 / 0xA702 / 0xFE00 with the Failed SOP Instance
UID List.
"""

from __future__ import annotations

import logging

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET
from pynetdicom.presentation import PresentationContext

from dimse_gateway import sending
from dimse_gateway.audit import DimseAudit
from dimse_gateway.identifiers import GET_MODELS
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.sending import (
    AccessRecords,
    AssociationTarget,
    InstanceFiles,
    RestoreRequests,
    RetrieveFailedError,
    RetrieveResponder,
    SubOperationCounts,
    SubOperationSender,
    decode_identifier,
    instances_to_send,
)
from pacs_common.query import QueryClient, RetrievableInstance

logger = logging.getLogger(__name__)

OPERATION = "C-GET"


class GetHandler:
    """Serves C-GET requests (called by :class:`dimse_gateway.server.GatewayAssociation`)."""

    sop_classes: tuple[str, ...] = tuple(GET_MODELS)

    def __init__(
        self,
        query: QueryClient,
        files: InstanceFiles,
        metrics: GatewayMetrics,
        audit: DimseAudit | None = None,
        *,
        restores: RestoreRequests | None = None,
        access: AccessRecords | None = None,
    ) -> None:
        self._query = query
        self._sender = SubOperationSender(files, metrics, OPERATION, restores=restores, access=access)
        self._metrics = metrics
        self._audit = audit

    def __call__(self, assoc: Association, request: C_GET, context: PresentationContext) -> None:
        responder = RetrieveResponder(assoc, request, context)
        found: list[RetrievableInstance] = []
        sending.answer_retrieve(
            OPERATION, self._metrics, responder, lambda: self._get(assoc, request, context, responder, found)
        )
        if self._audit is not None:
            self._audit.transferred(
                assoc,
                OPERATION,
                responder.final_status,
                (i.study_instance_uid for i in found),
                destination=str(assoc.requestor.ae_title).strip(),
                instances=len(found),
            )

    def _get(
        self,
        assoc: Association,
        request: C_GET,
        context: PresentationContext,
        responder: RetrieveResponder,
        found: list[RetrievableInstance],
    ) -> None:
        identifier = decode_identifier(request, context)
        model = GET_MODELS.get(str(request.AffectedSOPClassUID))
        if model is None:
            raise RetrieveFailedError(sending.UNABLE_TO_PROCESS, "not a Q/R Get SOP class")
        instances = instances_to_send(self._query, model, identifier)
        found.extend(instances)
        if not instances:
            responder.final(sending.SUCCESS, SubOperationCounts(remaining=0))
            return
        # C-STORE-RQ message IDs follow the C-GET's, as pynetdicom's own SCP does.
        target = AssociationTarget(assoc, first_message_id=(responder.message_id % 0xFFFF) + 1)
        result = self._sender.run(
            instances, target, is_cancelled=responder.is_cancelled, progress=responder.pending
        )
        responder.complete(result)
