"""What the workflow services (MWL C-FIND, MPPS, Storage Commitment) share:
their presentation contexts, status codes and status datasets.

None of them carries pixel data, so they accept the uncompressed transfer
syntaxes only.
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE

MODALITY_WORKLIST_FIND: Final = "1.2.840.10008.5.1.4.31"
MODALITY_PERFORMED_PROCEDURE_STEP: Final = "1.2.840.10008.3.1.2.3.3"
STORAGE_COMMITMENT_PUSH_MODEL: Final = "1.2.840.10008.1.20.1"
# The well-known SOP Instance of the push model (PS3.4 J.3.5).
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE: Final = "1.2.840.10008.1.20.1.1"

TRANSFER_SYNTAXES: Final = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

# -- statuses (PS3.7 C, PS3.4 F / J / K) --------------------------------------
SUCCESS: Final = 0x0000
PENDING: Final = 0xFF00
CANCEL: Final = 0xFE00
INVALID_ATTRIBUTE_VALUE: Final = 0x0106
PROCESSING_FAILURE: Final = 0x0110
DUPLICATE_SOP_INSTANCE: Final = 0x0111
NO_SUCH_SOP_INSTANCE: Final = 0x0112
NO_SUCH_OBJECT_INSTANCE: Final = 0x0112  # Failure Reason of a commitment item
INVALID_ARGUMENT_VALUE: Final = 0x0115
NO_SUCH_SOP_CLASS: Final = 0x0118
CLASS_INSTANCE_CONFLICT: Final = 0x0119
MISSING_ATTRIBUTE: Final = 0x0120
NO_SUCH_ACTION: Final = 0x0123
OUT_OF_RESOURCES: Final = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
UNABLE_TO_PROCESS: Final = 0xC000

_ERROR_COMMENT_MAX = 64  # ErrorComment is LO


def status(code: int, comment: str | None = None) -> Dataset:
    """A status dataset, with an Error Comment when there is something to say."""
    answer = Dataset()
    answer.Status = code
    if comment:
        answer.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return answer


def workflow_contexts() -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) of every workflow service."""
    return [
        (MODALITY_WORKLIST_FIND, list(TRANSFER_SYNTAXES)),
        (MODALITY_PERFORMED_PROCEDURE_STEP, list(TRANSFER_SYNTAXES)),
        (STORAGE_COMMITMENT_PUSH_MODEL, list(TRANSFER_SYNTAXES)),
    ]


def add_workflow_contexts(ae: AE) -> None:
    """Accept the workflow services on ``ae``.

    Storage Commitment accepts whatever SCP/SCU role the requester proposes
    (PS3.4 J.3.3): the N-EVENT-REPORT may travel back on the same association.
    """
    for abstract_syntax, transfer_syntaxes in workflow_contexts():
        if abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL:
            ae.add_supported_context(abstract_syntax, transfer_syntaxes, scu_role=True, scp_role=True)
        else:
            ae.add_supported_context(abstract_syntax, transfer_syntaxes)
