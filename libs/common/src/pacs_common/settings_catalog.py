"""Every environment variable the PACS reads, found from its settings classes.

Deployment files (``deploy/compose.yaml``, the Helm chart) set dozens of
``PACS_*`` variables; a misspelt one is silently ignored by pydantic-settings
and the service runs with a default nobody chose.  The deployment tests ask
this catalogue whether each name they set is real.

The catalogue imports every module of the PACS packages (never ``__main__``)
and walks the subclasses of :class:`pydantic_settings.BaseSettings`; a name is
the class's ``env_prefix`` plus the field name, or the field's validation
alias.  Per-tier storage settings are read under ``PACS_STORAGE_<TIER>_``
for any tier name, so those are matched by pattern.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator

from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

from pacs_common.settings import StorageTierSettings

__all__ = ["PACKAGES", "environment_variables", "is_known_environment_variable"]

#: The packages whose settings make up the PACS (services and the shared library).
PACKAGES: tuple[str, ...] = (
    "pacs_common",
    "dimse_gateway",
    "ingest_worker",
    "query_service",
    "dicomweb_api",
    "hsm_migrator",
    "prefetch_scheduler",
    "ai_connector",
    "ai_reference",
)

_TIER_PATTERN = re.compile(r"^PACS_STORAGE_([A-Z][A-Z0-9_]*?)_(?P<field>[A-Z0-9_]+)$")


def _import_all(package_name: str) -> None:
    try:
        package = importlib.import_module(package_name)
    except ModuleNotFoundError:
        return  # a deployment may install only some services
    for module in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
        if module.name.rsplit(".", 1)[-1] == "__main__":
            continue  # importing it would start the service
        importlib.import_module(module.name)


def _subclasses(cls: type[BaseSettings]) -> Iterator[type[BaseSettings]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _alias_names(alias: object) -> list[str]:
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    if isinstance(alias, AliasPath):
        return [str(alias.path[0])]
    return []


def _names(cls: type[BaseSettings]) -> Iterator[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    for name, field in cls.model_fields.items():
        aliases = _alias_names(field.validation_alias) or _alias_names(field.alias)
        if aliases:
            yield from (alias.upper() for alias in aliases)
        else:
            yield f"{prefix}{name}".upper()


def environment_variables(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Every variable name (upper case) → the settings class that reads it."""
    for package in packages:
        _import_all(package)
    catalog: dict[str, str] = {}
    for cls in _subclasses(BaseSettings):
        if cls.__module__.split(".", 1)[0] not in packages:
            continue
        for name in _names(cls):
            catalog.setdefault(name, f"{cls.__module__}.{cls.__qualname__}")
    return catalog


def is_known_environment_variable(name: str, catalog: dict[str, str] | None = None) -> bool:
    """Whether the PACS reads ``name`` (``PACS_STORAGE_WARM_S3_BUCKET`` counts
    for any tier name)."""
    known = environment_variables() if catalog is None else catalog
    upper = name.upper()
    if upper in known:
        return True
    match = _TIER_PATTERN.match(upper)
    if match is None:
        return False
    tier_fields = {field.upper() for field in StorageTierSettings.model_fields}
    # The tier name may itself hold underscores: try every split.
    rest = upper.removeprefix("PACS_STORAGE_")
    parts = rest.split("_")
    return any("_".join(parts[i:]) in tier_fields for i in range(1, len(parts)))
