"""The PostgreSQL index: connection pool (:mod:`.pool`), schema migrations
(:mod:`.migrate`, alembic revisions under ``migrations/``) and the write
side of the index (:mod:`.index`).

Nothing is imported here, so ``pacs migrate`` does not pay for pydicom and
the services do not pay for alembic.
"""
