"""``/hsm``: (being written)."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["create_router"]


def create_router() -> APIRouter:
    return APIRouter()
