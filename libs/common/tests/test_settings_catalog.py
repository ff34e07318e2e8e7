"""The catalogue of environment variables deployment files are checked against."""

from __future__ import annotations

import pytest

from pacs_common.settings_catalog import environment_variables, is_known_environment_variable


@pytest.fixture(scope="module")
def catalog() -> dict[str, str]:
    return environment_variables()


def test_names_from_every_service_are_known(catalog: dict[str, str]) -> None:
    for name in (
        "PACS_DB_URL",
        "PACS_AMQP_URL",
        "PACS_GATEWAY_AE_TITLE",
        "PACS_WORKER_PREFETCH",
        "PACS_QUERY_HTTP_PORT",
        "PACS_DICOMWEB_QUERY_URL",
        "PACS_HSM_INTERVAL_SECONDS",
        "PACS_TELEMETRY_OTLP_ENDPOINT",
        "PACS_STORAGE_TIERS",
    ):
        assert is_known_environment_variable(name, catalog), name


def test_an_alias_is_the_name_read(catalog: dict[str, str]) -> None:
    # Prefetch's move destination is read as PACS_PREFETCH_MOVE_DESTINATION or the gateway's AE title.
    assert "PACS_PREFETCH_MOVE_DESTINATION" in catalog


def test_any_tier_name_takes_the_tier_fields(catalog: dict[str, str]) -> None:
    assert is_known_environment_variable("PACS_STORAGE_HOT_BACKEND", catalog)
    assert is_known_environment_variable("PACS_STORAGE_WARM_S3_BUCKET", catalog)
    assert is_known_environment_variable("PACS_STORAGE_DEEP_COLD_AZURE_ACCESS_TIER", catalog)
    assert not is_known_environment_variable("PACS_STORAGE_WARM_S3_BUCKT", catalog)


def test_a_misspelt_name_is_not_known(catalog: dict[str, str]) -> None:
    assert not is_known_environment_variable("PACS_DB_URI", catalog)
    assert not is_known_environment_variable("PACS_GATEWAY_AETITLE", catalog)
