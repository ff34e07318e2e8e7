"""The pynetdicom Application Entity, its listening server, and request routing.

Two routing points, both easy to extend:

* C-FIND: pynetdicom allows one ``EVT_C_FIND`` handler; :class:`FindRouter`
  dispatches by SOP class (the Q/R Find classes to
  :class:`dimse_gateway.find.FindHandler`, Modality Worklist to its own).
* C-MOVE / C-GET: served outside pynetdicom's handler protocol (see
  :mod:`dimse_gateway.sending` for why).  The server creates
  :class:`GatewayAssociation` objects, which hand C-MOVE and C-GET requests to the
  :class:`RetrieveHandlers` given to :func:`start_server`, and every other
  request to pynetdicom as usual.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dimse_gateway.identifiers import FIND_MODELS, GET_MODELS, MOVE_MODELS
from dimse_gateway.sockets import disable_nagle
from pacs_common.settings import GatewaySettings

logger = logging.getLogger(__name__)

#: The Q/R SOP classes the gateway serves (Patient Root and Study Root; FIND, MOVE, GET).
QUERY_RETRIEVE_SOP_CLASSES: tuple[str, ...] = (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)

MoveService = Callable[[Association, C_MOVE, PresentationContext], None]
GetService = Callable[[Association, C_GET, PresentationContext], None]
FindService = Callable[[Event], Iterator[tuple[int | Dataset, Dataset | None]]]

_UNABLE_TO_PROCESS = 0xC000


@dataclass(frozen=True)
class RetrieveHandlers:
    """Who serves C-MOVE and C-GET requests (None: pynetdicom's default,
    which answers that no handler is bound)."""

    move: MoveService | None = None
    get: GetService | None = None


class GatewayAssociation(Association):
    """An acceptor association that serves C-MOVE and C-GET through
    :class:`RetrieveHandlers`; everything else goes to pynetdicom."""

    def _serve_request(self, msg: Any, context_id: int) -> None:
        server = self._server
        handlers = server.retrieve_handlers if isinstance(server, ReusePortAssociationServer) else None
        handler: Callable[[Association, Any, PresentationContext], None] | None = None
        if handlers is not None and isinstance(msg, C_MOVE):
            handler = handlers.move
        elif handlers is not None and isinstance(msg, C_GET):
            handler = handlers.get
        context = self._accepted_cx.get(context_id)
        if handler is None or context is None or self._sent_release or not msg.is_valid_request:
            super()._serve_request(msg, context_id)  # also: aborts on an unknown context
            return
        # What pynetdicom's _serve_request does around a service class: a
        # clean C-CANCEL slate, and the reactor marked paused so that
        # send_c_store (C-GET sub-operations) may use the DIMSE queue.
        self.dimse.cancel_req = {}
        self._is_paused = True
        try:
            handler(self, msg, context)
        except Exception:
            logger.exception("unhandled error serving %s", type(msg).__name__)
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}


class GatewayRequestHandler(RequestHandler):
    """Creates :class:`GatewayAssociation` objects for accepted connections."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds and configures a plain Association; ours adds no
        # state, only request routing, so switching its class before the
        # association's thread starts is safe.
        assoc.__class__ = GatewayAssociation
        disable_nagle(assoc)
        return assoc


class FindRouter:
    """The one ``EVT_C_FIND`` handler: dispatches by Affected SOP Class UID."""

    def __init__(self, services: Mapping[str, FindService]) -> None:
        self._services = dict(services)

    def __call__(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", ""))
        service = self._services.get(sop_class)
        if service is None:
            status = Dataset()
            status.Status = _UNABLE_TO_PROCESS
            status.ErrorComment = "no C-FIND service for this SOP class"
            yield status, None
            return
        yield from service(event)


class ReusePortAssociationServer(ThreadedAssociationServer):
    """Lets several gateway processes listen on one port (SO_REUSEPORT), so a
    pod uses all its cores despite the GIL, and sets TCP_NODELAY."""

    reuse_port = True
    retrieve_handlers: RetrieveHandlers | None = None

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def build_ae(settings: GatewaySettings, extra_sop_classes: Iterable[str] = ()) -> AE:
    """An AE that accepts Verification, every storage SOP class pynetdicom
    knows in every transfer syntax, the Q/R FIND/MOVE/GET classes of both
    models, and ``extra_sop_classes`` (worklist, MPPS, commitment…), with the
    configured limits.

    Storage contexts accept SCU/SCP role selection as proposed, so a C-GET
    requestor that proposes the SCP role receives its instances on them.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    ae.require_called_aet = settings.require_called_ae_title
    if settings.allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(
            cast(str, context.abstract_syntax), ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    for sop_class in (*QUERY_RETRIEVE_SOP_CLASSES, *extra_sop_classes):
        ae.add_supported_context(sop_class, DEFAULT_TRANSFER_SYNTAXES)
    return ae


def start_server(
    ae: AE,
    settings: GatewaySettings,
    handlers: list[EventHandlerType],
    retrieve: RetrieveHandlers | None = None,
) -> ReusePortAssociationServer:
    """Bind and serve in a background thread; returns the running server."""

    class GatewayServer(ReusePortAssociationServer):
        reuse_port = settings.reuse_port
        retrieve_handlers = retrieve

    server = ae.make_server(
        (settings.host, settings.port),
        evt_handlers=handlers,
        server_class=GatewayServer,
        request_handler=GatewayRequestHandler,
    )
    # pynetdicom's own start_server registers the server so that shutdown() can deregister it.
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True)
    thread.start()
    return cast(ReusePortAssociationServer, server)
