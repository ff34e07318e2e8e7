"""Audit events whose ``objects`` and ``details`` were stored as JSON strings.

Until this revision the audit log passed JSON text to a ``$n::jsonb``
parameter, which the pool's jsonb codec encoded once more: the columns held a
JSON *string* containing the object, so ``details->>'reason'`` found nothing.
The log now lets the server parse the text; this turns the rows written
before into the objects they always meant.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None

UPGRADE: list[str] = [
    """
    UPDATE audit_event
    SET details = (details #>> '{}')::jsonb
    WHERE jsonb_typeof(details) = 'string'
    """,
    """
    UPDATE audit_event
    SET objects = (objects #>> '{}')::jsonb
    WHERE jsonb_typeof(objects) = 'string'
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    """Nothing to undo: the objects are what the strings meant."""
