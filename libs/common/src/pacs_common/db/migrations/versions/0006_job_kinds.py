"""Job kinds of the background services.

The hsm-migrator restores archived objects (``restore``), the routing
forwarder sends instances to remote AEs (``forward``) and the scheduler
records its maintenance runs (``maintenance``) as jobs beside the kinds of
migration 0005.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS_0005 = "'move', 'prefetch', 'migration', 'ai', 'export'"
_KINDS_0006 = f"{_KINDS_0005}, 'restore', 'forward', 'maintenance'"

UPGRADE: list[str] = [
    "ALTER TABLE job DROP CONSTRAINT job_kind_check",
    f"ALTER TABLE job ADD CONSTRAINT job_kind_check CHECK (kind IN ({_KINDS_0006}))",
    # Workers look up the jobs of one subject (a study, a destination, a task).
    "CREATE INDEX job_kind_params_idx ON job USING gin (params jsonb_path_ops)",
]

DOWNGRADE: list[str] = [
    "DROP INDEX IF EXISTS job_kind_params_idx",
    "DELETE FROM job WHERE kind IN ('restore', 'forward', 'maintenance')",
    "ALTER TABLE job DROP CONSTRAINT job_kind_check",
    f"ALTER TABLE job ADD CONSTRAINT job_kind_check CHECK (kind IN ({_KINDS_0005}))",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
