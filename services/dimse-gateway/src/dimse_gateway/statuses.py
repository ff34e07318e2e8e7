"""DIMSE status codes the gateway answers with (PS3.4 Annex B / PS3.7 C)."""

from typing import Final

SUCCESS: Final = 0x0000
# Refused: Out of Resources — storage or broker unavailable; the sender may retry.
OUT_OF_RESOURCES: Final = 0xA700
# Error: Data Set does not match SOP Class — a Study/Series/SOP Instance UID
# missing, or the dataset's SOP Instance/Class UID differing from the request's.
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
# Error: Cannot understand — truncated, unparsable or incomplete dataset.
CANNOT_UNDERSTAND: Final = 0xC000
