"""Reading the index the way a test checks it: plain SQL against PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import asyncpg


class IndexReader:
    def __init__(self, database_url: str) -> None:
        self._url = database_url

    def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self._url)
            try:
                return [dict(r) for r in await conn.fetch(query, *args)]
            finally:
                await conn.close()

        return asyncio.run(run())

    def instances(self, sop_uids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        query = """
            SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.instance_number,
                   i.content_sha256, se.series_instance_uid, se.modality, se.series_number,
                   st.study_instance_uid, st.accession_number, st.study_date,
                   p.patient_id, p.patient_name,
                   l.tier, l.backend, l.key, l.size, l.sha256
            FROM instance i
            JOIN series se ON se.pk = i.series_fk
            JOIN study st ON st.pk = se.study_fk
            JOIN patient p ON p.pk = st.patient_fk
            JOIN instance_location l ON l.instance_fk = i.pk
        """
        if sop_uids is None:
            rows = self.fetch(query)
        else:
            rows = self.fetch(query + " WHERE i.sop_instance_uid = ANY($1::text[])", list(sop_uids))
        return {r["sop_instance_uid"]: r for r in rows}

    def count_instances(self, sop_uids: Iterable[str]) -> int:
        rows = self.fetch(
            "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = ANY($1::text[])", list(sop_uids)
        )
        return int(rows[0]["n"])

    def wait_for_instances(self, sop_uids: Iterable[str], timeout: float = 120) -> dict[str, dict[str, Any]]:
        """Wait until every UID is indexed; returns their rows (fails on timeout)."""
        wanted = set(sop_uids)
        deadline = time.monotonic() + timeout
        while True:
            if self.count_instances(wanted) >= len(wanted):
                return self.instances(wanted)
            if time.monotonic() > deadline:
                missing = wanted - set(self.instances(wanted))
                raise AssertionError(
                    f"{len(missing)} of {len(wanted)} instances not indexed after {timeout}s"
                )
            time.sleep(0.2)
