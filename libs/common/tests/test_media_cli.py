"""``pacs export`` / ``pacs import`` against the real index, filesystem
storage and broker, configured by PACS_* variables as an operator would."""

from __future__ import annotations

import argparse
import asyncio
import json
import zipfile
from pathlib import Path

import asyncpg
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_common.cli import media
from pacs_common.cli.common import CliError
from pacs_common.media.testing import dcmtk_records, image, part10, store_and_index
from pacs_common.messaging import Broker
from pacs_common.settings import BrokerSettings, DatabaseSettings
from pacs_common.storage.filesystem import FilesystemStorage

STUDY = "1.2.826.0.1.3680043.8.498.61"


def _parse(argv: list[str], project_dir: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pacs")
    commands = parser.add_subparsers(dest="command", required=True)
    media.add_parser(commands)
    args = parser.parse_args(argv)
    args.project_dir = project_dir
    return args


@pytest.fixture
def environment(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
) -> FilesystemStorage:
    monkeypatch.setenv("PACS_DB_URL", database_settings.url)
    monkeypatch.setenv("PACS_AMQP_URL", broker_settings.url.get_secret_value())
    monkeypatch.setenv("PACS_AMQP_NAMESPACE", broker_settings.namespace)
    monkeypatch.setenv("PACS_AMQP_RETRY_DELAYS_MS", json.dumps(broker_settings.retry_delays_ms))
    monkeypatch.setenv("PACS_STORAGE_TIERS", "hot")
    monkeypatch.setenv("PACS_STORAGE_HOT_PATH", str(tmp_path / "hot"))
    monkeypatch.setenv("PACS_STORAGE_HOT_FSYNC", "false")
    return FilesystemStorage(tmp_path / "hot", fsync=False)


async def test_export_to_folder_and_zip(
    environment: FilesystemStorage,
    db_pool: asyncpg.Pool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    implicit = image(STUDY, f"{STUDY}.1", f"{STUDY}.1.1", StudyID="1")
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    await store_and_index(
        db_pool, environment, [implicit, image(STUDY, f"{STUDY}.2", f"{STUDY}.2.1", StudyID="1")]
    )
    out, archive = tmp_path / "out", tmp_path / "out.zip"

    args = _parse(["export", STUDY, "-o", str(out), "--zip", str(archive), "--explicit-le"], tmp_path)
    assert await asyncio.to_thread(args.handler, args) == 0
    assert "exported 2 instance(s) of 1 study(ies)" in capsys.readouterr().out
    assert dcmtk_records(out / "DICOMDIR") == ["PATIENT", "STUDY", "SERIES", "IMAGE", "SERIES", "IMAGE"]
    file_set = FileSet(pydicom.dcmread(out / "DICOMDIR"))
    assert {i.load().file_meta.TransferSyntaxUID for i in file_set} == {ExplicitVRLittleEndian}
    with zipfile.ZipFile(archive) as zipped:
        assert sorted(zipped.namelist()) == sorted(
            p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
        )

    again = _parse(["export", STUDY, "-o", str(out)], tmp_path)
    with pytest.raises(CliError, match="already holds a DICOMDIR"):
        again.handler(again)
    unknown = _parse(["export", "1.2.3.404", "--zip", str(tmp_path / "x.zip")], tmp_path)
    with pytest.raises(CliError, match=r"not in the archive: 1\.2\.3\.404"):
        await asyncio.to_thread(unknown.handler, unknown)


async def test_import_reports_every_file_and_stores_the_good_ones(
    environment: FilesystemStorage,
    broker: Broker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(part10(image(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")))
    (folder / "b.dcm").write_bytes(part10(image(STUDY, f"{STUDY}.1", f"{STUDY}.1.2", number=2)))
    (folder / "notes.txt").write_text("hello")

    args = _parse(["import", str(folder), "--json"], tmp_path)
    assert await asyncio.to_thread(args.handler, args) == 1  # one file was not DICOM
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == {"stored": 2, "not_dicom": 1, "broken_record": 0, "refused": 0}
    assert sorted(environment.iter_keys()) == [
        f"{STUDY}/{STUDY}.1/{STUDY}.1.1.dcm",
        f"{STUDY}/{STUDY}.1/{STUDY}.1.2.dcm",
    ]
    channel = await broker.connection.channel()
    try:
        queue = await channel.declare_queue(broker.topology.ingest_queue, passive=True)
        assert queue.declaration_result.message_count == 2
    finally:
        await channel.close()

    good_only = _parse(["import", str(folder / "a.dcm")], tmp_path)
    assert await asyncio.to_thread(good_only.handler, good_only) == 0
    assert "imported 1 file(s)" in capsys.readouterr().out
