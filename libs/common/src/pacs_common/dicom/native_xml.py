"""The PS3.19 Native DICOM Model (XML) of a dataset, and back.

pydicom has no XML writer; this module is a *serialization* of the DICOM
JSON model (PS3.18 F.2, produced and read by pydicom, see
:mod:`pacs_common.dicom.json_files`) as the Native DICOM Model of PS3.19
A.1, not a DICOM parser: values are converted by pydicom on both sides.

* ``<NativeDicomModel>`` holds ``<DicomAttribute tag="GGGGEEEE" vr=".."
  keyword="..">`` (``privateCreator`` instead of ``keyword`` for private
  attributes);
* values: ``<Value number="n">``; person names ``<PersonName number="n">``
  with ``Alphabetic`` / ``Ideographic`` / ``Phonetic`` groups of
  ``FamilyName``, ``GivenName``, ``MiddleName``, ``NamePrefix``,
  ``NameSuffix``; sequences ``<Item number="n">``; binary values
  ``<InlineBinary>`` (base64) or ``<BulkData uri="...">``.
* An empty ``<Value number="n"/>`` is an empty value in a multi-valued
  attribute (``null`` in JSON).

XML 1.0 cannot carry every character a DICOM string may hold (C0 controls
other than tab, line feed and carriage return): such a value is refused with
:class:`NativeXmlError` rather than written as an unreadable document.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any, Final

from pydicom.datadict import keyword_for_tag

__all__ = ["NativeXmlError", "model_from_xml", "model_to_xml"]

_PN_GROUPS: Final = ("Alphabetic", "Ideographic", "Phonetic")
_PN_COMPONENTS: Final = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_INT_VRS: Final = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_FLOAT_VRS: Final = frozenset({"FL", "FD"})
_XML_ILLEGAL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class NativeXmlError(Exception):
    """The model cannot be written as, or read from, Native DICOM Model XML."""


# -- writing ------------------------------------------------------------------


def model_to_xml(model: dict[str, Any]) -> bytes:
    """The UTF-8 encoded ``NativeDicomModel`` document of a DICOM JSON model."""
    root = ET.Element("NativeDicomModel", {"xml:space": "preserve"})
    _write_attributes(root, model)
    ET.indent(root, space="  ")
    # A parser turns a literal CR (and CR LF) into LF: keep it as a character
    # reference.  ElementTree already does so in attributes; a CR in the
    # output can only come from a value.
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document.replace(b"\r", b"&#13;")


def _write_attributes(parent: ET.Element, model: dict[str, Any]) -> None:
    for key in sorted(model, key=lambda k: int(k, 16)):
        attribute = model[key]
        tag = int(key, 16)
        vr = str(attribute.get("vr", "UN"))
        creator = _private_creator(model, tag)
        # PS3.19 A.1: a private data element is named by gggg00ee and its
        # creator; the block (xx of ggggxxee) is the reader's business.
        written = tag & 0xFFFF00FF if creator and _unique_creator(model, tag, creator) else tag
        element = ET.SubElement(parent, "DicomAttribute", {"tag": f"{written:08X}", "vr": vr})
        if creator:
            element.set("privateCreator", creator)
        elif creator is None:
            keyword = keyword_for_tag(tag)
            if keyword:
                element.set("keyword", keyword)
        try:
            _write_values(element, vr, attribute)
        except NativeXmlError as exc:
            raise NativeXmlError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): {exc}") from None


def _unique_creator(model: dict[str, Any], tag: int, creator: str) -> bool:
    """Whether no other block of the group has the same creator (then the
    block can be left out of the tag)."""
    group = tag >> 16
    names = [
        attribute.get("Value", [None])[0]
        for key, attribute in model.items()
        if int(key, 16) >> 16 == group and 0x10 <= int(key, 16) & 0xFFFF <= 0xFF
    ]
    return names.count(creator) == 1


def _private_creator(model: dict[str, Any], tag: int) -> str | None:
    group, elem = tag >> 16, tag & 0xFFFF
    if group % 2 == 0 or elem < 0x1000:
        return None
    creator = model.get(f"{(group << 16) | (elem >> 8):08X}", {}).get("Value", [])
    return str(creator[0]) if creator and creator[0] is not None else ""


def _write_values(element: ET.Element, vr: str, attribute: dict[str, Any]) -> None:
    if "InlineBinary" in attribute:
        ET.SubElement(element, "InlineBinary").text = str(attribute["InlineBinary"])
        return
    if "BulkDataURI" in attribute:
        ET.SubElement(element, "BulkData", {"uri": str(attribute["BulkDataURI"])})
        return
    for number, value in enumerate(attribute.get("Value", []), start=1):
        if vr == "SQ":
            item = ET.SubElement(element, "Item", {"number": str(number)})
            _write_attributes(item, value or {})
        elif vr == "PN":
            _write_person_name(element, number, value)
        else:
            node = ET.SubElement(element, "Value", {"number": str(number)})
            if value is not None:
                node.text = _text(value)


def _write_person_name(element: ET.Element, number: int, value: Any) -> None:
    node = ET.SubElement(element, "PersonName", {"number": str(number)})
    if not isinstance(value, dict):
        return
    for group in _PN_GROUPS:
        name = value.get(group)
        if name is None:
            continue
        group_node = ET.SubElement(node, group)
        parts = str(name).split("^")
        if len(parts) > len(_PN_COMPONENTS):
            raise NativeXmlError(f"a person name with more than five components: {name!r}")
        for component, part in zip(_PN_COMPONENTS, parts, strict=False):
            ET.SubElement(group_node, component).text = _text(part)


def _text(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    if _XML_ILLEGAL.search(text):
        raise NativeXmlError(f"a value holds characters XML 1.0 cannot carry: {text[:40]!r}")
    return text


# -- reading ------------------------------------------------------------------


def model_from_xml(document: bytes) -> dict[str, Any]:
    """The DICOM JSON model of a ``NativeDicomModel`` document (ours or another
    writer's, e.g. DCMTK's ``dcm2xml --native-format``)."""
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise NativeXmlError(f"not well-formed XML: {exc}") from exc
    if _local(root.tag) != "NativeDicomModel":
        raise NativeXmlError(f"the root element is <{_local(root.tag)}>, not <NativeDicomModel>")
    return _read_attributes(root)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _read_attributes(parent: ET.Element) -> dict[str, Any]:
    model: dict[str, Any] = {}
    private: list[tuple[ET.Element, str]] = []
    for element in parent:
        if _local(element.tag) == "DicomAttribute" and element.get("privateCreator"):
            private.append((element, element.get("privateCreator", "")))
            continue
        if _local(element.tag) != "DicomAttribute":
            continue
        tag_text = element.get("tag", "")
        try:
            tag = int(tag_text, 16)
        except ValueError:
            raise NativeXmlError(f"a DicomAttribute with the tag {tag_text!r}") from None
        vr = element.get("vr") or "UN"
        try:
            model[f"{tag:08X}"] = _read_attribute(element, vr)
        except (ValueError, NativeXmlError) as exc:
            raise NativeXmlError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): {exc}") from None
    for element, creator in private:
        _read_private(model, element, creator)
    return model


def _read_private(model: dict[str, Any], element: ET.Element, creator: str) -> None:
    """Place a private attribute (tag gggg00ee or ggggxxee + privateCreator)
    in the block its creator holds, reserving a block when none does."""
    tag_text = element.get("tag", "")
    try:
        tag = int(tag_text, 16)
    except ValueError:
        raise NativeXmlError(f"a DicomAttribute with the tag {tag_text!r}") from None
    group = tag >> 16
    if tag & 0xFF00:  # the block is given (a creator reserving several blocks)
        model[f"{tag:08X}"] = _read_attribute(element, element.get("vr") or "UN")
        return
    blocks = {
        int(key, 16) & 0xFF: attribute.get("Value", [None])[0]
        for key, attribute in model.items()
        if int(key, 16) >> 16 == group and 0x10 <= int(key, 16) & 0xFFFF <= 0xFF
    }
    block = next((b for b, name in sorted(blocks.items()) if name == creator), None)
    if block is None:
        block = next((b for b in range(0x10, 0x100) if b not in blocks), None)
        if block is None:
            raise NativeXmlError(f"no free private block in group {group:04X} for {creator!r}")
        model[f"{(group << 16) | block:08X}"] = {"vr": "LO", "Value": [creator]}
    full = (group << 16) | (block << 8) | (tag & 0xFF)
    try:
        model[f"{full:08X}"] = _read_attribute(element, element.get("vr") or "UN")
    except (ValueError, NativeXmlError) as exc:
        raise NativeXmlError(f"({group:04X},{full & 0xFFFF:04X}): {exc}") from None


def _read_attribute(element: ET.Element, vr: str) -> dict[str, Any]:
    attribute: dict[str, Any] = {"vr": vr}
    values: dict[int, Any] = {}
    for child in element:
        name = _local(child.tag)
        if name == "InlineBinary":
            attribute["InlineBinary"] = "".join((child.text or "").split())
        elif name == "BulkData":
            uri = child.get("uri")
            if uri is None:
                raise NativeXmlError("a BulkData element without uri (uuid references are not supported)")
            attribute["BulkDataURI"] = uri
        elif name == "Item":
            values[_number(child, len(values))] = _read_attributes(child)
        elif name == "PersonName":
            values[_number(child, len(values))] = _read_person_name(child)
        elif name == "Value":
            values[_number(child, len(values))] = _value(vr, child.text)
    if values:
        attribute["Value"] = [values.get(n) for n in range(1, max(values) + 1)]
    return attribute


def _number(child: ET.Element, count: int) -> int:
    number = child.get("number")
    return int(number) if number else count + 1


def _value(vr: str, text: str | None) -> Any:
    if text is None or (vr in _INT_VRS | _FLOAT_VRS | {"DS"} and not text.strip()):
        return None
    if vr in _INT_VRS:
        return int(text.strip())
    if vr in _FLOAT_VRS:
        return float(text.strip())
    if vr == "DS":
        stripped = text.strip()
        try:
            return int(stripped)
        except ValueError:
            return float(stripped)
    return text


def _read_person_name(node: ET.Element) -> dict[str, str]:
    value: dict[str, str] = {}
    for group in node:
        group_name = _local(group.tag)
        if group_name not in _PN_GROUPS:
            continue
        parts = {_local(part.tag): part.text or "" for part in group}
        present = [i for i, component in enumerate(_PN_COMPONENTS) if component in parts]
        last = max(present, default=-1)
        value[group_name] = "^".join(parts.get(c, "") for c in _PN_COMPONENTS[: last + 1])
    return value
