"""The management REST API (mounted under ``/api/v1``): one router per
resource, each route declaring the permission it needs."""

from __future__ import annotations

from fastapi import APIRouter

from dicomweb_api.api import archive, deletion, nodes, system, worklist


def create_router() -> APIRouter:
    router = APIRouter()
    for module in (system, archive, deletion, nodes, worklist):
        router.include_router(module.create_router())
    return router
