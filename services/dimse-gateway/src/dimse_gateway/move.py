"""C-MOVE SCP for the Patient Root and Study Root Q/R information models.

Serves the request itself (see :mod:`dimse_gateway.sending` for why not
through pynetdicom's ``EVT_C_MOVE`` generator): :mod:`dimse_gateway.server`
hands every C-MOVE request to :class:`MoveHandler`, in the association's
thread, which

1. decodes the identifier and asks the query-service which instances it
   names (``/v1/retrieve``);
2. looks the Move Destination up in the remote-node registry: unknown, or
   not allowed ``store`` → 0xA801 "Move destination unknown";
3. opens a new association to that node as our AE title (TLS when the node
   is marked so), proposing for each SOP class its stored transfer syntaxes
   plus Explicit/Implicit VR Little Endian; cannot associate → 0xA702;
4. runs the C-STORE sub-operations one at a time (unchanged when the stored
   syntax was accepted, transcoded otherwise), sending a pending response
   with the counts after each, stopping at C-CANCEL;
5. answers 0x0000 / 0xB000 / 0xA702 / 0xFE00 with the counts and the Failed
   SOP Instance UID List (an archived instance is a failed sub-operation
   whose restore was requested; the others are still sent).

Nothing is loaded into memory beyond one instance being transcoded.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Protocol

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.presentation import PresentationContext

from dimse_gateway import sending
from dimse_gateway.audit import DimseAudit
from dimse_gateway.identifiers import MOVE_MODELS
from dimse_gateway.jobs import MoveJob, MoveJobs
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.sending import (
    AccessRecords,
    AssociationTarget,
    InstanceFiles,
    RestoreRequests,
    RetrieveFailedError,
    RetrieveResponder,
    RunResult,
    SubOperationCounts,
    SubOperationSender,
    decode_identifier,
    instances_to_send,
    proposed_storage_contexts,
)
from dimse_gateway.sockets import disable_nagle
from pacs_common.db.blocking import BlockingPool
from pacs_common.jobs import JobState
from pacs_common.nodes import Operation, RemoteNode, RemoteNodeRepository
from pacs_common.query import QueryClient, RetrievableInstance
from pacs_common.resilience import CircuitOpenError, Dependencies, remote_ae_dependency
from pacs_common.settings import GatewaySettings

logger = logging.getLogger(__name__)

_SUB_ASSOCIATION_POLL_SECONDS = 0.0001

OPERATION = "C-MOVE"


class _NoAssociationError(Exception):
    """The destination did not accept an association (for its circuit breaker)."""


class NodeDirectory(Protocol):
    """Finds a registered node by AE title (blocking)."""

    def get(self, ae_title: str) -> RemoteNode | None: ...


class RegistryNodeDirectory:
    """The remote-node registry in PostgreSQL, from handler threads."""

    def __init__(self, pool: BlockingPool) -> None:
        self._pool = pool

    def get(self, ae_title: str) -> RemoteNode | None:
        return self._pool.run(lambda pool: RemoteNodeRepository(pool).get(ae_title))


class MoveHandler:
    """Serves C-MOVE requests (called by :class:`dimse_gateway.server.GatewayAssociation`)."""

    sop_classes: tuple[str, ...] = tuple(MOVE_MODELS)

    def __init__(
        self,
        settings: GatewaySettings,
        query: QueryClient,
        nodes: NodeDirectory,
        files: InstanceFiles,
        metrics: GatewayMetrics,
        *,
        ssl_context_factory: Callable[[], ssl.SSLContext] | None = None,
        audit: DimseAudit | None = None,
        jobs: MoveJobs | None = None,
        restores: RestoreRequests | None = None,
        access: AccessRecords | None = None,
        breakers: Dependencies | None = None,
    ) -> None:
        self._settings = settings
        # One circuit breaker per destination: a workstation that is off is
        # not dialled (and waited for, up to the connect timeout) by every
        # C-MOVE until it answers again.
        self._breakers = breakers or Dependencies()
        self._query = query
        self._nodes = nodes
        self._sender = SubOperationSender(files, metrics, OPERATION, restores=restores, access=access)
        self._metrics = metrics
        self._ssl_context_factory = ssl_context_factory
        self._audit = audit
        self._jobs = jobs

    def __call__(self, assoc: Association, request: C_MOVE, context: PresentationContext) -> None:
        responder = RetrieveResponder(assoc, request, context)
        found: list[RetrievableInstance] = []
        sending.answer_retrieve(
            OPERATION, self._metrics, responder, lambda: self._move(assoc, request, context, responder, found)
        )
        if self._audit is not None:
            self._audit.transferred(
                assoc,
                OPERATION,
                responder.final_status,
                (i.study_instance_uid for i in found),
                destination=str(request.MoveDestination or "").strip(),
                instances=len(found),
            )

    def _move(
        self,
        assoc: Association,
        request: C_MOVE,
        context: PresentationContext,
        responder: RetrieveResponder,
        found: list[RetrievableInstance],
    ) -> None:
        identifier = decode_identifier(request, context)
        model = MOVE_MODELS.get(str(request.AffectedSOPClassUID))
        if model is None:
            raise RetrieveFailedError(sending.UNABLE_TO_PROCESS, "not a Q/R Move SOP class")
        node = self._destination(str(request.MoveDestination or "").strip())
        instances = instances_to_send(self._query, model, identifier)
        found.extend(instances)
        if not instances:
            responder.final(sending.SUCCESS, SubOperationCounts(remaining=0))
            return
        store_assoc = self._associate(node, instances)
        counts = SubOperationCounts(remaining=len(instances))
        if store_assoc is None:
            reason = f"cannot associate with {node.ae_title}"
            counts.fail_remaining((i.sop_instance_uid for i in instances), reason)
            self._metrics.suboperations.labels(OPERATION, "failed").inc(len(instances))
            responder.final(sending.UNABLE_TO_PERFORM_SUBOPERATIONS, counts, comment=reason)
            return
        job = self._start_job(assoc, node, instances)
        total = len(instances)

        def progress(counts: SubOperationCounts) -> None:
            responder.pending(counts)
            job.progress(total - counts.remaining, total)

        result: RunResult | None = None
        try:
            target = AssociationTarget(
                store_assoc,
                first_message_id=1,
                move_originator=(assoc.requestor.ae_title, responder.message_id),
            )
            result = self._sender.run(
                instances,
                target,
                is_cancelled=lambda: responder.is_cancelled() or job.cancelled,
                progress=progress,
            )
        finally:
            if store_assoc.is_established:
                store_assoc.release()
            job.finish(*_job_outcome(result))
        responder.complete(result)

    def _start_job(
        self, assoc: Association, node: RemoteNode, instances: list[RetrievableInstance]
    ) -> MoveJob:
        if self._jobs is None:
            return MoveJob.untracked()
        calling = str(assoc.requestor.ae_title).strip()
        params = {
            "destination": node.ae_title,
            "requested_by": calling,
            "studies": sorted({i.study_instance_uid for i in instances}),
        }
        return self._jobs.start(params, len(instances), calling)

    def _destination(self, ae_title: str) -> RemoteNode:
        if not ae_title:
            raise RetrieveFailedError(sending.MOVE_DESTINATION_UNKNOWN, "move destination missing")
        try:
            node = self._nodes.get(ae_title)
        except Exception as exc:
            logger.error("C-MOVE: node registry unavailable: %s", exc)
            raise RetrieveFailedError(sending.UNABLE_TO_PROCESS, "node registry unavailable") from exc
        if node is None:
            raise RetrieveFailedError(
                sending.MOVE_DESTINATION_UNKNOWN, f"move destination {ae_title} unknown"
            )
        if not node.allows(Operation.STORE):
            raise RetrieveFailedError(
                sending.MOVE_DESTINATION_UNKNOWN, f"move destination {ae_title} may not receive"
            )
        return node

    def _associate(self, node: RemoteNode, instances: list[RetrievableInstance]) -> Association | None:
        breaker = self._breakers.breaker(remote_ae_dependency(node.ae_title, node.host, node.port))
        try:
            with breaker.attempt(_NoAssociationError):
                store_assoc = self._request_association(node, instances)
                if store_assoc is None:
                    raise _NoAssociationError
                return store_assoc
        except CircuitOpenError as exc:
            logger.warning("C-MOVE: not associating with %s: %s", node.ae_title, exc)
        except _NoAssociationError:
            pass  # _request_association logged why
        return None

    def _request_association(
        self, node: RemoteNode, instances: list[RetrievableInstance]
    ) -> Association | None:
        settings = self._settings
        ae = AE(ae_title=settings.ae_title)
        ae.connection_timeout = settings.retrieve_connect_timeout_seconds
        ae.acse_timeout = settings.retrieve_connect_timeout_seconds
        ae.dimse_timeout = settings.dimse_timeout_seconds
        ae.network_timeout = settings.network_timeout_seconds
        tls_args = None
        if node.tls:
            factory = self._ssl_context_factory
            if factory is None:
                logger.error("C-MOVE: node %s wants TLS, no TLS client context configured", node.ae_title)
                return None
            tls_args = (factory(), node.host)
        store_assoc = ae.associate(
            node.host,
            node.port,
            contexts=proposed_storage_contexts(instances),
            ae_title=node.ae_title,
            max_pdu=settings.max_pdu_bytes,
            tls_args=tls_args,
        )
        if not store_assoc.is_established:
            logger.warning("C-MOVE: no association with %s at %s:%d", node.ae_title, node.host, node.port)
            return None
        disable_nagle(store_assoc)
        # pynetdicom's transport thread sleeps 1 ms whenever it finds nothing
        # to do, which adds up to a millisecond to every C-STORE and its
        # response; this association lives only while it is kept busy.
        store_assoc.dul._run_loop_delay = _SUB_ASSOCIATION_POLL_SECONDS
        return store_assoc


def _job_outcome(result: RunResult | None) -> tuple[JobState, str | None]:
    if result is None:
        return JobState.FAILED, "sub-operations did not run to the end"
    counts = result.counts
    if result.cancelled:
        return JobState.CANCELLED, None
    if counts.failed:
        return (
            JobState.FAILED,
            f"{counts.failed} of {counts.failed + counts.completed + counts.warning} failed: {counts.first_failure}",
        )
    return JobState.DONE, None
