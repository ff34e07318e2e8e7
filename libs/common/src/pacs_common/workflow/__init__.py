"""Workflow state in PostgreSQL: Modality Worklist items, MPPS, Storage Commitment.

The DIMSE gateway (association threads, through a blocking pool), the
query-service (worklist matching) and the ``pacs`` CLI share these
repositories; the tables are those of migration 0003.
"""

from pacs_common.workflow.commitment import (
    CommitmentOutcome,
    CommitmentRecord,
    ReferencedInstance,
    RemoteAddress,
)
from pacs_common.workflow.mpps import MppsRecord, MppsRefusal, MppsRefusedError
from pacs_common.workflow.worklist import WorklistItem, WorklistItemError

__all__ = [
    "CommitmentOutcome",
    "CommitmentRecord",
    "MppsRecord",
    "MppsRefusal",
    "MppsRefusedError",
    "ReferencedInstance",
    "RemoteAddress",
    "WorklistItem",
    "WorklistItemError",
]
