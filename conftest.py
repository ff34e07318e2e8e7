"""Fixtures shared by every test package: real servers started once per session."""

pytest_plugins = [
    "pacs_common.testing.storage_servers",
    "pacs_common.testing.broker",
    "pacs_common.testing.database",
    # The dicomweb-api's app and client fixtures (they override nothing:
    # a test package's own fixture of the same name wins).
    "dicomweb_api.testing_fixtures",
]
