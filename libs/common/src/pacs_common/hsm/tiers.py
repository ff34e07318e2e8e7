"""What the tiers hold, and which ones are archives.

An archive tier keeps objects that cannot be read until they are restored
(S3 GLACIER / DEEP_ARCHIVE, Azure Archive): instances moved there become
``NEARLINE``.  S3 GLACIER_IR (instant retrieval) and Azure Cool/Cold are
cheaper but readable at once, so they stay ``ONLINE``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from pydantic import BaseModel, ConfigDict

from pacs_common.hsm.availability import Availability
from pacs_common.storage import ObjectStorage

__all__ = ["TierStatistics", "availability_in", "is_archive", "tier_statistics"]

#: S3 storage classes whose objects must be restored before a read.
S3_ARCHIVE_CLASSES: Final = frozenset({"GLACIER", "DEEP_ARCHIVE"})
#: Azure access tiers whose blobs must be rehydrated before a read.
AZURE_ARCHIVE_TIERS: Final = frozenset({"archive"})

Executor = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy


def is_archive(storage: ObjectStorage) -> bool:
    """Whether objects written to ``storage`` need a restore before a read."""
    storage_class = getattr(storage, "storage_class", None)
    if storage.kind == "s3" and storage_class:
        return str(storage_class).upper() in S3_ARCHIVE_CLASSES
    access_tier = getattr(storage, "access_tier", None)
    if storage.kind == "azure" and access_tier is not None:
        return str(getattr(access_tier, "value", access_tier)).lower() in AZURE_ARCHIVE_TIERS
    return False


def availability_in(storage: ObjectStorage) -> Availability:
    """The availability of an instance whose object is in ``storage``."""
    return Availability.NEARLINE if is_archive(storage) else Availability.ONLINE


class TierStatistics(BaseModel):
    """How many instances (and their bytes) the index has in one tier."""

    model_config = ConfigDict(frozen=True)

    tier: str
    instances: int
    bytes: int
    # Whether the tier is configured in this deployment (the index may
    # still point at a tier that was removed from the configuration).
    configured: bool = True


async def tier_statistics(db: Executor, configured: Iterable[str] = ()) -> list[TierStatistics]:
    """Per tier: instances and bytes the index points at; configured tiers
    with nothing in them are listed with zeros (in configuration order)."""
    rows = await db.fetch(
        """
        SELECT tier, count(*) AS instances, coalesce(sum(size), 0)::bigint AS bytes
        FROM instance_location GROUP BY tier
        """
    )
    found = {row["tier"]: (int(row["instances"]), int(row["bytes"])) for row in rows}
    names = list(dict.fromkeys(configured))
    result = [
        TierStatistics(tier=name, instances=found.get(name, (0, 0))[0], bytes=found.get(name, (0, 0))[1])
        for name in names
    ]
    result.extend(
        TierStatistics(tier=name, instances=count, bytes=size, configured=False)
        for name, (count, size) in sorted(found.items())
        if name not in names
    )
    return result
