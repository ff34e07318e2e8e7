"""Who may associate with the gateway, and what each peer may ask of it.

Modes (``PACS_GATEWAY_POLICY_MODE``):

* ``open`` (default): any Calling AE Title (unless
  ``PACS_GATEWAY_ALLOWED_CALLING_AE_TITLES`` lists some, which pynetdicom
  checks), every operation;
* ``registry``: only Calling AE Titles in that static list or in the
  remote-node registry; a registered node may ask only for its
  ``allowed_operations`` (a static-list title not in the registry may ask
  for everything).

Association level (PS3.8 9.3.4, A-ASSOCIATE-RJ result / source / reason):

* called AE title not ours → rejected-permanent, service-user, reason 7
  (called-AE-title-not-recognized);
* calling AE title unknown → rejected-permanent, service-user, reason 3
  (calling-AE-title-not-recognized);
* a known node none of whose proposed SOP classes it may use →
  rejected-permanent, service-user, reason 1 (no-reason-given): nothing it
  could do on the association is allowed;
* the registry cannot be read → rejected-transient, service-user, reason 1:
  the peer may try again later.

Request level: the association stays open for what the node may do, and a
request it may not make is answered with status 0x0124 "Refused: Not
Authorized" (PS3.7 C.5: the DIMSE-service-user is not authorized for the
operation) — e.g. a C-FIND from a node allowed ``store`` and ``echo`` that
proposed both a storage and a Q/R Find context.  Rejecting the presentation
context instead would not work for C-GET: a node allowed ``get`` but not
``store`` must still be given the storage contexts (SCP role) its
sub-operations arrive on.

Registry lookups are cached for ``cache_seconds`` (unknown titles too, so a
peer that retries cannot hammer the database); they run in the association
threads through :class:`pacs_common.db.blocking.BlockingPool`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    N_ACTION,
    N_CREATE,
    N_DELETE,
    N_EVENT_REPORT,
    N_GET,
    N_SET,
)
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dimse_gateway.identifiers import FIND_MODELS, GET_MODELS, MOVE_MODELS
from dimse_gateway.metrics import GatewayMetrics
from dimse_gateway.workflow_contexts import (
    MODALITY_PERFORMED_PROCEDURE_STEP,
    MODALITY_WORKLIST_FIND,
    STORAGE_COMMITMENT_PUSH_MODEL,
)
from pacs_common.nodes import Operation, RemoteNode

logger = logging.getLogger(__name__)

VERIFICATION: Final = "1.2.840.10008.1.1"
#: PS3.7 C.5 general status: Refused: Not Authorized.
NOT_AUTHORIZED: Final = 0x0124
_ERROR_COMMENT_MAX = 64


class PolicyMode(StrEnum):
    OPEN = "open"
    REGISTRY = "registry"


class GatewayPolicySettings(BaseSettings):
    """The AE-title policy (``PACS_GATEWAY_POLICY_*``)."""

    model_config = SettingsConfigDict(env_prefix="PACS_GATEWAY_POLICY_", extra="ignore")

    mode: PolicyMode = PolicyMode.OPEN
    # How long a registry answer (a node, or "unknown") is reused.
    cache_seconds: float = Field(default=10.0, ge=0)
    cache_max_entries: int = Field(default=1024, ge=1)


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 Table 9-21)."""

    result: int  # 1 rejected-permanent, 2 rejected-transient
    source: int  # 1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation)
    reason: int
    label: str  # the metric's reason label


SERVICE_USER: Final = 0x01
PERMANENT: Final = 0x01
TRANSIENT: Final = 0x02
CALLING_AE_NOT_RECOGNIZED: Final = Rejection(PERMANENT, SERVICE_USER, 0x03, "calling_ae_title")
CALLED_AE_NOT_RECOGNIZED: Final = Rejection(PERMANENT, SERVICE_USER, 0x07, "called_ae_title")
# A known node, none of whose proposed SOP classes it may use.
NOTHING_PERMITTED: Final = Rejection(PERMANENT, SERVICE_USER, 0x01, "no_permitted_sop_class")
REGISTRY_UNAVAILABLE: Final = Rejection(TRANSIENT, SERVICE_USER, 0x01, "registry_unavailable")


# -- what a request or a proposed context asks for ------------------------------------------


def operation_of_request(msg: Any) -> Operation | None:
    """The operation a DIMSE request is (None: not one the registry names)."""
    sop_class = str(
        getattr(msg, "AffectedSOPClassUID", None) or getattr(msg, "RequestedSOPClassUID", "") or ""
    )
    if isinstance(msg, C_ECHO):
        return Operation.ECHO
    if isinstance(msg, C_STORE):
        return Operation.STORE
    if isinstance(msg, C_FIND):
        return Operation.WORKLIST if sop_class == MODALITY_WORKLIST_FIND else Operation.FIND
    if isinstance(msg, C_MOVE):
        return Operation.MOVE
    if isinstance(msg, C_GET):
        return Operation.GET
    if sop_class == MODALITY_PERFORMED_PROCEDURE_STEP:
        return Operation.MPPS
    if sop_class == STORAGE_COMMITMENT_PUSH_MODEL:
        return Operation.COMMITMENT
    return None


