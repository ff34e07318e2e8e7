"""``python -m ai_reference`` / ``ai-reference``: the reference inference service on uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from ai_reference.app import create_app
from ai_reference.settings import ReferenceSettings

__all__ = ["main"]


def main() -> None:
    settings = ReferenceSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
