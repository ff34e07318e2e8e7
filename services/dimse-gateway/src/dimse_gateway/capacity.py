"""Make a pynetdicom association server cope with many associations at once.

Two of pynetdicom's defaults limit how many peers can connect together:

* each accepted association gets a deep copy of the server's supported
  presentation contexts (``transport.RequestHandler._create_association``).
  The gateway supports 180 abstract syntaxes with 7,700 transfer syntaxes in
  all: one copy costs ~130 ms of CPU under the GIL and ~1.3 MB, so 200
  modalities connecting together need a minute of CPU and time out.
  Negotiation (``presentation.negotiate_as_acceptor``) only reads the
  contexts, so one list serves every association;
* the listen backlog is 5 (``socketserver``'s ``request_queue_size``): in a
  burst of connects the kernel drops the SYNs beyond it and the peers wait
  for retransmits (1 s, 3 s, 7 s ...).
"""

from __future__ import annotations

from typing import Any

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationServer

__all__ = ["SharedContexts", "prepare_for_many_associations"]

#: Smallest listen backlog set (the kernel caps it at net.core.somaxconn).
MIN_LISTEN_BACKLOG = 128


class SharedContexts(list[PresentationContext]):
    """A context list whose deep copy is a new list of the same (read-only) contexts."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


def prepare_for_many_associations(server: AssociationServer, max_associations: int) -> None:
    """Share the supported contexts and widen the listen backlog of a
    running ``server`` (calling listen() again on a listening socket only
    changes its backlog)."""
    server.contexts = SharedContexts(server.contexts)
    if server.socket is not None:
        server.socket.listen(max(max_associations, MIN_LISTEN_BACKLOG))
