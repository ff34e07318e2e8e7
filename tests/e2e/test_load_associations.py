"""200 simultaneous associations at one gateway process, and the 201st.

The gateway runs with PACS_GATEWAY_MAX_ASSOCIATIONS=200.  200 pynetdicom
SCU associations are opened and held at once (a thread each); while all are
held each C-STOREs an instance of its own and C-FINDs a study indexed
beforehand.  With all 200 still open, one more association — from
pynetdicom and from DCMTK's echoscu — is rejected cleanly with
A-ASSOCIATE-RJ rejected-transient / service-provider (presentation related
function) / local-limit-exceeded (PS3.8 9.3.4: result 2, source 3, reason 2).
After release, nothing is lost: every instance that got Success is indexed,
and the gateway accepts associations again.  Figures (RSS per association,
CPU while holding) are printed (``-s``), never asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.bench_associations import (
    SUCCESS,
    gateway_env,
    hold_many,
    prepare_batches,
    sop_instance_uids,
    store_known_study,
)
from pacs_e2e.dcmtk import echoscu
from pacs_e2e.index import IndexReader
from pacs_e2e.metrics import total
from pacs_e2e.system import running_system

ASSOCIATIONS: Final = 200
STORES_PER_ASSOCIATION: Final = 1
# A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): type 0x03, reserved, length 4, reserved,
# result 2 (rejected-transient), source 3 (service-provider, presentation
# related function), reason 2 (local-limit-exceeded).
LOCAL_LIMIT_EXCEEDED_PDU: Final = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02])


@pytest.fixture(scope="module")
def loaded_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with running_system(
        tmp_path_factory.mktemp("pacs-load"), gateways=1, workers=1, extra_env=gateway_env(ASSOCIATIONS)
    ) as system:
        yield system


@dataclass
class Rejection:
    result: int | None
    source: int | None
    reason: int | None
    raw: list[bytes] = field(default_factory=list)


def _one_more_association(system: LocalSystem) -> Rejection:
    """An association over the limit, with the raw bytes the gateway answered."""
    received: list[bytes] = []

    def on_data(event: Event) -> None:
        received.append(bytes(event.data))

    ae = AE(ae_title="OVERLIMIT")
    ae.acse_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        system.gateway_port,
        ae_title=system.ae_title,
        evt_handlers=[(evt.EVT_DATA_RECV, on_data)],
    )
    if assoc.is_established:
        assoc.abort()
        return Rejection(None, None, None, received)
    primitive = assoc.acceptor.primitive
    assert isinstance(primitive, A_ASSOCIATE)
    return Rejection(primitive.result, primitive.result_source, primitive.diagnostic, received)


def _rejected_associations(system: LocalSystem) -> float:
    return total(system, "gateway", "pacs_dimse_associations_total", outcome="rejected")


def test_200_held_associations_store_and_query_and_one_more_is_rejected(
    loaded_pacs: LocalSystem, tmp_path: Path
) -> None:
    system = loaded_pacs
    index = IndexReader(system.database_url)
    known_study, _ = store_known_study(system, index, tmp_path / "known")
    batches = prepare_batches(tmp_path / "load", ASSOCIATIONS, STORES_PER_ASSOCIATION)
    gateway_pid = system.gateways[0].pid
    assert gateway_pid is not None

    over_limit: list[Rejection] = []
    dcmtk_outputs: list[tuple[int, str]] = []

    def while_all_are_held() -> None:
        over_limit.append(_one_more_association(system))
        result = echoscu(system.gateway_port, called=system.ae_title, calling="DCMTKOVER")
        dcmtk_outputs.append((result.returncode, result.output))

    rejected_before = _rejected_associations(system)
    figures = hold_many(
        system.gateway_port,
        system.ae_title,
        gateway_pid,
        batches,
        known_study,
        idle_seconds=0.5,
        while_held=while_all_are_held,
    )
    for line in figures.lines():
        print(line)

    # All 200 were held at once and every one did its work.
    assert figures.established == ASSOCIATIONS
    failures = [o for o in figures.outcomes if not o.all_stored or o.error]
    assert failures == []
    assert all(o.find_status == SUCCESS and o.find_matches == 1 for o in figures.outcomes)

    # The 201st: rejected-transient, service-provider (presentation), local-limit-exceeded.
    [rejection] = over_limit
    assert (rejection.result, rejection.source, rejection.reason) == (2, 3, 2)
    assert LOCAL_LIMIT_EXCEEDED_PDU in rejection.raw
    [(returncode, output)] = dcmtk_outputs
    assert returncode != 0
    assert "Rejected Transient" in output and "Local Limit Exceeded" in output, output
    assert _rejected_associations(system) - rejected_before == 2

    # Nothing lost: every C-STORE that got Success is indexed.
    index.wait_for_instances(sop_instance_uids(batches), timeout=60)
    # And once released, the gateway takes associations again.
    assert echoscu(system.gateway_port, called=system.ae_title).returncode == 0
