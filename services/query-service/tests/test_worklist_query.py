"""``POST /v1/worklist/query`` over the session's test database: matching
keys (columns and stored-item fallbacks), return keys, paging, refusals."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from pacs_common.query.client import InvalidQueryError
from pacs_common.query.models import WorklistQueryRequest
from pacs_common.workflow import worklist
from query_service.testing import Service, query_settings, start_service


def _s(vr: str, value: str) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


def _item(accession: str, name: str, modality: str, date: str, time: str) -> dict[str, Any]:
    return {
        "00100020": _s("LO", f"P-{accession}"),
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00080050": _s("SH", accession),
        "0020000D": _s("UI", f"1.2.3.{accession[-1]}"),
        "00400100": {
            "vr": "SQ",
            "Value": [
                {
                    "00080060": _s("CS", modality),
                    "00400001": _s("AE", f"{modality}01"),
                    "00400002": _s("DA", date),
                    "00400003": _s("TM", time),
                    "00400011": _s("SH", "Room 2" if modality == "MR" else "Room 1"),
                }
            ],
        },
    }


async def _schedule(pool: asyncpg.Pool) -> None:
    for attributes in (
        _item("A1", "Smith^Anna", "CT", "20260101", "0800"),
        _item("A2", "SMITH^BOB", "MR", "20260101", "1300"),
        _item("A3", "Jones^Carl", "CT", "20260102", "0930"),
    ):
        await worklist.add_item(pool, attributes)


async def _query(service: Service, identifier: dict[str, Any], **options: Any) -> list[dict[str, Any]]:
    stream = await service.client.worklist(WorklistQueryRequest(identifier=identifier, **options))
    return [match async for match in stream]


def _step(**keys: dict[str, Any]) -> dict[str, Any]:
    return {"00400100": {"vr": "SQ", "Value": [keys]}}


@pytest.mark.parametrize(
    ("identifier", "expected"),
    [
        ({"00080050": {"vr": "SH"}}, ["A1", "A2", "A3"]),
        ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "smith*"}]}}, ["A1", "A2"]),
        ({"0020000D": {"vr": "UI", "Value": ["1.2.3.1", "1.2.3.3"]}}, ["A1", "A3"]),
        (_step(**{"00080060": _s("CS", "CT")}), ["A1", "A3"]),
        (_step(**{"00400002": _s("DA", "20260101"), "00400003": _s("TM", "1200-")}), ["A2"]),
        (_step(**{"00400011": _s("SH", "Room 2")}), ["A2"]),  # matched on the stored item
        (_step(**{"00400001": _s("AE", "?T01")}), ["A1", "A3"]),
    ],
)
async def test_matching(
    db_pool: asyncpg.Pool, service: Service, identifier: dict[str, Any], expected: list[str]
) -> None:
    await _schedule(db_pool)
    matches = await _query(service, {"00080050": {"vr": "SH"}, **identifier})
    assert [m["00080050"]["Value"][0] for m in matches] == expected


async def test_case_sensitive_person_names_on_request(db_pool: asyncpg.Pool, service: Service) -> None:
    await _schedule(db_pool)
    name = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Smith*"}]}}
    assert len(await _query(service, name, case_insensitive_pn=False)) == 1
    assert len(await _query(service, name)) == 2


async def test_return_keys(db_pool: asyncpg.Pool, service: Service) -> None:
    await _schedule(db_pool)
    [match] = await _query(
        service,
        {
            "00080050": _s("SH", "A2"),
            "00100030": {"vr": "DA"},  # asked for, not in the item: present, empty
            **_step(**{"00080060": {"vr": "CS"}, "00400011": {"vr": "SH"}}),
        },
    )
    assert match["00100030"] == {"vr": "DA"}
    assert match["00400100"]["Value"] == [{"00080060": _s("CS", "MR"), "00400011": _s("SH", "Room 2")}]
    assert "00100010" not in match
    [whole] = await _query(service, {"00080050": _s("SH", "A2"), "00400100": {"vr": "SQ"}})
    assert "00400002" in whole["00400100"]["Value"][0]  # an empty sequence key returns whole items


async def test_paging_and_truncation(db_pool: asyncpg.Pool) -> None:
    await _schedule(db_pool)
    async with start_service(db_pool, query_settings(max_matches=2)) as capped:
        stream = await capped.client.worklist(WorklistQueryRequest(identifier={"00080050": {"vr": "SH"}}))
        matches = [m async for m in stream]
        assert len(matches) == 2
        assert stream.completion is not None and stream.completion.truncated
        assert stream.completion.max_matches == 2
        paged = await _query(capped, {"00080050": {"vr": "SH"}}, offset=2)
        assert [m["00080050"]["Value"][0] for m in paged] == ["A3"]


@pytest.mark.parametrize(
    "identifier",
    [
        _step(**{"00400002": _s("DA", "2026-13-45")}),
        {"0020000D": _s("UI", "1.2.*")},
        {"not-a-tag": {"vr": "SH"}},
    ],
)
async def test_invalid_identifiers_are_refused(service: Service, identifier: dict[str, Any]) -> None:
    with pytest.raises(InvalidQueryError) as refused:
        await _query(service, identifier)
    assert refused.value.code == "invalid-identifier"
