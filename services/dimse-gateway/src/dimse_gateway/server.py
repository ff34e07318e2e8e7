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

Every DIMSE request first passes the server's :data:`RequestGuard` (the
AE-title policy's per-node permissions, :mod:`dimse_gateway.policy`).

:func:`start_listeners` serves the plain port and, when configured, the
DICOM TLS port (:mod:`dimse_gateway.tls`) from the same AE with the same
handlers; the TLS handshake runs in each connection's thread.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dimse_gateway.capacity import prepare_for_many_associations
from dimse_gateway.identifiers import FIND_MODELS, GET_MODELS, MOVE_MODELS
from dimse_gateway.sockets import disable_nagle
from dimse_gateway.tls import (
    GatewayTlsSettings,
    HandshakeFailureHandler,
    classify,
    complete_handshake,
    server_context,
    wrap_accepted,
)
from pacs_common.settings import GatewaySettings

logger = logging.getLogger(__name__)

#: The Q/R SOP classes the gateway serves (Patient Root and Study Root; FIND, MOVE, GET).
QUERY_RETRIEVE_SOP_CLASSES: tuple[str, ...] = (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)

MoveService = Callable[[Association, C_MOVE, PresentationContext], None]
GetService = Callable[[Association, C_GET, PresentationContext], None]
FindService = Callable[[Event], Iterator[tuple[int | Dataset, Dataset | None]]]
#: Decides whether a DIMSE request is served: True → served; False → the guard answered it.
RequestGuard = Callable[[Association, Any, int], bool]

_UNABLE_TO_PROCESS = 0xC000
#: The largest PDU read when the gateway's maximum PDU size is unlimited (0).
UNLIMITED_PDU_READ_BYTES = 64 * 1024 * 1024
#: A-ASSOCIATE-RQ and the like are not bound by the P-DATA maximum: never refuse one below this.
MIN_PDU_READ_BYTES = 1024 * 1024
T_Server = TypeVar("T_Server", bound="ReusePortAssociationServer")


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
        guard = server.request_guard if isinstance(server, ReusePortAssociationServer) else None
        if (
            guard is not None
            and msg.is_valid_request
            and context_id in self._accepted_cx
            and not self._sent_release
            and not guard(self, msg, context_id)
        ):
            return
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


class BoundedAssociationSocket(AssociationSocket):
    """pynetdicom reads a PDU by allocating as it receives, up to whatever
    length the peer claims (4 GiB), and blocks in that read with no timeout
    (a peer that stops mid-PDU holds the association's threads and slot
    forever; ARTIM cannot end it).  Here a PDU longer than
    ``max_pdu_read_bytes`` ends the connection (PS3.8 9.3.1: a PDU beyond
    the negotiated maximum is a protocol error), and a read stalls at most
    the socket's timeout (the gateway's network timeout)."""

    max_pdu_read_bytes: int = UNLIMITED_PDU_READ_BYTES

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu_read_bytes:
            # The DUL treats this as the connection closing (Evt17).
            raise OSError(f"PDU of {nr_bytes} bytes refused (at most {self.max_pdu_read_bytes})")
        return super().recv(nr_bytes)


def pdu_read_limit(max_pdu_bytes: int) -> int:
    """The longest PDU the gateway reads, for its configured maximum PDU length."""
    if max_pdu_bytes <= 0:
        return UNLIMITED_PDU_READ_BYTES
    return max(max_pdu_bytes + 6, MIN_PDU_READ_BYTES)


class GatewayRequestHandler(RequestHandler):
    """Creates :class:`GatewayAssociation` objects for accepted connections,
    after the TLS handshake on the TLS listener."""

    def handle(self) -> None:
        server = self.server
        sock = self.request
        if isinstance(server, TlsAssociationServer) and isinstance(sock, ssl.SSLSocket):
            address = f"{self.client_address[0]}:{self.client_address[1]}"
            try:
                complete_handshake(sock, server.handshake_timeout_seconds)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                server.report_handshake_failure(address, exc)
                server.shutdown_request(sock)
                return
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds and configures a plain Association; ours adds no
        # state, only request routing, so switching its class before the
        # association's thread starts is safe.
        assoc.__class__ = GatewayAssociation
        transport = assoc.dul.socket
        if transport is not None:
            transport.__class__ = BoundedAssociationSocket
            cast(BoundedAssociationSocket, transport).max_pdu_read_bytes = pdu_read_limit(
                self.ae.maximum_pdu_size
            )
            if transport.socket is not None and self.ae.network_timeout is not None:
                transport.socket.settimeout(self.ae.network_timeout)
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
    request_guard: RequestGuard | None = None

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


