"""Q/R identifiers: pydicom Dataset ↔ DICOM JSON, and the response character set.

Requests arrive as pydicom Datasets whose text pydicom decodes from any
Specific Character Set (ISO 2022 escape sequences included); they travel to
the query-service as DICOM JSON (Unicode).  Matches come back as DICOM JSON
and are turned into response identifiers encoded in a character set the SCU
can read:

* no Specific Character Set when every value is ASCII (the default repertoire);
* else the SCU's own Specific Character Set when every value can be encoded
  in it;
* else ISO_IR 192 (UTF-8).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from pacs_common.query import InformationModel, QueryLevel

UTF8 = "ISO_IR 192"

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})
_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
# Identifier elements that are not matching keys: the level, the character
# set (the values are decoded already) and the Retrieve AE Title (ours).
_NOT_KEYS = frozenset({Tag(0x0008, 0x0052), Tag(0x0008, 0x0005), Tag(0x0008, 0x0054)})


#: The Q/R SOP classes (PS3.4 C.6) and their information model.
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
FIND_MODELS = {PATIENT_ROOT_FIND: InformationModel.PATIENT_ROOT, STUDY_ROOT_FIND: InformationModel.STUDY_ROOT}
MOVE_MODELS = {PATIENT_ROOT_MOVE: InformationModel.PATIENT_ROOT, STUDY_ROOT_MOVE: InformationModel.STUDY_ROOT}
GET_MODELS = {PATIENT_ROOT_GET: InformationModel.PATIENT_ROOT, STUDY_ROOT_GET: InformationModel.STUDY_ROOT}
#: The levels of each model: the Study Root model has no PATIENT level.
MODEL_LEVELS: dict[InformationModel, tuple[QueryLevel, ...]] = {
    InformationModel.PATIENT_ROOT: tuple(QueryLevel),
    InformationModel.STUDY_ROOT: (QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE),
}


class IdentifierError(ValueError):
    """The identifier cannot be used; ``str(exc)`` fits an Error Comment, reason first."""


def query_level(identifier: Dataset, model: InformationModel) -> QueryLevel:
    """The Query/Retrieve Level (0008,0052) of an identifier in ``model``."""
    raw = identifier.get("QueryRetrieveLevel")
    if raw is None or raw == "":
        raise IdentifierError("QueryRetrieveLevel (0008,0052) missing")
    text = str(raw).strip().upper()
    try:
        level = QueryLevel(text)
    except ValueError:
        raise IdentifierError(f"unknown QueryRetrieveLevel {text[:20]!r}") from None
    if level not in MODEL_LEVELS[model]:
        raise IdentifierError(f"QueryRetrieveLevel {level} not in the {model.value.replace('_', ' ')} model")
    return level


def requested_character_set(identifier: Dataset) -> list[str]:
    """The SCU's Specific Character Set as a list of defined terms ([] = default)."""
    value = identifier.get("SpecificCharacterSet")
    if value is None:
        return []
    terms = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(term).strip() for term in terms]


def to_json(identifier: Dataset) -> dict[str, Any]:
    """The matching and return keys of an identifier, as DICOM JSON."""
    keys = Dataset()
    try:
        for element in identifier:
            if element.tag in _NOT_KEYS or element.tag.group in (0x0000, 0x0002):
                continue
            keys.add(element)
        return keys.to_json_dict()
    except Exception as exc:  # pydicom raises many kinds on malformed values
        raise IdentifierError(f"malformed identifier: {exc}") from exc


def from_json(value: dict[str, Any]) -> Dataset:
    """A Dataset from DICOM JSON."""
    return Dataset.from_json(value)


def find_response(
    match: dict[str, Any], level: QueryLevel, retrieve_ae_title: str, requested_charset: list[str]
) -> Dataset:
    """A C-FIND pending response identifier from a query-service match."""
    response = from_json({k: v for k, v in match.items() if Tag(k) not in _NOT_KEYS})
    response.QueryRetrieveLevel = str(level)
    response.RetrieveAETitle = retrieve_ae_title
    charset = response_character_set(response, requested_charset)
    if charset:
        response.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    return response


def response_character_set(dataset: Dataset, requested: list[str]) -> list[str]:
    """The Specific Character Set to encode ``dataset`` in ([] = none needed)."""
    texts = list(_texts(dataset))
    if all(text.isascii() for text in texts):
        return []
    if requested and all(_encodable(text, requested) for text in texts):
        return requested
    return [UTF8]


def _texts(dataset: Dataset) -> Iterator[str]:
    for element in dataset:
        yield from _element_texts(element)


def _element_texts(element: DataElement) -> Iterator[str]:
    if element.VR == "SQ":
        for item in element.value or ():
            yield from _texts(item)
        return
    if element.VR not in _TEXT_VRS or element.value is None:
        return
    values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
    for value in values:
        if value is not None:
            yield str(value)


def _python_encodings(terms: list[str]) -> list[str]:
    encodings = ["ascii" if term in _DEFAULT_REPERTOIRE else convert_encodings([term])[0] for term in terms]
    # With ISO 2022 code extensions the default repertoire is always reachable.
    return [*encodings, "ascii"]


def _encodable(text: str, terms: list[str]) -> bool:
    """Whether every character of ``text`` can be written in the character
    set(s); with several (ISO 2022 code extensions) each character needs
    one of them."""
    try:
        encodings = _python_encodings(terms)
    except (LookupError, ValueError):
        return False
    if len(terms) == 1:
        return _encodes(text, encodings[0])
    return all(any(_encodes(char, encoding) for encoding in encodings) for char in text)


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True
