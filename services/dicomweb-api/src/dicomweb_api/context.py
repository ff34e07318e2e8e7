"""What every route needs, handed to the app once (no globals).

``create_app`` stores an :class:`ApiContext` in ``app.state.context``;
routes get it with ``Depends(get_context)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from fastapi import Request

from dicomweb_api.settings import DicomwebSettings
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.storage import StorageRegistry


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


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context
