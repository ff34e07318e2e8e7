"""Restores of archived objects, and last access.

At most one live (queued or running) restore job per instance: readers that
find an archived object insert ``ON CONFLICT DO NOTHING`` against this
partial unique index, so concurrent readers (API replicas, gateway threads)
never queue the same restore twice.  (Last access is recorded in the
``last_accessed_at`` columns of migration 0001.)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE: list[str] = [
    """
    CREATE UNIQUE INDEX job_restore_live_key ON job ((params->>'sop_instance_uid'))
    WHERE kind = 'restore' AND state IN ('queued', 'running')
    """,
]

DOWNGRADE: list[str] = [
    "DROP INDEX IF EXISTS job_restore_live_key",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
