"""De-identification per PS3.15 Annex E: the Basic Application Level
Confidentiality Profile with three options.

``Deidentifier(salt, options).deidentify(dataset)`` returns a de-identified
copy of a pydicom dataset; the input is left untouched.

What it does, attribute by attribute (the table is
:mod:`pacs_common.dicom.deidentify_profile`):

- the actions of Table E.1-1.  Where the table allows a choice (``X/Z``,
  ``X/D``, ``Z/D``, ``X/Z/D``) the engine takes the one that keeps every IOD
  valid without knowing the attribute's type: D (a dummy value) when allowed,
  otherwise Z (zero length).  Sequences are walked: Z empties them, X removes
  them, D, K, C and ``U*`` apply the profile to their items.  Free text
  (ST/LT/UT) inside a D sequence (e.g. the Content Sequence of an SR) becomes
  a dummy too;
- private attributes, Curve Data (50xx) and overlay groups (60xx, whose data
  and comments the profile removes) are removed, as are group lengths;
- every UID that is not a registered DICOM UID (under 1.2.840.10008: SOP
  classes, transfer syntaxes…) nor a class or coding scheme UID is replaced by :class:`UidMapper`: ``2.25.<int>`` derived from
  HMAC-SHA256(salt, UID), so all instances of a study map consistently across
  calls and processes, and references inside sequences follow;
- attributes the table does not list keep their value, except: person names
  get a dummy, dates (DA/DT) are shifted (Retain Longitudinal option) or get
  a dummy — stricter than the table, so no real date survives in a tag an
  older table did not know;
- Retain Longitudinal Temporal Information with Modified Dates: DA/DT values
  shift by a whole number of days derived from (salt, patient), the same for
  every study of the patient; times are kept;
- Retain Patient Characteristics: sex, age, size, weight… kept (K), allergies
  and the like cleaned (C);
- Clean Descriptors: descriptions are kept with the identifying values of the
  same dataset (names, IDs, accession number, institution…) cut out of them;
  without the option they are removed as the basic profile says;
- PatientID / PatientName: given, or a stable pseudonym from (salt, original
  Patient ID and issuer); Patient Identity Removed = YES, De-identification
  Method and its code sequence (CID 7050), Longitudinal Temporal Information
  Modified;
- file meta: MediaStorageSOPInstanceUID follows the new SOP Instance UID, and
  the AE titles of the sender are dropped.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from pacs_common.dicom.deidentify_profile import PROFILE, ProfileRow

MIN_SALT_BYTES: Final = 16
# Shifts go back between 1 day and 10 years; never 0, so a shifted date is
# never a real one.
_MAX_SHIFT_DAYS: Final = 3652

# CID 7050 De-identification Method codes (DCM).
BASIC_PROFILE_CODE: Final = ("113100", "Basic Application Confidentiality Profile")
RETAIN_MODIFIED_DATES_CODE: Final = (
    "113107",
    "Retain Longitudinal Temporal Information Modified Dates Option",
)
RETAIN_PATIENT_CHARACTERISTICS_CODE: Final = ("113108", "Retain Patient Characteristics Option")
CLEAN_DESCRIPTORS_CODE: Final = ("113105", "Clean Descriptors Option")

_DUMMY_TEXT: Final = "ANONYMIZED"
_DUMMY_BY_VR: Final[dict[str, Any]] = {
    "AE": _DUMMY_TEXT,
    "AS": "000Y",
    "CS": _DUMMY_TEXT,
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "LO": _DUMMY_TEXT,
    "LT": _DUMMY_TEXT,
    "PN": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT,
    "UC": _DUMMY_TEXT,
    "UT": _DUMMY_TEXT,
    "UR": "",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
}
_TEXT_VRS: Final = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "PN"})
_FREE_TEXT_VRS: Final = frozenset({"ST", "LT", "UT"})
# UIDs that name a kind of thing, not an instance: never remapped.
_KEPT_UID_KEYWORD_SUFFIXES: Final = ("ClassUID", "TransferSyntaxUID", "CodingSchemeUID", "MappingResourceUID")

_PATIENT_NAME: Final = Tag(0x0010, 0x0010)
_PATIENT_ID: Final = Tag(0x0010, 0x0020)
_ISSUER_OF_PATIENT_ID: Final = Tag(0x0010, 0x0021)
_PATIENT_BIRTH_DATE: Final = Tag(0x0010, 0x0030)
# Values cut out of descriptions by the Clean Descriptors option.
_IDENTIFYING_TAGS: Final = (
    _PATIENT_NAME,
    _PATIENT_ID,
    _PATIENT_BIRTH_DATE,
    Tag(0x0010, 0x1000),  # Other Patient IDs
    Tag(0x0010, 0x1001),  # Other Patient Names
    Tag(0x0010, 0x1005),  # Patient's Birth Name
    Tag(0x0010, 0x1060),  # Patient's Mother's Birth Name
    Tag(0x0010, 0x1040),  # Patient's Address
    Tag(0x0010, 0x2154),  # Patient's Telephone Numbers
    Tag(0x0008, 0x0050),  # Accession Number
    Tag(0x0008, 0x0080),  # Institution Name
    Tag(0x0008, 0x0081),  # Institution Address
    Tag(0x0008, 0x1040),  # Institutional Department Name
    Tag(0x0008, 0x1010),  # Station Name
    Tag(0x0008, 0x0090),  # Referring Physician's Name
    Tag(0x0008, 0x1048),  # Physician(s) of Record
    Tag(0x0008, 0x1050),  # Performing Physician's Name
    Tag(0x0008, 0x1060),  # Name of Physician(s) Reading Study
    Tag(0x0008, 0x1070),  # Operators' Name
    Tag(0x0020, 0x0010),  # Study ID
)
_MIN_IDENTIFIER_LENGTH: Final = 3
_META_TAGS_DROPPED: Final = (
    Tag(0x0002, 0x0016),  # Source Application Entity Title
    Tag(0x0002, 0x0017),  # Sending Application Entity Title
    Tag(0x0002, 0x0018),  # Receiving Application Entity Title
    Tag(0x0002, 0x0100),  # Private Information Creator UID
    Tag(0x0002, 0x0102),  # Private Information
)
_DA_FORMAT: Final = "%Y%m%d"
_DA_LENGTH: Final = 8
_DA_OLD_FORMAT: Final = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")


class DeidentifyOptions(BaseModel):
    """What a caller may choose; the salt is not here (it is a secret of the
    deployment, see :class:`DeidentifySettings`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retain_longitudinal_modified_dates: bool = Field(
        default=False, description="shift dates by a per-patient offset instead of removing them"
    )
    retain_patient_characteristics: bool = Field(
        default=False, description="keep sex, age, size, weight, ethnic group, smoking and pregnancy status"
    )
    clean_descriptors: bool = Field(
        default=False,
        description="keep descriptions with identifying values cut out, instead of removing them",
    )
    patient_id: str | None = Field(
        default=None, min_length=1, max_length=64, description="new Patient ID (default: a pseudonym)"
    )
    patient_name: str | None = Field(
        default=None, min_length=1, max_length=64, description="new Patient's Name (default: a pseudonym)"
    )
    date_offset_days: int | None = Field(
        default=None,
        ge=-36500,
        le=36500,
        description="date shift in days (default: derived from the salt and the patient)",
    )
    scope: str = Field(
        default="",
        max_length=64,
        description="mixed with the salt: another scope (e.g. a research project, or a second copy of a "
        "study) gets other UIDs, pseudonyms and date shifts; the same scope always the same ones",
    )

    @field_validator("patient_id", "patient_name")
    @classmethod
    def _single_value_text(cls, value: str | None) -> str | None:
        if value is not None and (
            "\\" in value or any(ord(c) < 0x20 for c in value) or value != value.strip()
        ):
            raise ValueError("must be one value without backslashes, control characters or edge spaces")
        return value


class DeidentifySettings(BaseSettings):
    """The deployment's secret salt: ``PACS_DEIDENTIFY_SALT``.  Whoever holds
    it can recompute pseudonyms and UID mappings, so it is kept like a key."""

    model_config = SettingsConfigDict(env_prefix="PACS_DEIDENTIFY_", extra="ignore")

    salt: SecretStr

    @field_validator("salt")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().encode()) < MIN_SALT_BYTES:
            raise ValueError(f"must be at least {MIN_SALT_BYTES} bytes")
        return value

    def salt_bytes(self) -> bytes:
        return self.salt.get_secret_value().encode()


