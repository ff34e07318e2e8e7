"""After the soak: does the index agree with what the clients were told, and
with the object store?

* every acknowledged instance (C-STORE success, STOW-RS success) is indexed
  exactly once;
* the object the index points to hashes to the sha256 the index records, and
  its dataset (the bytes after the Part 10 file meta, which the receiver
  writes itself) is byte-identical to the dataset the client sent; where the
  bytes differ, SOP Instance UID and Pixel Data are compared and the instance
  counts as "rewritten" (still a violation: the contract says "as received");
* every object in the hot tier is either indexed (``instance_location``) or
  recorded as set aside (``instance_superseded``) — otherwise an *orphan*.
  An orphan of an instance whose store failed at least once is left over
  from that failed attempt (the sender was told "failure", allowed by the
  ingest contract) and is counted, not a violation;
* no index row points to an object that is missing (*dangling*).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import dcmread

from pacs_common.storage.base import ObjectStorage
from pacs_e2e.index import IndexReader
from pacs_e2e.soak_records import SentInstance, part10_dataset

HOT = "hot"
_DIGEST_SUFFIX = re.compile(r"^(?P<uid>.+)\.(?P<digest>[0-9a-f]{16})$")


@dataclass
class Consistency:
    acknowledged: int = 0
    indexed: int = 0
    objects: int = 0
    byte_identical: int = 0
    superseded_rows: int = 0
    indexed_not_acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    digest_mismatch: list[str] = field(default_factory=list)
    orphans_from_failed_attempts: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    dangling: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        found = {
            "acknowledged but not indexed (lost)": self.lost,
            "indexed more than once": self.duplicated,
            "stored dataset rewritten (pixels and UID equal)": self.rewritten,
            "stored object differs from the one sent": self.corrupted,
            "stored object does not hash to the index's sha256": self.digest_mismatch,
            "objects with no index row (orphans)": self.orphans,
            "index rows whose object is missing (dangling)": self.dangling,
        }
        return [f"{what}: {len(items)}, e.g. {items[:3]}" for what, items in found.items() if items]


def check_consistency(
    index: IndexReader, storage: ObjectStorage, acknowledged: Mapping[str, SentInstance], failed: set[str]
) -> Consistency:
    result = Consistency(acknowledged=len(acknowledged))
    rows = index.fetch(
        "SELECT i.sop_instance_uid, l.tier, l.key, l.sha256 FROM instance i "
        "JOIN instance_location l ON l.instance_fk = i.pk"
    )
    by_uid: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_uid.setdefault(str(row["sop_instance_uid"]), []).append(row)
    result.indexed = len(by_uid)
    result.duplicated = sorted(uid for uid, found in by_uid.items() if len(found) > 1)
    counted = index.fetch("SELECT sop_instance_uid FROM instance GROUP BY 1 HAVING count(*) > 1")
    result.duplicated += [str(r["sop_instance_uid"]) for r in counted]
    result.lost = sorted(set(acknowledged) - set(by_uid))
    result.indexed_not_acknowledged = len(set(by_uid) - set(acknowledged))

    keys = set(storage.iter_keys())
    result.objects = len(keys)
    located = {str(r["key"]) for r in rows if r["tier"] == HOT}
    result.dangling = sorted(located - keys)
    aside = index.fetch("SELECT key FROM instance_superseded WHERE tier = $1", HOT)
    result.superseded_rows = len(aside)
    known = located | {str(r["key"]) for r in aside}
    for key in sorted(keys - known):
        if _sop_uid_of_key(key) in failed:
            result.orphans_from_failed_attempts.append(key)
        else:
            result.orphans.append(key)

    for uid, sent in acknowledged.items():
        found = by_uid.get(uid)
        if not found or str(found[0]["key"]) not in keys:
            continue
        _compare(storage, sent, found[0], result)
    return result


def _compare(
    storage: ObjectStorage, sent: SentInstance, row: Mapping[str, object], result: Consistency
) -> None:
    with storage.open(str(row["key"])) as stream:
        data = stream.read()
    uid = sent.sop_instance_uid
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        result.digest_mismatch.append(uid)
    if hashlib.sha256(part10_dataset(data)).hexdigest() == sent.dataset_sha256:
        result.byte_identical += 1
        return
    stored = dcmread(BytesIO(data))
    original = dcmread(sent.path)
    if stored.SOPInstanceUID == original.SOPInstanceUID and stored.PixelData == original.PixelData:
        result.rewritten.append(uid)
    else:
        result.corrupted.append(uid)


def _sop_uid_of_key(key: str) -> str:
    """``{study}/{series}/{sop}.dcm`` or ``{sop}.{digest16}.dcm`` → the SOP Instance UID."""
    name = key.rsplit("/", 1)[-1].removesuffix(".dcm")
    match = _DIGEST_SUFFIX.match(name)
    # A UID is digits and dots: a 16-hex-digit suffix with a letter is a digest.
    if match and not match.group("digest").isdigit():
        return match.group("uid")
    return name
