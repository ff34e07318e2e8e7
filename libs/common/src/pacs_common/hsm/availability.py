"""Instance availability (PS3.4 C.4.23 Instance Availability) and its
aggregates on series and study.

An instance is ``ONLINE`` when its object can be read at once, ``NEARLINE``
when it sits in an archive tier that must restore it first, ``OFFLINE``
when an operator must act.  A series or study is as available as its least
available instance (``UNAVAILABLE`` < ``OFFLINE`` < ``NEARLINE`` < ``ONLINE``).

Lock order follows the indexer's (instance rows, then study rows, then
series rows, each in UID order), so a change of availability and an
indexing batch on the same study serialize and never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["Availability", "set_availability"]

Connection = asyncpg.Connection | PoolConnectionProxy


class Availability(StrEnum):
    ONLINE = "ONLINE"
    NEARLINE = "NEARLINE"
    OFFLINE = "OFFLINE"
    UNAVAILABLE = "UNAVAILABLE"


#: SQL ranking of availability values: lower is less available.
_RANK: Final = (
    "CASE {column} WHEN 'UNAVAILABLE' THEN 0 WHEN 'OFFLINE' THEN 1 WHEN 'NEARLINE' THEN 2 ELSE 3 END"
)
#: From a rank back to its value.
_VALUE: Final = "(ARRAY['UNAVAILABLE', 'OFFLINE', 'NEARLINE', 'ONLINE'])[{rank} + 1]"
_LEAST: Final = _VALUE.format(rank="min(" + _RANK.format(column="i.availability") + ")")


async def set_availability(connection: Connection, instance_pks: Sequence[int], availability: str) -> None:
    """Set ``instance.availability`` of ``instance_pks`` and recompute the
    availability of their series and studies.

    Runs in a transaction of its own, or in the caller's when one is open
    (a savepoint then), so the change commits together with what the caller
    does (e.g. the switch of an instance's location).
    """
    value = Availability(availability).value
    pks = sorted({int(pk) for pk in instance_pks})
    if not pks:
        return
    async with connection.transaction():
        rows = await connection.fetch(
            """
            SELECT i.pk FROM instance i
            WHERE i.pk = ANY($1::bigint[])
            ORDER BY i.sop_instance_uid
            FOR UPDATE
            """,
            pks,
        )
        if not rows:
            return
        await connection.execute(
            """
            UPDATE instance SET availability = $2, updated_at = now()
            WHERE pk = ANY($1::bigint[]) AND availability <> $2
            """,
            pks,
            value,
        )
        # Studies first (the indexer's order), each from all of its instances.
        await connection.execute(
            f"""
            WITH target AS (
                SELECT st.pk FROM study st
                WHERE st.pk IN (
                    SELECT se.study_fk FROM series se JOIN instance i ON i.series_fk = se.pk
                    WHERE i.pk = ANY($1::bigint[])
                )
                ORDER BY st.study_instance_uid
                FOR UPDATE
            ),
            least AS (
                SELECT se.study_fk AS pk, {_LEAST} AS availability
                FROM series se JOIN instance i ON i.series_fk = se.pk
                WHERE se.study_fk IN (SELECT pk FROM target)
                GROUP BY se.study_fk
            )
            UPDATE study st SET availability = least.availability, updated_at = now()
            FROM least
            WHERE st.pk = least.pk AND st.availability <> least.availability
            """,
            pks,
        )
        await connection.execute(
            f"""
            WITH target AS (
                SELECT se.pk FROM series se
                WHERE se.pk IN (SELECT i.series_fk FROM instance i WHERE i.pk = ANY($1::bigint[]))
                ORDER BY se.series_instance_uid
                FOR UPDATE
            ),
            least AS (
                SELECT i.series_fk AS pk, {_LEAST} AS availability
                FROM instance i
                WHERE i.series_fk IN (SELECT pk FROM target)
                GROUP BY i.series_fk
            )
            UPDATE series se SET availability = least.availability, updated_at = now()
            FROM least
            WHERE se.pk = least.pk AND se.availability <> least.availability
            """,
            pks,
        )