def operations_of_context(abstract_syntax: str) -> frozenset[Operation]:
    """The operations that could use a proposed presentation context.

    Anything not named below is a storage SOP class: C-STORE to us, or the
    C-GET sub-operations we send back on it."""
    if abstract_syntax == VERIFICATION:
        return frozenset({Operation.ECHO})
    if abstract_syntax == MODALITY_WORKLIST_FIND:
        return frozenset({Operation.WORKLIST})
    if abstract_syntax in FIND_MODELS:
        return frozenset({Operation.FIND})
    if abstract_syntax in MOVE_MODELS:
        return frozenset({Operation.MOVE})
    if abstract_syntax in GET_MODELS:
        return frozenset({Operation.GET})
    if abstract_syntax == MODALITY_PERFORMED_PROCEDURE_STEP:
        return frozenset({Operation.MPPS})
    if abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL:
        return frozenset({Operation.COMMITMENT})
    return frozenset({Operation.STORE, Operation.GET})


# -- the registry, cached --------------------------------------------------------------------


class NodeDirectory(Protocol):
    """Finds a registered node by AE title (blocking)."""

    def get(self, ae_title: str) -> RemoteNode | None: ...


class CachedNodeDirectory:
    """A :class:`NodeDirectory` whose answers (a node or none) are reused for ``ttl_seconds``."""

    def __init__(
        self,
        directory: NodeDirectory,
        ttl_seconds: float,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, RemoteNode | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ae_title: str) -> RemoteNode | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(ae_title)
            if entry is not None and entry[0] > now:
                return entry[1]
        node = self._directory.get(ae_title)  # errors are not cached
        with self._lock:
            self._entries[ae_title] = (now + self._ttl, node)
            self._entries.move_to_end(ae_title)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return node


# -- the decisions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """An admitted association: what it may ask (None: everything)."""

    permitted: frozenset[Operation] | None


class PolicyAudit(Protocol):
    """Where refusals are recorded (:class:`dimse_gateway.audit.DimseAudit`)."""

    def request_refused(
        self, assoc: Association, operation: str, sop_class_uid: str, reason: str
    ) -> None: ...


_PERMITTED_ATTRIBUTE = "_pacs_permitted_operations"


