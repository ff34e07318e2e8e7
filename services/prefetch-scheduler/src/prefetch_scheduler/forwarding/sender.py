"""C-STORE of one batch over one association (blocking: run it in a thread).

The association proposes, per SOP class of the batch, one presentation
context per stored transfer syntax (so the peer can take each as it is) and
one with Explicit and Implicit VR Little Endian to fall back on.  An
instance whose stored syntax the peer accepted goes out unchanged, chunked
from its file (byte-identical; needs pynetdicom's
``STORE_SEND_CHUNKED_DATASET``, set by the service); otherwise it is
converted with :mod:`pacs_common.dicom.transcode` first.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from pacs_common.dicom.transcode import TranscodeError, choose_transfer_syntax, transcode_file
from pacs_common.nodes import RemoteNode
from prefetch_scheduler.forwarding.files import InstanceFiles, UnavailableError
from prefetch_scheduler.forwarding.metrics import ForwardMetrics
from prefetch_scheduler.forwarding.queue import ItemOutcome, ItemResult
from prefetch_scheduler.forwarding.settings import ForwardSettings

__all__ = ["AssociationFailedError", "BatchSender", "OutgoingInstance", "proposed_contexts"]

logger = logging.getLogger(__name__)

SUCCESS: Final = 0x0000
#: Presentation contexts one association may propose (PS3.8: IDs 1..255, odd).
MAX_CONTEXTS: Final = 128
ONLINE: Final = "ONLINE"
_FALLBACK: Final[tuple[str | UID, ...]] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class AssociationFailedError(Exception):
    """No association to the destination; ``str(exc)`` says why."""


@dataclass(frozen=True)
class OutgoingInstance:
    """A claimed item with where the index says its object is (None: not in the index)."""

    item_id: int
    sop_instance_uid: str
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    availability: str | None
    tier: str | None
    key: str | None


def proposed_contexts(instances: Sequence[OutgoingInstance]) -> list[PresentationContext]:
    """Per SOP class, one context per stored syntax plus a fallback one;
    one context per class offering all of them when that is too many."""
    by_class: dict[str, list[str | UID]] = {}
    for instance in instances:
        if instance.sop_class_uid is None or instance.transfer_syntax_uid is None:
            continue
        syntaxes = by_class.setdefault(instance.sop_class_uid, [])
        stored = UID(instance.transfer_syntax_uid)
        if stored not in syntaxes:
            syntaxes.append(stored)
    contexts: list[PresentationContext] = []
    for sop_class, stored_syntaxes in by_class.items():
        contexts.extend(build_context(sop_class, [ts]) for ts in stored_syntaxes)
        if rest := [ts for ts in _FALLBACK if ts not in stored_syntaxes]:
            contexts.append(build_context(sop_class, rest))
    if len(contexts) <= MAX_CONTEXTS:
        return contexts
    merged = [
        build_context(sop_class, [*syntaxes, *(ts for ts in _FALLBACK if ts not in syntaxes)])
        for sop_class, syntaxes in by_class.items()
    ]
    return merged[:MAX_CONTEXTS]


def _accepted(assoc: Association, sop_class_uid: str) -> list[UID]:
    return [
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class_uid and cx.transfer_syntax
    ]


def _disable_nagle(assoc: Association) -> None:
    """TCP_NODELAY on the association's socket: a C-STORE is a command and a
    dataset written in quick succession, and with Nagle's algorithm the
    second write waits for the peer's delayed ACK (up to 40 ms per message).
    pynetdicom does not set it."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(
    node: RemoteNode,
    contexts: list[PresentationContext],
    settings: ForwardSettings,
    ssl_context: ssl.SSLContext | None,
) -> Association:
    ae = AE(ae_title=settings.ae_title)
    ae.connection_timeout = settings.connection_timeout_seconds
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    ae.requested_contexts = contexts
    tls_args = (ssl_context, node.host) if node.tls and ssl_context is not None else None
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, tls_args=tls_args)
    if assoc.is_established:
        _disable_nagle(assoc)
        return assoc
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
        raise AssociationFailedError(
            f"association rejected by {node.ae_title}: {reason or 'no reason given'}"
        )
    raise AssociationFailedError(
        f"no association with {node.ae_title} at {node.host}:{node.port} (unreachable, aborted or timed out)"
    )


