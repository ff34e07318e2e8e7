"""Content digests: the sha256 of an instance's dataset as encoded (the
Part 10 file meta header left out, since each receiver writes its own), for
our stored objects and for the remote's copies fetched with C-GET (blocking:
callers run these in a thread)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from prefetch_scheduler.forwarding.sender import MAX_CONTEXTS, OutgoingInstance, proposed_contexts
from prefetch_scheduler.prefetch.dimse import (
    PENDING,
    AssociationFailedError,
    DimseTimeouts,
    OperationFailedError,
    Peer,
    checked_responses,
)

__all__ = ["Digest", "RemoteContent", "dataset_digest"]

_CHUNK: Final = 1 << 20
_GROUP_LENGTH_TAG: Final = b"\x02\x00\x00\x00"
SUCCESS: Final = 0x0000


@dataclass(frozen=True)
class Digest:
    transfer_syntax_uid: str
    sha256: str


def _skip_file_meta(stream: BinaryIO) -> None:
    head = stream.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        stream.seek(0)  # no Part 10 header: the whole stream is the dataset
        return
    element = stream.read(12)
    if element[:4] != _GROUP_LENGTH_TAG or element[4:6] != b"UL":
        raise ValueError("file meta header without a group length")
    (length,) = struct.unpack("<I", element[8:12])
    stream.seek(132 + 12 + length)


def dataset_digest(path: Path) -> str:
    """sha256 of the dataset of a Part 10 file (after its file meta header)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        _skip_file_meta(stream)
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class RemoteContent:
    """C-GET of some instances of a series; keeps only their digests."""

    def __init__(self, calling_ae_title: str, timeouts: DimseTimeouts) -> None:
        self._calling = calling_ae_title
        self._timeouts = timeouts

    def digests(
        self,
        peer: Peer,
        study_instance_uid: str,
        series_instance_uid: str,
        instances: Sequence[OutgoingInstance],
    ) -> dict[str, Digest]:
        """SOP Instance UID → digest of what the remote sent, for ``instances``
        (ours: their SOP classes and stored syntaxes are proposed)."""
        found: dict[str, Digest] = {}

        def on_store(event: Any) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            data = event.request.DataSet.getvalue()
            found[uid] = Digest(str(event.context.transfer_syntax), hashlib.sha256(data).hexdigest())
            return SUCCESS

        ae = AE(ae_title=self._calling)
        ae.connection_timeout = self._timeouts.connect
        ae.acse_timeout = self._timeouts.connect
        ae.dimse_timeout = self._timeouts.move
        ae.network_timeout = self._timeouts.move
        storage = proposed_contexts(instances)[: MAX_CONTEXTS - 1]
        ae.requested_contexts = [build_context(StudyRootQueryRetrieveInformationModelGet), *storage]
        classes = {c.abstract_syntax for c in storage if c.abstract_syntax is not None}
        roles: list[Any] = [build_role(uid, scp_role=True) for uid in classes]
        tls_args = (peer.ssl_context, peer.host) if peer.ssl_context is not None else None
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
            tls_args=tls_args,
        )
        if not assoc.is_established:
            raise AssociationFailedError(f"no association with {peer} for C-GET")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study_instance_uid
        identifier.SeriesInstanceUID = series_instance_uid
        identifier.SOPInstanceUID = [i.sop_instance_uid for i in instances]
        try:
            context = StudyRootQueryRetrieveInformationModelGet
            for status, _ in checked_responses(assoc.send_c_get(identifier, context), peer, "C-GET"):
                code = int(status.Status)
                if code not in PENDING and code not in (SUCCESS, 0xB000):
                    raise OperationFailedError(f"C-GET at {peer}: status 0x{code:04X}")
        finally:
            assoc.release()
        return found