class AePolicy:
    """Decides on association requests (``EVT_REQUESTED``) and on each DIMSE request."""

    def __init__(
        self,
        settings: GatewayPolicySettings,
        ae_title: str,
        *,
        nodes: NodeDirectory | None,
        static_calling_ae_titles: Iterable[str] = (),
        require_called_ae_title: bool = True,
        metrics: GatewayMetrics | None = None,
        audit: PolicyAudit | None = None,
    ) -> None:
        if settings.mode is PolicyMode.REGISTRY and nodes is None:
            raise ValueError("the registry policy needs the node registry")
        self._settings = settings
        self._ae_title = ae_title.strip()
        self._nodes = (
            CachedNodeDirectory(nodes, settings.cache_seconds, settings.cache_max_entries)
            if nodes is not None
            else None
        )
        self._static = frozenset(t.strip() for t in static_calling_ae_titles)
        self._require_called = require_called_ae_title
        self._metrics = metrics
        self._audit = audit

    @property
    def enforcing(self) -> bool:
        return self._settings.mode is PolicyMode.REGISTRY

    def install(self, ae: AE) -> None:
        """In registry mode the policy decides on calling AE titles (the
        static list included), not pynetdicom's fixed list."""
        if self.enforcing:
            ae.require_calling_aet = []

    def handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_REQUESTED, self._on_requested)] if self.enforcing else []

    # -- association ---------------------------------------------------------

    def admit(self, calling: str, called: str, proposed: Iterable[str]) -> Admission | Rejection:
        """The decision on an A-ASSOCIATE-RQ."""
        if self._require_called and called.strip() != self._ae_title:
            return CALLED_AE_NOT_RECOGNIZED
        calling = calling.strip()
        if not self.enforcing:
            return Admission(None)
        node: RemoteNode | None = None
        if self._nodes is not None and calling:
            try:
                node = self._nodes.get(calling)
            except Exception as exc:
                logger.error("AE policy: node registry unavailable: %s", exc)
                if calling in self._static:
                    return Admission(None)
                return REGISTRY_UNAVAILABLE
        if node is None:
            return Admission(None) if calling and calling in self._static else CALLING_AE_NOT_RECOGNIZED
        permitted = frozenset(node.allowed_operations)
        if not any(operations_of_context(uid) & permitted for uid in proposed):
            return NOTHING_PERMITTED
        return Admission(permitted)

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        if request is None:
            return
        proposed = [str(cx.abstract_syntax) for cx in request.presentation_context_definition_list or []]
        decision = self.admit(str(request.calling_ae_title), str(request.called_ae_title), proposed)
        if isinstance(decision, Admission):
            setattr(assoc, _PERMITTED_ATTRIBUTE, decision.permitted)
            return
        logger.warning(
            "association refused by the AE policy",
            extra={
                "calling_ae_title": str(request.calling_ae_title),
                "called_ae_title": str(request.called_ae_title),
                "reason": decision.label,
                "peer": assoc.requestor.address,
            },
        )
        if self._metrics is not None:
            self._metrics.policy_refusals.labels("association", decision.label).inc()
        reject(assoc, request, decision)

    # -- requests ------------------------------------------------------------

    def allows_request(self, assoc: Association, msg: Any, context_id: int) -> bool:
        """True: serve ``msg``; False: it was answered 0x0124 here."""
        permitted: frozenset[Operation] | None = getattr(assoc, _PERMITTED_ATTRIBUTE, None)
        if permitted is None:
            return True
        operation = operation_of_request(msg)
        if operation is not None and operation in permitted:
            return True
        name = operation.value if operation is not None else type(msg).__name__
        sop_class = str(getattr(msg, "AffectedSOPClassUID", None) or getattr(msg, "RequestedSOPClassUID", ""))
        comment = f"{assoc.requestor.ae_title.strip()} may not {name}"
        logger.warning(
            "request refused by the AE policy",
            extra={"calling_ae_title": assoc.requestor.ae_title, "operation": name, "sop_class": sop_class},
        )
        _discard_received_dataset(msg)
        response = refusal_response(msg, NOT_AUTHORIZED, comment)
        if response is not None:
            assoc.dimse.send_msg(response, context_id)
        else:  # not a request pynetdicom can answer: end the association
            assoc.abort()
        if self._metrics is not None:
            self._metrics.policy_refusals.labels("request", name).inc()
        if self._audit is not None:
            self._audit.request_refused(assoc, name, sop_class, comment)
        return False


def reject(assoc: Association, request: A_ASSOCIATE, rejection: Rejection) -> None:
    """Send the A-ASSOCIATE-RJ from an ``EVT_REQUESTED`` handler, as
    pynetdicom's own ACSE does (EVT_REJECTED fires, the DUL stops)."""
    assoc.requestor.ae_title = str(request.calling_ae_title)
    assoc.acse.send_reject(rejection.result, rejection.source, rejection.reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def rejection_of(primitive: A_ASSOCIATE | None) -> tuple[int, int, int] | None:
    """(result, source, reason) of a sent A-ASSOCIATE-RJ."""
    if primitive is None or primitive.result in (None, 0x00):
        return None
    return int(primitive.result or 0), int(primitive.result_source or 0), int(primitive.diagnostic or 0)


def _discard_received_dataset(msg: Any) -> None:
    """A refused C-STORE's dataset was spooled to a file (chunked receive): remove it."""
    spooled = getattr(msg, "_dataset_file", None)
    if spooled is None:
        return
    with contextlib.suppress(OSError):
        spooled.close()
        os.unlink(spooled.name)


_C_RESPONSES = (C_ECHO, C_STORE, C_FIND, C_GET, C_MOVE)
_N_RESPONSES = (N_ACTION, N_CREATE, N_DELETE, N_EVENT_REPORT, N_GET, N_SET)


def refusal_response(msg: Any, status: int, comment: str) -> Any | None:
    """The response primitive answering request ``msg`` with ``status``."""
    if not isinstance(msg, (*_C_RESPONSES, *_N_RESPONSES)):
        return None
    response: Any = type(msg)()
    response.MessageIDBeingRespondedTo = msg.MessageID
    response.Status = status
    if isinstance(msg, _C_RESPONSES):
        response.AffectedSOPClassUID = msg.AffectedSOPClassUID
        if isinstance(msg, C_STORE):
            response.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
    elif isinstance(msg, N_CREATE | N_EVENT_REPORT):
        response.AffectedSOPClassUID = msg.AffectedSOPClassUID
        response.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
    else:
        response.AffectedSOPClassUID = msg.RequestedSOPClassUID
        response.AffectedSOPInstanceUID = msg.RequestedSOPInstanceUID
    if isinstance(msg, N_ACTION):
        response.ActionTypeID = msg.ActionTypeID
    if isinstance(msg, N_EVENT_REPORT):
        response.EventTypeID = msg.EventTypeID
    if hasattr(response, "ErrorComment"):
        response.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return response
