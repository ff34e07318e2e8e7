"""What every route needs, handed to the app once (no globals).

``create_app`` stores an :class:`ApiContext` in ``app.state.context``;
routes get it with ``Depends(get_context)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from fastapi import Request

from dicomweb_api.settings import DicomwebSettings
from pacs_common.archive.requests import RestoreRequester
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.storage import StorageRegistry


class AccessRecorder(Protocol):
    """Where retrievals note what they read (last access; no I/O on the call)."""

    def record(self, study_instance_uid: str, sop_instance_uids: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class ApiContext:
    settings: DicomwebSettings
    # The index (read for WADO/metadata lookups, written by DELETE and the REST API).
    pool: asyncpg.Pool
    # The query engine (QIDO-RS, instance lists).
    query: AsyncQueryClient
    # Every configured storage tier, by name.
    storage: StorageRegistry
    # The ingest contract STOW-RS shares with C-STORE (blocking: call it in a thread).
    receiver: InstanceReceiver
    # Last access of what WADO-RS reads (None: not recorded).
    access: AccessRecorder | None = None
    # Restores of archived instances (None: one without metrics on ``pool``).
    restores: RestoreRequester | None = None
    # Retry-After of a 503 for an instance that is being restored.
    retry_after_seconds: int = 300

    @property
    def restore_requester(self) -> RestoreRequester:
        return self.restores or RestoreRequester(self.pool, requested_by="dicomweb-api")

    def record_access(self, study_instance_uid: str, sop_instance_uids: Iterable[str]) -> None:
        if self.access is not None:
            self.access.record(study_instance_uid, sop_instance_uids)


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context
