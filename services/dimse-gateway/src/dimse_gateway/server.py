"""The pynetdicom Application Entity and its listening server."""

from __future__ import annotations

import socket
import threading
from typing import cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacs_common.settings import GatewaySettings


class ReusePortAssociationServer(ThreadedAssociationServer):
    """Lets several gateway processes listen on one port (SO_REUSEPORT), so a
    pod uses all its cores despite the GIL, and sets TCP_NODELAY."""

    reuse_port = True

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def build_ae(settings: GatewaySettings) -> AE:
    """An AE that accepts Verification and every storage SOP class pynetdicom
    knows, in every transfer syntax, with the configured limits."""
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
        ae.add_supported_context(cast(str, context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    return ae


def start_server(
    ae: AE, settings: GatewaySettings, handlers: list[EventHandlerType]
) -> ReusePortAssociationServer:
    """Bind and serve in a background thread; returns the running server."""

    class GatewayServer(ReusePortAssociationServer):
        reuse_port = settings.reuse_port

    server = ae.make_server((settings.host, settings.port), evt_handlers=handlers, server_class=GatewayServer)
    # pynetdicom's own start_server registers the server so that shutdown() can deregister it.
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True)
    thread.start()
    return cast(ReusePortAssociationServer, server)
