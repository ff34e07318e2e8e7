"""TCP options for DICOM associations.

DIMSE messages are small writes in quick succession (a command, then its
dataset): with Nagle's algorithm on, the second write waits for the peer's
delayed ACK, up to 40 ms per message.  pynetdicom sets no TCP_NODELAY, so
every association the gateway opens or accepts gets it here.
"""

from __future__ import annotations

import contextlib
import socket

from pynetdicom.association import Association


def disable_nagle(assoc: Association) -> None:
    """Set TCP_NODELAY on ``assoc``'s socket (no-op when it has none)."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