class TlsAssociationServer(ReusePortAssociationServer):
    """The DICOM TLS listener: accepts without handshaking (the connection's
    thread does it, bounded, see :class:`GatewayRequestHandler`)."""

    handshake_timeout_seconds: float = 10.0
    on_handshake_failure: HandshakeFailureHandler | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        context = self.ssl_context
        if context is None:
            return client, address
        return wrap_accepted(context, client), address

    def report_handshake_failure(self, address: str, exc: BaseException) -> None:
        reason = classify(exc)
        logger.warning(
            "TLS handshake failed", extra={"peer": address, "reason": reason.value, "detail": str(exc)}
        )
        callback = self.on_handshake_failure
        if callback is not None:
            try:
                callback(address, reason, str(exc))
            except Exception:
                logger.exception("TLS handshake failure not recorded")


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
    guard: RequestGuard | None = None,
) -> ReusePortAssociationServer:
    """Bind and serve in a background thread; returns the running server."""

    class GatewayServer(ReusePortAssociationServer):
        reuse_port = settings.reuse_port
        retrieve_handlers = retrieve

    server = cast(
        ReusePortAssociationServer,
        ae.make_server(
            (settings.host, settings.port),
            evt_handlers=handlers,
            server_class=GatewayServer,
            request_handler=GatewayRequestHandler,
        ),
    )
    server.request_guard = guard  # before serving: no connection is handled yet
    prepare_for_many_associations(server, settings.max_associations)
    return _serve_in_background(ae, server, "dimse-acceptor")


def start_tls_server(
    ae: AE,
    settings: GatewaySettings,
    tls: GatewayTlsSettings,
    handlers: list[EventHandlerType],
    *,
    retrieve: RetrieveHandlers | None = None,
    guard: RequestGuard | None = None,
    on_handshake_failure: HandshakeFailureHandler | None = None,
) -> TlsAssociationServer:
    """The DICOM TLS listener on ``tls.port``, with the plain listener's handlers."""

    class GatewayTlsServer(TlsAssociationServer):
        reuse_port = settings.reuse_port
        retrieve_handlers = retrieve
        handshake_timeout_seconds = tls.handshake_timeout_seconds

    server = cast(
        TlsAssociationServer,
        ae.make_server(
            (tls.host or settings.host, tls.port),
            evt_handlers=handlers,
            ssl_context=server_context(tls),
            server_class=GatewayTlsServer,
            request_handler=GatewayRequestHandler,
        ),
    )
    server.request_guard = guard
    server.on_handshake_failure = on_handshake_failure
    prepare_for_many_associations(server, settings.max_associations)
    return _serve_in_background(ae, server, "dimse-tls-acceptor")


def _serve_in_background(ae: AE, server: T_Server, name: str) -> T_Server:
    # pynetdicom's own start_server registers the server so that shutdown() can deregister it.
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return server


class GatewayListeners:
    """The plain listener and, when configured, the TLS one: shut down and
    counted together."""

    def __init__(self, plain: ReusePortAssociationServer, tls: TlsAssociationServer | None = None) -> None:
        self.plain = plain
        self.tls = tls

    @property
    def servers(self) -> list[ReusePortAssociationServer]:
        return [self.plain] if self.tls is None else [self.plain, self.tls]

    @property
    def active_associations(self) -> list[Association]:
        return [assoc for server in self.servers for assoc in server.active_associations]

    def shutdown(self) -> None:
        for server in self.servers:
            server.shutdown()


def start_listeners(
    ae: AE,
    settings: GatewaySettings,
    tls: GatewayTlsSettings,
    handlers: list[EventHandlerType],
    retrieve: RetrieveHandlers | None = None,
    *,
    guard: RequestGuard | None = None,
    on_handshake_failure: HandshakeFailureHandler | None = None,
) -> GatewayListeners:
    """The plain listener, and the TLS listener when ``tls`` is active."""
    plain = start_server(ae, settings, handlers, retrieve, guard)
    if not tls.active:
        return GatewayListeners(plain)
    try:
        secure = start_tls_server(
            ae,
            settings,
            tls,
            handlers,
            retrieve=retrieve,
            guard=guard,
            on_handshake_failure=on_handshake_failure,
        )
    except Exception:
        plain.shutdown()
        raise
    logger.info("DICOM TLS listening", extra={"port": secure.server_address[1]})
    return GatewayListeners(plain, secure)
