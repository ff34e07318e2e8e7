"""Storage Commitment push model requests (table ``storage_commitment``).

A request (N-ACTION) is recorded PENDING with the instances it names; the
gateway then checks each against the index and reports (N-EVENT-REPORT).
The row ends REPORTED with what succeeded and failed, or REPORT_FAILED with
the last error once the report could not be delivered after its retries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import asyncpg
from pydantic import BaseModel, ConfigDict

from pacs_common.nodes import Operation, RemoteNodeRepository

PENDING: Final = "PENDING"
REPORTED: Final = "REPORTED"
REPORT_FAILED: Final = "REPORT_FAILED"

_COLUMNS: Final = (
    "pk, transaction_uid, requester_ae_title, status, requested, succeeded, failed, report_attempts, "
    "last_error, requested_at, reported_at"
)


class ReferencedInstance(BaseModel):
    """One item of Referenced SOP Sequence (or of Failed SOP Sequence)."""

    model_config = ConfigDict(frozen=True)

    sop_class_uid: str
    sop_instance_uid: str
    # Failure Reason (0008,1197) when it failed: 0x0112, 0x0119, 0x0110...
    failure_reason: int | None = None


class CommitmentOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    succeeded: list[ReferencedInstance]
    failed: list[ReferencedInstance]


class CommitmentRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    pk: int
    transaction_uid: str
    requester_ae_title: str
    status: str
    requested: list[ReferencedInstance]
    succeeded: list[ReferencedInstance] | None
    failed: list[ReferencedInstance] | None
    report_attempts: int
    last_error: str | None
    requested_at: datetime
    reported_at: datetime | None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> CommitmentRecord:
        return cls.model_validate(dict(record))


class RemoteAddress(BaseModel):
    """Where an AE is reached (from the remote-node registry)."""

    model_config = ConfigDict(frozen=True)

    ae_title: str
    host: str
    port: int
    tls: bool = False


def _dump(instances: list[ReferencedInstance]) -> list[dict[str, Any]]:
    return [i.model_dump(exclude_none=True) for i in instances]


async def record_request(
    pool: asyncpg.Pool, transaction_uid: str, requester_ae_title: str, requested: list[ReferencedInstance]
) -> CommitmentRecord:
    """Record (or, when the requester reuses a Transaction UID, restart) a request."""
    record = await pool.fetchrow(
        f"""
        INSERT INTO storage_commitment (transaction_uid, requester_ae_title, requested)
        VALUES ($1, $2, $3)
        ON CONFLICT (requester_ae_title, transaction_uid) DO UPDATE
        SET requested = EXCLUDED.requested, status = 'PENDING', succeeded = NULL, failed = NULL,
            report_attempts = 0, last_error = NULL, requested_at = now(), reported_at = NULL
        RETURNING {_COLUMNS}
        """,
        transaction_uid,
        requester_ae_title,
        _dump(requested),
    )
    assert record is not None
    return CommitmentRecord.from_record(record)


async def stored_sop_classes(pool: asyncpg.Pool, sop_instance_uids: list[str]) -> dict[str, str]:
    """SOP Instance UID → SOP Class UID of those instances the index holds
    with a stored object."""
    records = await pool.fetch(
        """
        SELECT i.sop_instance_uid, i.sop_class_uid
        FROM instance i JOIN instance_location l ON l.instance_fk = i.pk
        WHERE i.sop_instance_uid = ANY($1::text[])
        """,
        sop_instance_uids,
    )
    return {r["sop_instance_uid"]: r["sop_class_uid"] for r in records}


async def record_outcome(pool: asyncpg.Pool, pk: int, outcome: CommitmentOutcome) -> None:
    """What the check found (before the report is sent)."""
    await pool.execute(
        "UPDATE storage_commitment SET succeeded = $2, failed = $3 WHERE pk = $1",
        pk,
        _dump(outcome.succeeded),
        _dump(outcome.failed),
    )


async def record_attempt(pool: asyncpg.Pool, pk: int, *, error: str | None, final: bool) -> None:
    """One report attempt: ``error`` None means delivered (REPORTED); a
    failed attempt records its error, and ``final`` makes it REPORT_FAILED."""
    await pool.execute(
        """
        UPDATE storage_commitment
        SET report_attempts = report_attempts + 1,
            last_error = $2,
            status = CASE WHEN $2::text IS NULL THEN 'REPORTED'
                          WHEN $3 THEN 'REPORT_FAILED' ELSE status END,
            reported_at = CASE WHEN $2::text IS NULL THEN now() ELSE reported_at END
        WHERE pk = $1
        """,
        pk,
        error,
        final,
    )


async def get(pool: asyncpg.Pool, requester_ae_title: str, transaction_uid: str) -> CommitmentRecord | None:
    record = await pool.fetchrow(
        f"""
        SELECT {_COLUMNS} FROM storage_commitment
        WHERE requester_ae_title = $1 AND transaction_uid = $2
        """,
        requester_ae_title,
        transaction_uid,
    )
    return None if record is None else CommitmentRecord.from_record(record)


async def list_pending(pool: asyncpg.Pool, *, limit: int = 100) -> list[CommitmentRecord]:
    """Requests not reported yet (e.g. the gateway stopped meanwhile), oldest first."""
    records = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM storage_commitment WHERE status = 'PENDING'
        ORDER BY requested_at LIMIT $1
        """,
        limit,
    )
    return [CommitmentRecord.from_record(r) for r in records]


async def find_remote_node(pool: asyncpg.Pool, ae_title: str) -> RemoteAddress | None:
    """The registry's address of ``ae_title`` (``pacs_common.nodes``), if it
    is registered and allowed to ask for storage commitment."""
    node = await RemoteNodeRepository(pool).get(ae_title)
    if node is None or not node.allows(Operation.COMMITMENT):
        return None
    return RemoteAddress(ae_title=node.ae_title, host=node.host, port=node.port, tls=node.tls)
