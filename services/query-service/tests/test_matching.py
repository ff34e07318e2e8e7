"""The matching primitives on their own (no database)."""

from __future__ import annotations

import pytest

from query_service.matching import (
    InvalidKeyError,
    Range,
    is_universal,
    parse_date_range,
    parse_datetime_range,
    parse_time_range,
    pn_matches,
    pn_query_groups,
    split_uid_list,
    text_matches,
    wildcard_to_like,
)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("SMI*", "SMI%"),
        ("*MIT*", "%MIT%"),
        ("A?C", "A_C"),
        ("50%_OFF*", "50\\%\\_OFF%"),
        ("back\\slash", "back\\\\slash"),
    ],
)
def test_wildcards_become_escaped_like_patterns(value: str, pattern: str) -> None:
    assert wildcard_to_like(value) == pattern


def test_universal_values() -> None:
    assert is_universal(None) and is_universal("") and is_universal("*") and is_universal("**")
    assert not is_universal("A*")


def test_date_ranges() -> None:
    assert parse_date_range("20200101") == Range("20200101", "20200101")
    assert parse_date_range("20200101-20201231") == Range("20200101", "20201231")
    assert parse_date_range("-20201231") == Range(None, "20201231")
    assert parse_date_range("20200101-") == Range("20200101", None)
    assert parse_date_range("2020.01.01") == Range("20200101", "20200101")
    for invalid in ("2020", "20201301", "2020010a", "-", "20200101-2020"):
        with pytest.raises(InvalidKeyError):
            parse_date_range(invalid)


def test_time_upper_bounds_cover_their_precision() -> None:
    assert parse_time_range("-1100").contains("110059")
    assert parse_time_range("-1100").contains("110059.999")
    assert not parse_time_range("-1100").contains("110100")
    assert parse_time_range("-11").contains("115959.5")
    assert parse_time_range("0800-").contains("0800")
    assert not parse_time_range("0800-").contains("075959")
    assert parse_time_range("1030").contains("103015")
    assert not parse_time_range("1030").contains("103100")
    assert parse_time_range("10:30-11:00") == parse_time_range("1030-1100")
    for invalid in ("25", "1260", "1a", "10.5"):
        with pytest.raises(InvalidKeyError):
            parse_time_range(invalid)


def test_datetime_ranges() -> None:
    bounds = parse_datetime_range("2020-202106")
    assert bounds.contains("20200101000000") and bounds.contains("20210630235959.9")
    assert not bounds.contains("20210701")
    assert parse_datetime_range("20200101120000+0100") == parse_datetime_range("20200101120000")
    with pytest.raises(InvalidKeyError):
        parse_datetime_range("2020131")


def test_uid_lists() -> None:
    assert split_uid_list("1.2.3\\1.2.4") == ["1.2.3", "1.2.4"]
    assert split_uid_list(["1.2", "1.3\\1.4"]) == ["1.2", "1.3", "1.4"]
    for invalid in ("1.2.*", "1..2", "abc"):
        with pytest.raises(InvalidKeyError):
            split_uid_list(invalid)


def test_person_name_groups() -> None:
    assert pn_query_groups("SMITH^J*") == [(None, "SMITH^J*")]
    assert pn_query_groups("=山田*") == [(2, "山田*")]
    assert pn_query_groups("YAMADA^TAROU=山田^太郎=") == [(1, "YAMADA^TAROU"), (2, "山田^太郎")]
    stored = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert pn_matches("山田*", stored)
    assert pn_matches("yamada*", stored)
    assert not pn_matches("yamada*", stored, case_insensitive=False)
    assert pn_matches("*=山田^太郎", stored)
    assert not pn_matches("=やまだ*", stored)  # phonetic value at the ideographic position
    assert pn_matches("tar yam", stored, fuzzy=True)
    assert not pn_matches("aro", stored, fuzzy=True)


def test_text_matching_is_case_sensitive() -> None:
    assert text_matches("CT*", "CTA") and not text_matches("ct*", "CTA")
    assert text_matches("A?C", "ABC") and not text_matches("A?C", "ABBC")
    assert text_matches("50%", "50%") and not text_matches("50%", "500")