class BatchSender:
    """Sends batches to destinations; one association per batch."""

    def __init__(
        self,
        settings: ForwardSettings,
        files: InstanceFiles,
        metrics: ForwardMetrics,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._settings = settings
        self._files = files
        self._metrics = metrics
        self._ssl_context = ssl_context

    def send(self, node: RemoteNode, instances: Sequence[OutgoingInstance]) -> list[ItemResult]:
        """One result per instance; raises :class:`AssociationFailedError`
        when the destination cannot be associated with."""
        results: dict[int, ItemResult] = {}
        sendable: list[OutgoingInstance] = []
        for instance in instances:
            if instance.sop_class_uid is None or instance.tier is None or instance.key is None:
                results[instance.item_id] = ItemResult(
                    instance.item_id, ItemOutcome.FAILED, "instance no longer in the index"
                )
            elif instance.availability not in (None, ONLINE):
                availability = (instance.availability or "").lower()
                results[instance.item_id] = ItemResult(
                    instance.item_id, ItemOutcome.RETRY, f"instance {availability}, not online"
                )
            else:
                sendable.append(instance)
        if sendable:
            if node.tls and self._ssl_context is None:
                raise AssociationFailedError(f"{node.ae_title} requires TLS and no TLS context is configured")
            assoc = _associate(node, proposed_contexts(sendable), self._settings, self._ssl_context)
            try:
                for instance in sendable:
                    if not assoc.is_established:
                        results[instance.item_id] = ItemResult(
                            instance.item_id, ItemOutcome.RETRY, "association to the destination lost"
                        )
                        continue
                    results[instance.item_id] = self._send_one(assoc, instance)
            finally:
                if assoc.is_established:
                    assoc.release()
        return [results[i.item_id] for i in instances]

    def _send_one(self, assoc: Association, instance: OutgoingInstance) -> ItemResult:
        assert instance.sop_class_uid is not None and instance.transfer_syntax_uid is not None
        assert instance.tier is not None and instance.key is not None
        item = instance.item_id
        accepted = _accepted(assoc, instance.sop_class_uid)
        if not accepted:
            name = UID(instance.sop_class_uid).name
            return ItemResult(item, ItemOutcome.RETRY, f"destination accepted no context for {name}")
        syntax = choose_transfer_syntax(instance.transfer_syntax_uid, accepted)
        if syntax is None:
            stored = UID(instance.transfer_syntax_uid).name
            return ItemResult(
                item, ItemOutcome.FAILED, f"cannot convert {stored} to a syntax the destination accepts"
            )
        try:
            with self._files.local_file(instance.tier, instance.key) as path:
                if syntax == instance.transfer_syntax_uid:
                    return self._store(assoc, item, path)
                with self._files.spool_file() as converted:
                    try:
                        transcode_file(path, converted, syntax)
                    except TranscodeError as exc:
                        self._metrics.transcodes.labels("failed").inc()
                        return ItemResult(item, ItemOutcome.FAILED, str(exc))
                    self._metrics.transcodes.labels("converted").inc()
                    return self._store(assoc, item, converted)
        except UnavailableError as exc:
            return ItemResult(item, ItemOutcome.RETRY, str(exc))

    @staticmethod
    def _store(assoc: Association, item: int, path: Path) -> ItemResult:
        try:
            status = assoc.send_c_store(path)
        except (ValueError, AttributeError, RuntimeError, OSError) as exc:
            return ItemResult(item, ItemOutcome.RETRY, f"C-STORE not sent: {exc}")
        value = status.get("Status") if status is not None else None
        if value is None:
            return ItemResult(item, ItemOutcome.RETRY, "no C-STORE response")
        code = int(value)
        if code == SUCCESS:
            return ItemResult(item, ItemOutcome.SENT)
        if code == 0x0001 or 0xB000 <= code <= 0xBFFF:
            return ItemResult(item, ItemOutcome.WARNING, f"C-STORE warning 0x{code:04X}")
        return ItemResult(item, ItemOutcome.RETRY, f"C-STORE status 0x{code:04X}")
