"""PACS-to-PACS sync: relations to remote nodes run on their schedule."""

from prefetch_scheduler.sync.service import run_sync
from prefetch_scheduler.sync.settings import SyncSettings

__all__ = ["SyncSettings", "run_sync"]
