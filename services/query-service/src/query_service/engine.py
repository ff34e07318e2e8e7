"""Running a query plan: stream matches from PostgreSQL, page, finish.

Rows come from a server-side cursor, ``fetch_size`` at a time, inside a
read-only transaction; each match is handed over as soon as it is built.
Closing the generator (the client went away: C-CANCEL) leaves the
transaction, which closes the cursor and gives the connection back.

Custom plans are forced for these statements: a generic plan cannot use a
``LIKE $1`` prefix or a range on a parameter, and the statement cache of
asyncpg would otherwise switch to one after a few executions.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from pacs_common.query.models import QueryCompletion
from query_service.metadata_match import metadata_matches
from query_service.plan import QueryPlan
from query_service.returns import build_match

__all__ = ["PLANNER_SETTINGS", "QueryOutcome", "fetch_rows", "stream_matches"]

#: Set in each query's transaction.  Custom plans: see above.  The index is
#: expected in memory (or on SSD): random reads cost little more than
#: sequential ones, which makes the planner prefer index lookups per matched
#: row to hashing whole tables.
PLANNER_SETTINGS = "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL random_page_cost = 1.1"


@dataclass(slots=True)
class QueryOutcome:
    """Filled in while a query streams: what the ``done`` line says."""

    count: int = 0
    truncated: bool = False
    cap: int = 0

    def completion(self) -> QueryCompletion:
        return QueryCompletion(
            count=self.count, truncated=self.truncated, max_matches=self.cap if self.truncated else None
        )


async def fetch_rows(
    pool: asyncpg.Pool, sql: str, params: list[Any], fetch_size: int
) -> AsyncGenerator[asyncpg.Record, None]:
    """The rows of ``sql``, read ``fetch_size`` at a time from a cursor in a
    read-only transaction with :data:`PLANNER_SETTINGS`; closing the
    generator ends the transaction."""
    async with pool.acquire() as connection, connection.transaction(readonly=True):
        await connection.execute(PLANNER_SETTINGS)
        cursor = await connection.cursor(sql, *params)
        while True:
            rows = await cursor.fetch(fetch_size)
            for row in rows:
                yield row
            if len(rows) < fetch_size:
                return


async def stream_matches(
    pool: asyncpg.Pool, plan: QueryPlan, outcome: QueryOutcome, *, fetch_size: int
) -> AsyncIterator[dict[str, Any]]:
    """The matches of ``plan``; ``outcome`` holds the count once exhausted."""
    outcome.cap = plan.cap
    skip = 0 if plan.paged_in_sql else plan.offset
    rows = fetch_rows(pool, plan.sql, plan.params, fetch_size)
    try:
        async for row in rows:
            if plan.python_filters and not metadata_matches(
                plan.python_filters,
                row["metadata"] or {},
                case_insensitive_pn=plan.case_insensitive_pn,
                fuzzy=plan.fuzzy,
            ):
                continue
            if skip:
                skip -= 1
                continue
            if outcome.count >= plan.cap:
                outcome.truncated = True
                return
            outcome.count += 1
            yield build_match(plan, dict(row.items()))
    finally:
        await rows.aclose()
