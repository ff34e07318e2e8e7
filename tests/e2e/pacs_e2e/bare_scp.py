"""A bare pynetdicom storage SCP for `make bench`: receives to disk and
answers success, nothing else.  Its figures are the floor any pynetdicom
based gateway stands on (no storage durability, no queue, no index).

    python -m pacs_e2e.bare_scp PORT SPOOL_DIR
"""

from __future__ import annotations

import sys
import tempfile

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _store(event: Event) -> int:
    _ = event.dataset_path  # the dataset is on disk already; pynetdicom deletes it after
    return 0x0000


def main() -> None:
    port, spool = int(sys.argv[1]), sys.argv[2]
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = spool
    ae = AE("BARE")
    ae.maximum_pdu_size = 262_144
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, _store)])


if __name__ == "__main__":
    main()
