"""Data stored in many Specific Character Sets is found by Unicode identifiers
(pydicom's charset test files, indexed as the ingest worker does)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from pydicom.data import get_charset_files

from pacs_common.query.models import QueryLevel, QueryRequest
from query_service.testing import Service, find_all, index_files, values

FILES = ("chrFren", "chrGerm", "chrGreek", "chrRuss", "chrArab", "chrHbrw", "chrH31", "chrH32",
         "chrI2", "chrJapMulti", "chrKoreanMulti", "chrX1", "chrX2")  # fmt: skip


def _paths() -> list[str]:
    by_name = {path.rsplit("/", 1)[-1].removesuffix(".dcm"): path for path in get_charset_files()}
    return [by_name[name] for name in FILES]


@pytest.fixture
async def charset_files(db_pool: asyncpg.Pool) -> None:
    await index_files(db_pool, _paths())


async def _patients(service: Service, name: dict[str, str], **options: Any) -> list[str]:
    request = QueryRequest(
        level=QueryLevel.STUDY,
        identifier={"00100010": {"vr": "PN", "Value": [name]}, "00100020": {"vr": "LO"}},
        **options,
    )
    matches, _ = await find_all(service.client, request)
    return sorted(values(matches, "00100020"))


@pytest.mark.usefixtures("charset_files")
@pytest.mark.parametrize(
    ("name", "patient_ids"),
    [
        ({"Alphabetic": "Buc^Jérôme"}, ["SCSFREN"]),  # ISO_IR 100
        ({"Alphabetic": "buc^jÉrÔme"}, ["SCSFREN"]),  # case-insensitive beyond ASCII
        ({"Alphabetic": "Äneas^*"}, ["SCSGERM"]),
        ({"Alphabetic": "διονυσιος"}, ["SCSGREEK"]),  # ISO_IR 126
        ({"Alphabetic": "Люкceмбypг"}, ["SCSRUSS"]),  # ISO_IR 144
        ({"Alphabetic": "قباني^لنزار"}, ["SCSARAB"]),  # ISO_IR 127
        ({"Alphabetic": "שרון^דבורה"}, ["SCSHBRW"]),  # ISO_IR 138
        ({"Alphabetic": "洪^吉洞"}, ["I2EXAMPLE"]),  # ISO 2022 IR 149: the ideographic group
        ({"Alphabetic": "홍^길동"}, ["I2EXAMPLE"]),  # ... and the phonetic one
        ({"Ideographic": "洪^吉洞"}, ["I2EXAMPLE"]),  # at its own position
        ({"Alphabetic": "Hong^Gildong", "Ideographic": "洪*"}, ["I2EXAMPLE"]),
        ({"Alphabetic": "김희중"}, ["2008-3"]),
        ({"Alphabetic": "山田^太郎"}, ["H31EXAMPLE", "H32EXAMPLE"]),  # ISO 2022 IR 87 (and IR 13)
        ({"Alphabetic": "ﾔﾏﾀﾞ^ﾀﾛｳ"}, ["H32EXAMPLE"]),  # JIS X 0201 katakana
        ({"Alphabetic": "やまだ^たろう"}, ["2008-4", "H31EXAMPLE", "H32EXAMPLE"]),  # any group
        ({"Phonetic": "やまだ^たろう"}, ["H31EXAMPLE", "H32EXAMPLE"]),  # the phonetic group only
        ({"Ideographic": "やまだ^たろう"}, []),
        ({"Alphabetic": "山*"}, ["H31EXAMPLE", "H32EXAMPLE"]),
        ({"Alphabetic": "王^小東"}, ["X1EXAMPLE"]),  # ISO_IR 192
        ({"Alphabetic": "王^小东"}, ["X2EXAMPLE"]),  # GB18030
    ],
)
async def test_names_are_found_in_their_own_script(
    service: Service, name: dict[str, str], patient_ids: list[str]
) -> None:
    assert await _patients(service, name) == patient_ids


@pytest.mark.usefixtures("charset_files")
async def test_names_come_back_by_component_group(service: Service) -> None:
    request = QueryRequest(
        level=QueryLevel.STUDY,
        identifier={"00100020": {"vr": "LO", "Value": ["H31EXAMPLE"]}, "00100010": {"vr": "PN"}},
    )
    matches, _ = await find_all(service.client, request)
    assert matches[0]["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    ]
    assert "00080005" not in matches[0]
