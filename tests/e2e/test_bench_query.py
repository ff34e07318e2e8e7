"""The query benchmark's synthetic index is consistent: its rows say what the
synthesizer says it wrote, its aggregates agree with its instance rows, and
queries answer what the synthesized data predicts."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pacs_common.db.migrate import drop_database, upgrade
from pacs_common.localrun.runner import LocalSystem
from pacs_common.query import QueryClient
from pacs_common.query.models import QueryLevel, QueryRequest
from pacs_common.settings import DatabaseSettings
from pacs_e2e.bench_query import KINDS, http_identifier
from pacs_e2e.synthetic_index import SyntheticIndex, synthesize_index
from pacs_e2e.system import SERVER_AMQP_URL, SERVER_DB_URL, TEST_ENV

INSTANCES = 2000


@pytest.fixture(scope="module")
def synthetic() -> Iterator[tuple[str, SyntheticIndex]]:
    url = f"{SERVER_DB_URL}/pacs_e2e_synth_{uuid.uuid4().hex[:10]}"
    settings = DatabaseSettings(url=url)
    upgrade(settings)
    try:
        yield url, synthesize_index(url, INSTANCES, seed=7)
    finally:
        drop_database(settings)


def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def test_counts_match_what_was_synthesized(synthetic: tuple[str, SyntheticIndex]) -> None:
    url, index = synthetic
    (row,) = fetch(
        url,
        """SELECT (SELECT count(*) FROM patient) AS patients, (SELECT count(*) FROM study) AS studies,
                  (SELECT count(*) FROM series) AS series, (SELECT count(*) FROM instance) AS instances,
                  (SELECT count(*) FROM instance_location) AS locations,
                  (SELECT count(*) FROM instance_metadata) AS metadata""",
    )
    assert dict(row) == {
        "patients": len(index.patients),
        "studies": INSTANCES // 10,
        "series": index.series,
        "instances": INSTANCES,
        "locations": INSTANCES,
        "metadata": INSTANCES,
    }
    assert sum(s.instances for s in index.studies) == INSTANCES
    assert all(2 <= s.series <= 4 for s in index.studies)
    assert 2.5 <= len(index.studies) / len(index.patients) <= 3.5
    assert any("=" in p.patient_name for p in index.patients), "no ideographic names"
    assert len({s.modalities for s in index.studies}) > 5


def test_aggregates_agree_with_instance_rows(synthetic: tuple[str, SyntheticIndex]) -> None:
    url, _ = synthetic
    bad_series = fetch(
        url,
        """SELECT s.series_instance_uid FROM series s
           LEFT JOIN instance i ON i.series_fk = s.pk
           LEFT JOIN instance_location l ON l.instance_fk = i.pk
           GROUP BY s.pk
           HAVING s.number_of_series_related_instances <> count(i.pk)
               OR s.series_size_bytes <> coalesce(sum(l.size), 0)
               OR s.sop_classes_in_series <> array_agg(DISTINCT i.sop_class_uid ORDER BY i.sop_class_uid)""",
    )
    assert bad_series == []
    bad_studies = fetch(
        url,
        """SELECT st.study_instance_uid FROM study st JOIN series s ON s.study_fk = st.pk
           GROUP BY st.pk
           HAVING st.number_of_study_related_series <> count(s.pk)
               OR st.number_of_study_related_instances <> sum(s.number_of_series_related_instances)
               OR st.study_size_bytes <> sum(s.series_size_bytes)
               OR st.modalities_in_study <> array_agg(DISTINCT s.modality ORDER BY s.modality)
               OR st.sop_classes_in_study <> (SELECT array_agg(DISTINCT c ORDER BY c)
                                              FROM series s2, unnest(s2.sop_classes_in_series) c
                                              WHERE s2.study_fk = st.pk)""",
    )
    assert bad_studies == []
    assert (
        fetch(url, "SELECT pk FROM patient WHERE patient_name_norm IS DISTINCT FROM upper(patient_name)")
        == []
    )
    bad_instances = fetch(
        url,
        """SELECT i.sop_instance_uid FROM instance i
           JOIN series s ON s.pk = i.series_fk JOIN study st ON st.pk = s.study_fk
           JOIN instance_location l ON l.instance_fk = i.pk
           JOIN instance_metadata m ON m.instance_fk = i.pk
           WHERE l.sha256 <> i.content_sha256 OR l.tier <> 'hot'
              OR l.key <> st.study_instance_uid || '/' || s.series_instance_uid || '/' || i.sop_instance_uid || '.dcm'
              OR m.metadata -> '00080018' -> 'Value' ->> 0 <> i.sop_instance_uid
              OR length(i.sop_instance_uid) > 64 OR i.sop_class_uid IS NULL""",
    )
    assert bad_instances == []
    # nothing left for the worker's study.stable sweep
    assert fetch(url, "SELECT pk FROM study WHERE stable_announced_at IS NULL") == []


def test_identity_sequences_are_past_the_synthesized_rows(synthetic: tuple[str, SyntheticIndex]) -> None:
    url, index = synthetic
    (row,) = fetch(
        url,
        """SELECT (SELECT last_value FROM pg_sequences WHERE sequencename = 'patient_pk_seq') AS patient,
                  (SELECT last_value FROM pg_sequences WHERE sequencename = 'study_pk_seq') AS study,
                  (SELECT last_value FROM pg_sequences WHERE sequencename = 'series_pk_seq') AS series""",
    )
    assert (row["patient"], row["study"], row["series"]) == (
        len(index.patients),
        len(index.studies),
        index.series,
    )


def _sql_matches(url: str, keys: dict[str, str]) -> set[str]:
    """The same query in plain SQL over the rows."""
    where, args = ["true"], []
    for keyword, value in keys.items():
        args.append(value.upper().replace("*", "%") if keyword == "PatientName" else value)
        n = len(args)
        if keyword == "PatientName":
            where.append(
                f"EXISTS (SELECT 1 FROM unnest(string_to_array(p.patient_name_norm, '=')) g WHERE g LIKE ${n})"
            )
        elif keyword == "PatientID":
            where.append(f"p.patient_id = ${n}")
        elif keyword == "AccessionNumber":
            where.append(f"st.accession_number = ${n}")
        elif keyword == "StudyDate":
            low, _, high = value.partition("-") if "-" in value else (value, "", value)
            args[-1] = low
            args.append(high)
            where.append(f"st.study_date BETWEEN ${n} AND ${n + 1}")
        elif keyword == "ModalitiesInStudy":
            where.append(f"${n} = ANY(st.modalities_in_study)")
    rows = fetch(
        url,
        f"SELECT st.study_instance_uid FROM study st JOIN patient p ON p.pk = st.patient_fk WHERE {' AND '.join(where)}",
        *args,
    )
    return {r["study_instance_uid"] for r in rows}


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_rows_answer_the_bench_queries_as_synthesized(
    synthetic: tuple[str, SyntheticIndex], kind: Any
) -> None:
    url, index = synthetic
    rng = random.Random(kind.name)
    for _ in range(10):
        keys = kind.make(rng, index)
        expected = {s.study_instance_uid for s in index.matching(keys)}
        assert expected, f"{keys} matches nothing: the bench must pick values that exist"
        assert _sql_matches(url, keys) == expected, keys


@pytest.mark.skipif(
    importlib.util.find_spec("query_service.main") is None, reason="query-service not implemented yet"
)
def test_query_service_answers_as_synthesized(synthetic: tuple[str, SyntheticIndex], tmp_path: Path) -> None:
    url, index = synthetic
    system = LocalSystem(
        tmp_path,
        gateways=0,
        workers=0,
        query_services=1,
        database_url=url,
        broker_url=SERVER_AMQP_URL,
        namespace=f"e2e{uuid.uuid4().hex[:10]}.",
        gateway_port=0,
        http_port_base=0,
        extra_env=TEST_ENV,
        out=None,
    )
    with system:
        client = QueryClient(system.query_services[0].base_url)
        for kind in KINDS:
            rng = random.Random(kind.name)
            for _ in range(5):
                keys = kind.make(rng, index)
                request = QueryRequest(
                    level=QueryLevel.STUDY, identifier=http_identifier(keys), case_insensitive_pn=True
                )
                with client.find(request) as stream:
                    got = {m["0020000D"]["Value"][0] for m in stream}
                expected = index.matching(keys)
                assert got == {s.study_instance_uid for s in expected}, (kind.name, keys)
