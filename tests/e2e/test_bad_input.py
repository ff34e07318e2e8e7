"""Bad input is refused or aborted cleanly, and never disturbs another
association: a truncated dataset, a dataset that is not the instance the
command announced, and a PDU of garbage."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.index import IndexReader

CANNOT_UNDERSTAND = 0xC000
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900


def _associate(pacs: LocalSystem, transfer_syntax: str = ExplicitVRLittleEndian) -> Association:
    """An association whose CT context has one transfer syntax, so that
    pynetdicom sends a file's bytes as they are instead of re-encoding them."""
    ae = AE(ae_title="BADINPUT")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", pacs.gateway_port, ae_title=pacs.ae_title)
    assert assoc.is_established
    return assoc


@pytest.fixture(scope="module", autouse=True)
def _send_files_as_they_are() -> Iterator[None]:
    """pynetdicom sends a file's encoded bytes unchanged (no decode and
    re-encode) only in chunked mode: what a broken modality would send."""
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    yield
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


@pytest.fixture
def bystander(pacs: LocalSystem) -> Iterator[Association]:
    """An association opened before the bad input and used after it."""
    assoc = _associate(pacs)
    assert assoc.send_c_echo().Status == 0
    yield assoc
    assert assoc.is_established, "the parallel association was disturbed"
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def _store_good_instance(assoc: Association, tmp_path: Path, index: IndexReader) -> None:
    path = write_ct_series(tmp_path / "good", 1, rows=64, columns=64, seed=11)[0]
    assert assoc.send_c_store(path).Status == 0
    index.wait_for_instances([str(dcmread(path).SOPInstanceUID)])


def test_truncated_dataset_is_refused(
    pacs: LocalSystem, index: IndexReader, bystander: Association, tmp_path: Path
) -> None:
    source = Path(str(get_testdata_file("CT_small.dcm")))
    data = source.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 5000])  # cut inside Pixel Data
    sop_uid = str(dcmread(source).SOPInstanceUID)

    assoc = _associate(pacs, read_file_meta_info(source).TransferSyntaxUID)
    status = assoc.send_c_store(truncated)
    assert status.Status == CANNOT_UNDERSTAND
    assert "truncated" in str(status.get("ErrorComment", "")).lower()
    assoc.release()
    assert index.count_instances([sop_uid]) == 0
    _store_good_instance(bystander, tmp_path, index)


def test_dataset_not_matching_the_command_is_refused(
    pacs: LocalSystem, index: IndexReader, bystander: Association, tmp_path: Path
) -> None:
    path = write_ct_series(tmp_path / "mismatch", 1, rows=32, columns=32, seed=12)[0]
    ds = dcmread(path)
    announced = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = announced  # the command will announce this UID
    ds.save_as(path)  # as is: enforcing the file format would "repair" the meta
    assert read_file_meta_info(path).MediaStorageSOPInstanceUID == announced

    assoc = _associate(pacs)
    status = assoc.send_c_store(path)
    assert status.Status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "differs" in str(status.get("ErrorComment", ""))
    assoc.release()
    assert index.count_instances([announced, str(ds.SOPInstanceUID)]) == 0
    _store_good_instance(bystander, tmp_path, index)


def test_garbage_pdu_aborts_only_that_association(
    pacs: LocalSystem, index: IndexReader, bystander: Association, tmp_path: Path
) -> None:
    with socket.create_connection(("127.0.0.1", pacs.gateway_port), timeout=10) as sock:
        # PDU type 0x07 is A-ABORT; 0x42 is not a PDU type at all, followed by junk.
        sock.sendall(bytes([0x42, 0x00, 0x00, 0x00, 0x00, 0x10]) + os.urandom(16))
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    # Either an A-ABORT PDU (0x07) or a plain close: the gateway did not hang on to it.
    assert received == b"" or received[0] == 0x07
    _store_good_instance(bystander, tmp_path, index)

    # and after the garbage, a new association works too
    assoc = _associate(pacs)
    assert assoc.send_c_echo().Status == 0
    assoc.release()
