"""Fixtures shared by every test package: real servers started once per session."""

pytest_plugins = [
    "pacs_common.testing.storage_servers",
    "pacs_common.testing.broker",
    "pacs_common.testing.database",
]
