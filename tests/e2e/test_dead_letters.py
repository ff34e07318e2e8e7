"""A message that keeps failing ends in the dead-letter queue with its reason;
once the cause is fixed, `pacs dlq replay` brings it back and it is indexed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from pathlib import Path

from pydicom import dcmread

from pacs_common.localrun.runner import LocalSystem
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.models import IngestMessage, IngestSource, StorageLocation
from pacs_common.settings import BrokerSettings
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.index import IndexReader
from pacs_e2e.system import pacs_cli


async def _publish(system: LocalSystem, message: IngestMessage) -> None:
    settings = BrokerSettings(url=system.broker_url, namespace=system.namespace)
    broker = await Broker.connect(settings, declare=False)  # the system declared its topology
    try:
        await broker.publish_ingest(message)
    finally:
        await broker.close()


def test_dead_letter_then_replay(pacs: LocalSystem, index: IndexReader, tmp_path: Path) -> None:
    path = write_ct_series(tmp_path / "ct", 1, rows=32, columns=32, patient_id="DLQ", seed=41)[0]
    ds = dcmread(path, stop_before_pixels=True)
    key = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    data = path.read_bytes()
    # An ingest message whose object is not (yet) in storage: retried, then dead-lettered.
    message = IngestMessage(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        location=StorageLocation(
            tier="hot", backend="filesystem", key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        ),
        source=IngestSource(protocol="import"),
    )
    asyncio.run(_publish(pacs, message))

    deadline = time.monotonic() + 60
    letters: list[dict[str, object]] = []
    while not letters:
        assert time.monotonic() < deadline, "the message never reached the dead-letter queue"
        time.sleep(0.5)
        listed = pacs_cli(pacs, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        letters = [
            entry for entry in json.loads(listed.stdout) if entry["sop_instance_uid"] == ds.SOPInstanceUID
        ]
    assert int(str(letters[0]["attempts"])) >= 3
    assert "not found" in str(letters[0]["reason"]).lower() or "missing" in str(letters[0]["reason"]).lower()
    assert index.count_instances([ds.SOPInstanceUID]) == 0

    # the operator fixes the cause (the object is restored) and replays
    target = pacs.storage_path / key
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    replayed = pacs_cli(pacs, "dlq", "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    index.wait_for_instances([ds.SOPInstanceUID], timeout=60)
    after = json.loads(pacs_cli(pacs, "dlq", "list", "--json").stdout)
    assert not [entry for entry in after if entry["sop_instance_uid"] == ds.SOPInstanceUID]