def _check_salt(salt: bytes) -> bytes:
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(f"the de-identification salt must be at least {MIN_SALT_BYTES} bytes")
    return salt


def _digest(salt: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(salt, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def _scoped_salt(salt: bytes, scope: str) -> bytes:
    return _digest(salt, "scope", scope) if scope else salt


class UidMapper:
    """Maps a UID to ``2.25.<int>`` from HMAC-SHA256(salt, UID): the same
    original UID gives the same new UID in every call and process sharing
    the salt, and nobody without the salt can go back.  The integer is a
    version-8 (custom) UUID, as ``2.25`` requires a UUID."""

    def __init__(self, salt: bytes) -> None:
        self._salt = _check_salt(salt)

    def map(self, uid: str) -> str:
        value = int.from_bytes(_digest(self._salt, "uid", uid.strip("\x00 "))[:16], "big")
        value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8
        value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
        return f"2.25.{value}"


@dataclass(frozen=True)
class _Context:
    options: DeidentifyOptions
    uids: UidMapper
    date_offset: int
    identifiers: tuple[re.Pattern[str], ...]


class Deidentifier:
    """The profile with its options, bound to one salt.  Stateless: one
    instance can serve many datasets, threads and studies."""

    def __init__(self, salt: bytes, options: DeidentifyOptions | None = None) -> None:
        self.options = options or DeidentifyOptions()
        self._salt = _scoped_salt(_check_salt(salt), self.options.scope)
        self.uids = UidMapper(self._salt)

    def patient_pseudonym(self, key: str) -> str:
        """The Patient ID given to the patient of :func:`patient_key` ``key``
        when none is chosen."""
        return "ANON" + _digest(self._salt, "patient", key).hex()[:20].upper()

    def date_offset(self, key: str) -> int:
        """Days added to every date of the patient of :func:`patient_key`
        ``key`` (negative: into the past)."""
        if self.options.date_offset_days is not None:
            return self.options.date_offset_days
        number = int.from_bytes(_digest(self._salt, "date-shift", key)[:8], "big")
        return -(1 + number % _MAX_SHIFT_DAYS)

    def deidentify(self, dataset: Dataset) -> Dataset:
        """A de-identified copy of ``dataset`` (a ``FileDataset`` stays one,
        with its file meta updated); ``dataset`` itself is not changed."""
        result = copy.deepcopy(dataset)
        key = patient_key(dataset)
        context = _Context(
            options=self.options,
            uids=self.uids,
            date_offset=self.date_offset(key),
            identifiers=_identifier_patterns(dataset),
        )
        _walk(result, context, in_dummy_sequence=False)
        self._set_identity(result, key)
        _mark_deidentified(result, self.options)
        _update_file_meta(result)
        return result

    def _set_identity(self, dataset: Dataset, key: str) -> None:
        pseudonym = self.patient_pseudonym(key)
        dataset.PatientID = self.options.patient_id or pseudonym
        dataset.PatientName = self.options.patient_name or f"ANONYMOUS^{pseudonym}"


def deidentify(dataset: Dataset, salt: bytes, options: DeidentifyOptions | None = None) -> Dataset:
    """A de-identified copy of ``dataset``; see :class:`Deidentifier`."""
    return Deidentifier(salt, options).deidentify(dataset)


def _text(dataset: Dataset, tag: BaseTag) -> str:
    element = dataset.get(tag)
    if element is None or element.value is None:
        return ""
    return str(element.value).strip()


def patient_key(dataset: Dataset) -> str:
    """Who the patient is, for pseudonyms and date shifts
    (:meth:`Deidentifier.patient_pseudonym`, :meth:`Deidentifier.date_offset`):
    Patient ID with its issuer, or name and birth date when there is no ID."""
    patient_id = _text(dataset, _PATIENT_ID)
    if patient_id:
        return f"id\x00{patient_id}\x00{_text(dataset, _ISSUER_OF_PATIENT_ID)}"
    return f"name\x00{_text(dataset, _PATIENT_NAME)}\x00{_text(dataset, _PATIENT_BIRTH_DATE)}"


def _values(element: DataElement) -> list[Any]:
    value = element.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _identifier_patterns(dataset: Dataset) -> tuple[re.Pattern[str], ...]:
    found: set[str] = set()
    for tag in _IDENTIFYING_TAGS:
        element = dataset.get(tag)
        if element is None:
            continue
        for value in _values(element):
            text = str(value).strip()
            found.add(text)
            if element.VR == "PN":
                found.update(part.strip() for part in re.split(r"[\^=\s,]+", text))
    usable = sorted((s for s in found if len(s) >= _MIN_IDENTIFIER_LENGTH), key=len, reverse=True)
    return tuple(re.compile(re.escape(s), re.IGNORECASE) for s in usable)


def _collapse(action: str) -> str:
    """One action for a table cell: D when allowed, else Z, else the cell."""
    if action == "X/Z/U*":
        return "U*"
    choices = action.split("/")
    for preferred in ("D", "Z"):
        if preferred in choices:
            return preferred
    return choices[0]


def _resolve(row: ProfileRow, options: DeidentifyOptions) -> str:
    if options.retain_longitudinal_modified_dates and row.retain_modified_dates:
        return row.retain_modified_dates
    if options.retain_patient_characteristics and row.retain_patient_characteristics:
        return row.retain_patient_characteristics
    if options.clean_descriptors and row.clean_descriptors:
        return row.clean_descriptors
    return _collapse(row.basic)


def _removed_without_row(tag: BaseTag) -> bool:
    group = tag.group
    return (
        tag.is_private
        or 0x5000 <= group <= 0x50FF  # Curve Data
        or 0x6000 <= group <= 0x60FF  # overlays: data and comments are X
        or (tag.element == 0 and group > 0x0002)  # group lengths change
    )


def _walk(dataset: Dataset, context: _Context, *, in_dummy_sequence: bool) -> None:
    for tag in list(dataset.keys()):
        if _removed_without_row(tag):
            del dataset[tag]
            continue
        element = dataset[tag]
        row = PROFILE.get(int(tag))
        if row is None:
            _default(dataset, element, context, in_dummy_sequence=in_dummy_sequence)
        else:
            _apply(dataset, element, _resolve(row, context.options), context)


def _walk_items(element: DataElement, context: _Context, *, dummy: bool) -> None:
    for item in element.value or ():
        _walk(item, context, in_dummy_sequence=dummy)


def _apply(dataset: Dataset, element: DataElement, action: str, context: _Context) -> None:
    is_sequence = element.VR == "SQ"
    if action == "X":
        del dataset[element.tag]
    elif action == "Z":
        element.value = DicomSequence() if is_sequence else element.empty_value
    elif is_sequence:  # D, K, C, U, U*: the profile applies to the items
        _walk_items(element, context, dummy=action == "D")
    elif action in ("U", "U*"):
        _map_uids(element, context.uids)
    elif action == "D":
        _dummy(element, context)
    elif action == "C":
        _clean(element, context)
    # K: kept as is


def _default(dataset: Dataset, element: DataElement, context: _Context, *, in_dummy_sequence: bool) -> None:
    """An attribute Table E.1-1 does not list."""
    vr = element.VR
    if vr == "SQ":
        _walk_items(element, context, dummy=in_dummy_sequence)
    elif vr == "UI":
        if not _is_kept_uid(element):
            _map_uids(element, context.uids)
    elif vr in ("DA", "DT"):
        if context.options.retain_longitudinal_modified_dates:
            _shift_dates(element, context.date_offset)
        else:
            _dummy(element, context)
    elif vr == "PN" or (in_dummy_sequence and vr in _FREE_TEXT_VRS):
        _dummy(element, context)


def _is_kept_uid(element: DataElement) -> bool:
    keyword = keyword_for_tag(element.tag)
    if keyword.endswith(_KEPT_UID_KEYWORD_SUFFIXES):
        return True
    # Registered DICOM UIDs (under 1.2.840.10008) name SOP classes, transfer
    # syntaxes, well-known instances: nothing about a patient.
    return all(not UID(str(value)).is_private for value in _values(element))


def _map_uids(element: DataElement, uids: UidMapper) -> None:
    if element.VR != "UI":  # e.g. UN in an implicit VR private encoding: cannot be mapped, so dropped
        element.value = element.empty_value
        return
    mapped = [uids.map(str(value)) for value in _values(element) if str(value).strip("\x00 ")]
    _set_values(element, mapped)


def _set_values(element: DataElement, values: Sequence[Any]) -> None:
    if not values:
        element.value = element.empty_value
    elif len(values) == 1:
        element.value = values[0]
    else:
        element.value = list(values)


def _dummy(element: DataElement, context: _Context) -> None:
    if element.VR == "UI":
        _map_uids(element, context.uids)
    elif not _values(element):
        return  # already empty: nothing to hide
    elif element.VR in _DUMMY_BY_VR:
        element.value = _DUMMY_BY_VR[element.VR]
    else:
        element.value = element.empty_value


def _clean(element: DataElement, context: _Context) -> None:
    vr = element.VR
    if vr in ("DA", "DT"):
        if context.options.retain_longitudinal_modified_dates:
            _shift_dates(element, context.date_offset)
        else:
            _dummy(element, context)
    elif vr in _TEXT_VRS:
        _set_values(element, [_scrub(str(value), context.identifiers) for value in _values(element)])
    elif vr == "UI":
        _map_uids(element, context.uids)
    # TM, numbers, codes: a shift by whole days leaves times as they were


def _scrub(text: str, identifiers: Iterable[re.Pattern[str]]) -> str:
    for pattern in identifiers:
        text = pattern.sub("", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def _shift_dates(element: DataElement, days: int) -> None:
    shift = _shift_da if element.VR == "DA" else _shift_dt
    _set_values(element, [shift(str(value), days) for value in _values(element)])


def _parse_da(text: str) -> date | None:
    old = _DA_OLD_FORMAT.match(text)
    if old:
        text = "".join(old.groups())
    if len(text) != _DA_LENGTH or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _shift_da(value: str, days: int) -> str:
    parsed = _parse_da(value.strip())
    # A date that cannot be shifted cannot be kept either.
    return (parsed + timedelta(days=days)).strftime(_DA_FORMAT) if parsed else ""


def _shift_dt(value: str, days: int) -> str:
    value = value.strip()
    parsed = _parse_da(value[:_DA_LENGTH])
    if parsed is None:
        return ""
    return (parsed + timedelta(days=days)).strftime(_DA_FORMAT) + value[_DA_LENGTH:]


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue = code[0]
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = code[1]
    return item


def _mark_deidentified(dataset: Dataset, options: DeidentifyOptions) -> None:
    codes = [BASIC_PROFILE_CODE]
    if options.retain_longitudinal_modified_dates:
        codes.append(RETAIN_MODIFIED_DATES_CODE)
    if options.retain_patient_characteristics:
        codes.append(RETAIN_PATIENT_CHARACTERISTICS_CODE)
    if options.clean_descriptors:
        codes.append(CLEAN_DESCRIPTORS_CODE)
    dataset.PatientIdentityRemoved = "YES"
    # LO is at most 64 characters: one value per method.
    dataset.DeidentificationMethod = [meaning[:64] for _, meaning in codes]
    dataset.DeidentificationMethodCodeSequence = DicomSequence([_code_item(code) for code in codes])
    dataset.LongitudinalTemporalInformationModified = (
        "MODIFIED" if options.retain_longitudinal_modified_dates else "REMOVED"
    )


def _update_file_meta(dataset: Dataset) -> None:
    meta = getattr(dataset, "file_meta", None)
    if not isinstance(meta, FileMetaDataset):
        return
    for tag in _META_TAGS_DROPPED:
        if tag in meta:
            del meta[tag]
    if "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
