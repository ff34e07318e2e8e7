"""PACS-to-PACS synchronisation: relations, runs, conflicts (models and repository)."""

from pacs_common.sync.models import (
    ConflictPolicy,
    Direction,
    RunState,
    RunTrigger,
    ScheduleKind,
    SyncConflict,
    SyncFilter,
    SyncRelation,
    SyncRelationCreate,
    SyncRun,
)
from pacs_common.sync.repository import (
    RelationExistsError,
    RelationNotFoundError,
    RunCounts,
    RunningClaim,
    SyncRepository,
)

__all__ = [
    "ConflictPolicy",
    "Direction",
    "RelationExistsError",
    "RelationNotFoundError",
    "RunCounts",
    "RunState",
    "RunTrigger",
    "RunningClaim",
    "ScheduleKind",
    "SyncConflict",
    "SyncFilter",
    "SyncRelation",
    "SyncRelationCreate",
    "SyncRepository",
    "SyncRun",
]
