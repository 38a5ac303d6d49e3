"""What the index needs from a received DICOM file, read without decoding pixel data.

`read_metadata(path, ...)` parses the Part 10 file the listener wrote while receiving (its File
Meta, `dicom.filemeta`, carries the command's SOP Class/Instance UIDs and the accepted transfer
syntax). A file `dicom.header` walks to its end gives the elements read here, each converted by
pydicom's own value converters without a pydicom `Dataset` around them (0.5 ms against 1.0 ms
per header, measured here); anything else goes through pydicom's reader. Values larger than a
few hundred bytes are not read (`defer_size`): a 1 GB instance costs the same memory as a 1 MB
one. Text is decoded by pydicom from the header's Specific
Character Set (ISO_IR 100, ISO_IR 127, ISO_IR 192, ISO 2022 escapes...). A dataset that ends
inside an element (truncated), cannot be parsed, lacks a required UID or carries an invalid one
raises `DicomInputError` with a reason slug; nothing here writes or names a file.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Final, Protocol, cast

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import PersonName
from pydicom.values import convert_value

from dicom.header import (
    PREFIX,
    UNDEFINED,
    HeaderError,
    RawElement,
    WalkedFile,
    walk_file,
    walk_items,
)
from ingest.errors import InputError
from ingest.records import (
    NATIONAL_ID_AUTHORITIES,
    NATIONAL_ID_SYSTEM,
    DicomInstance,
    PatientName,
    PatientRef,
)

LOCAL_ID_PREFIX: Final = "dicom-ae/"
"""A PatientID without an issuer belongs to the sender: its system is `dicom-ae/<calling AE>`."""

_UID: Final = re.compile(r"[0-9]+(\.[0-9]+)*", re.ASCII)
_UID_MAX: Final = 64
_DEFER: Final = 512
_DELIMITER: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) length 0, little endian
_TEXT_MAX: Final = 1024
DEFLATED: Final = "1.2.840.10008.1.2.1.99"


class DicomInputError(InputError):
    """The dataset is refused; `reason` is one of `dicom.status.REASON_STATUS`."""


@dataclass(frozen=True, slots=True)
class InstanceMetadata:
    """The header fields the index keeps, decoded."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    charset: str
    patient: tuple[PatientRef, ...]
    patient_name: str
    patient_names: tuple[PatientName, ...]
    patient_birth_date: date | None
    patient_sex: str
    dicom_patient_id: str
    issuer_of_patient_id: str
    study_date: date | None
    study_time: time | None
    study_started: datetime | None
    study_description: str
    study_id: str
    accession_number: str
    referring_physician: str
    series_number: int | None
    series_description: str
    modality: str
    body_part: str
    instance_number: int | None
    content_date: date | None

    def record(self, file_path: str, size: int, sha256: bytes, calling_ae: str) -> DicomInstance:
        """The index entry of this header's instance, stored at `file_path` (relative to the
        store) with `size` bytes of SHA-256 `sha256`, received from `calling_ae`."""
        return DicomInstance(
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            transfer_syntax=self.transfer_syntax,
            file_path=file_path,
            size=size,
            sha256=sha256,
            calling_ae=calling_ae,
            patient=self.patient,
            patient_name=self.patient_name,
            patient_names=self.patient_names,
            patient_birth_date=self.patient_birth_date,
            patient_sex=self.patient_sex,
            dicom_patient_id=self.dicom_patient_id,
            issuer_of_patient_id=self.issuer_of_patient_id,
            charset=self.charset,
            study_date=self.study_date,
            study_time=self.study_time,
            study_started=self.study_started,
            study_description=self.study_description,
            study_id=self.study_id,
            accession_number=self.accession_number,
            referring_physician=self.referring_physician,
            series_number=self.series_number,
            series_description=self.series_description,
            modality=self.modality,
            body_part=self.body_part,
            instance_number=self.instance_number,
            content_date=self.content_date,
        )


def valid_uid(value: str) -> bool:
    return len(value) <= _UID_MAX and _UID.fullmatch(value) is not None


def read_metadata(
    path: Path,
    *,
    calling_ae: str,
    command_sop_instance_uid: str | None = None,
    command_sop_class_uid: str | None = None,
) -> InstanceMetadata:
    """Parse the header of the Part 10 file at `path`; raise `DicomInputError` when refused."""
    try:
        walked = _walk(path)
        if walked is not None:
            try:
                return _extract(
                    walked.transfer_syntax,
                    _RawValues(walked.elements, walked.implicit),
                    calling_ae,
                    command_sop_instance_uid,
                    command_sop_class_uid,
                )
            except _NotPlain:
                ds = _dataset(walked)
        else:
            ds = dcmread(path, defer_size=_DEFER, force=True)
            _check_complete(ds, path)
        return _extract(
            transfer_syntax_of(ds),
            _Values(ds),
            calling_ae,
            command_sop_instance_uid,
            command_sop_class_uid,
        )
    except DicomInputError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise  # the file could not be read: not the sender's fault
        # pydicom's own word for a dataset that ends inside a sequence item
        raise DicomInputError("unparseable", "dataset cannot be parsed: truncated") from exc
    except Exception as exc:  # pydicom raises many kinds of errors on malformed input
        raise DicomInputError(
            "unparseable", f"dataset cannot be parsed: {type(exc).__name__}"
        ) from exc


def transfer_syntax_of(ds: Dataset) -> str:
    """The Transfer Syntax UID of a dataset read by pydicom ("" when its file meta lacks one)."""
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _walk(path: Path) -> WalkedFile | None:
    """The elements `_extract` reads, found by `dicom.header` in a file it walked to its end; None
    when it does not walk this file (pydicom reads it instead)."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size < PREFIX:
            return None
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            try:
                return walk_file(view, _WANTED)
            except HeaderError:
                return None


def _raw(raw: RawElement, implicit: bool) -> RawDataElement:
    """An element `dicom.header` found, as pydicom's reader gives it."""
    value = raw.value or empty_value_for_VR(raw.vr, raw=True)
    return RawDataElement(
        BaseTag(raw.tag), raw.vr, raw.length, cast(bytes | None, value), raw.offset, implicit, True
    )


def _dataset(walked: WalkedFile) -> Dataset:
    """The elements `dicom.header` found, as a pydicom dataset (pydicom decodes them)."""
    elements: dict[BaseTag, DataElement | RawDataElement] = {
        BaseTag(tag): _raw(raw, walked.implicit) for tag, raw in walked.elements.items()
    }
    ds = Dataset(elements)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(walked.transfer_syntax)
    ds.set_original_encoding(walked.implicit, True)
    return ds


def _check_complete(ds: Dataset, path: Path) -> None:
    """Refuse a dataset that ends inside its last element (a truncated transfer)."""
    size = os.stat(path).st_size
    elements = list(ds._dict.values())
    if not elements:
        raise DicomInputError("unparseable", "empty dataset")
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        return  # offsets are in the inflated stream; zlib itself refuses a cut stream
    last = elements[-1]
    if not isinstance(last, RawDataElement) or last.value_tell is None:
        return
    if last.length == UNDEFINED:
        with open(path, "rb") as f:
            f.seek(max(0, size - len(_DELIMITER)))
            if f.read() != _DELIMITER:
                raise DicomInputError("unparseable", "dataset truncated inside a sequence")
    elif last.value_tell + last.length > size:
        raise DicomInputError("unparseable", "dataset truncated inside an element")


class Values(Protocol):
    """How `_extract` reads a dataset: an element's decoded value by keyword (None when absent),
    and the same for an item of one of its sequences."""

    def get(self, keyword: str) -> Any: ...

    def item(self, item: Dataset) -> Values: ...


class _Values:
    """The values `_extract` reads, each decoded once from its raw element by pydicom's own
    converters (`convert_value`; `convert_raw_data_element` for an element written with another
    VR than the dictionary's), with the dataset's encodings worked out once. `Dataset.get` goes
    the long way for each of them (keyword lookup, the Specific Character Set converted again,
    the converted element stored back): about twice the time, for the same values (the
    differential test in tests/test_dicom_metadata.py compares both over pydicom's test files)."""

    def __init__(self, ds: Dataset, encodings: list[str] | None = None) -> None:
        self._ds = ds
        charset = ds.get_item(_CHARSET)
        if charset is not None:
            encodings = convert_encodings(self._decode(charset, None))
        self._encodings = encodings or convert_encodings(None)

    def get(self, keyword: str) -> Any:
        tag = _TAGS.get(keyword)
        if tag is None:
            return self._ds.get(keyword)  # a sequence: pydicom's way
        element = self._ds.get_item(tag)
        return None if element is None else self._decode(element, self._encodings)

    def item(self, item: Dataset) -> Values:
        """A sequence item's values: its own Specific Character Set, else its dataset's."""
        return _Values(item, self._encodings)

    def _decode(self, element: Any, encodings: list[str] | None) -> Any:
        if isinstance(element, RawDataElement):
            vr = _VRS.get(element.tag)
            if vr is not None and element.VR in (None, vr) and element.value is not None:
                return convert_value(vr, element, encodings)  # what the hooks would call
            return convert_raw_data_element(element, encoding=encodings, ds=self._ds).value
        return element.value


class _NotPlain(Exception):
    """An element `_RawValues` does not convert on its own (written with a VR other than the
    dictionary's, or a sequence it does not walk): pydicom decodes the whole header instead."""


class _RawValues:
    """The same values as `_Values`, straight from the elements `dicom.header` found: no pydicom
    `Dataset` around them (building one, and reading the Other Patient IDs items through it,
    was most of the parse). An element `_Values` would hand to pydicom's hooks raises `_NotPlain`
    instead."""

    def __init__(
        self, elements: dict[int, RawElement], implicit: bool, encodings: list[str] | None = None
    ) -> None:
        self._elements = elements
        self._implicit = implicit
        charset = elements.get(_CHARSET)
        if charset is not None:
            encodings = convert_encodings(self._decode(charset, None))
        self._encodings = encodings or convert_encodings(None)

    def get(self, keyword: str) -> Any:
        if keyword == "OtherPatientIDsSequence":
            return self._items(self._elements.get(_OTHER_PATIENT_IDS))
        element = self._elements.get(_TAGS[keyword])
        return None if element is None else self._decode(element, self._encodings)

    def item(self, item: Any) -> Values:
        """An item of `get("OtherPatientIDsSequence")`: its own Specific Character Set, else its
        dataset's."""
        return _RawValues(item, self._implicit, self._encodings)

    def _items(self, element: RawElement | None) -> list[dict[int, RawElement]] | None:
        if element is None:
            return None
        if element.vr not in (None, "SQ"):
            raise _NotPlain
        try:
            return walk_items(element.value, self._implicit, _ITEM_WANTED)
        except HeaderError as exc:
            raise _NotPlain from exc

    def _decode(self, element: RawElement, encodings: list[str] | None) -> Any:
        vr = _VRS[element.tag]
        if element.vr not in (None, vr):
            raise _NotPlain
        return convert_value(vr, _raw(element, self._implicit), encodings)


_CHARSET: Final = 0x00080005
_TAGS: Final[dict[str, int]] = {
    keyword: tag
    for keyword in (
        "SOPInstanceUID",
        "SOPClassUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SpecificCharacterSet",
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "TimezoneOffsetFromUTC",
        "StudyDescription",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "SeriesNumber",
        "SeriesDescription",
        "Modality",
        "BodyPartExamined",
        "InstanceNumber",
        "ContentDate",
    )
    if (tag := tag_for_keyword(keyword)) is not None
}
"""The elements `_Values` decodes itself (no sequence among them)."""
_VRS: Final[dict[int, str]] = {tag: dictionary_VR(tag) for tag in _TAGS.values()}
"""Their VRs: an element written with its dictionary VR (or in implicit VR) is converted by
pydicom's `convert_value` straight away, without the hooks and the `DataElement` around it."""
_OTHER_PATIENT_IDS: Final = 0x00101002
_WANTED: Final = frozenset({*_TAGS.values(), _OTHER_PATIENT_IDS})
"""Every top-level element `_extract` reads."""
_ITEM_WANTED: Final = frozenset({_CHARSET, _TAGS["PatientID"], _TAGS["IssuerOfPatientID"]})
"""What `_extract` reads in an Other Patient IDs item."""


def _extract(
    transfer_syntax: str,
    values: Values,
    calling_ae: str,
    command_instance: str | None,
    command_class: str | None,
) -> InstanceMetadata:
    sop_instance = _uid(values, "SOPInstanceUID")
    sop_class = _uid(values, "SOPClassUID")
    study = _uid(values, "StudyInstanceUID")
    series = _uid(values, "SeriesInstanceUID")
    if command_instance == "" or command_class == "":
        raise DicomInputError("missing-uid", "the C-STORE command lacks an Affected SOP UID")
    if command_instance is not None and command_instance != sop_instance:
        raise DicomInputError("uid-mismatch", "SOP Instance UID differs from the command's")
    if command_class is not None and command_class != sop_class:
        raise DicomInputError("uid-mismatch", "SOP Class UID differs from the command's")
    if not valid_uid(transfer_syntax):
        raise DicomInputError("unparseable", "no valid transfer syntax in the file meta")

    get = values.get
    charset = _charset(get("SpecificCharacterSet"))
    pid = _text(values, "PatientID")
    issuer = _text(values, "IssuerOfPatientID")
    name_value = get("PatientName")
    name_text = _without_nul(str(name_value)) if name_value is not None else ""
    study_date = _date(get("StudyDate"))
    study_time = _time(get("StudyTime"))
    return InstanceMetadata(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_uid=study,
        series_uid=series,
        transfer_syntax=transfer_syntax,
        charset=charset,
        patient=_identifiers(values, pid, issuer, calling_ae),
        patient_name=name_text[:_TEXT_MAX],
        patient_names=_names(name_value),
        patient_birth_date=_date(get("PatientBirthDate")),
        patient_sex=_text(values, "PatientSex")[:16],
        dicom_patient_id=pid,
        issuer_of_patient_id=issuer,
        study_date=study_date,
        study_time=study_time,
        study_started=_started(study_date, study_time, get("TimezoneOffsetFromUTC")),
        study_description=_text(values, "StudyDescription"),
        study_id=_text(values, "StudyID"),
        accession_number=_text(values, "AccessionNumber"),
        referring_physician=_text(values, "ReferringPhysicianName"),
        series_number=_int(get("SeriesNumber")),
        series_description=_text(values, "SeriesDescription"),
        modality=_text(values, "Modality")[:16],
        body_part=_text(values, "BodyPartExamined"),
        instance_number=_int(get("InstanceNumber")),
        content_date=_date(get("ContentDate")),
    )


def _uid(values: Values, keyword: str) -> str:
    value = values.get(keyword)
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text:
        raise DicomInputError("missing-uid", f"{keyword} is missing")
    if not valid_uid(text):
        raise DicomInputError("invalid-uid", f"{keyword} is not a valid UID")
    return text


def _charset(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return _without_nul(value)
    return _without_nul("\\".join(str(v) for v in value))


def _text(values: Values, keyword: str) -> str:
    value = values.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return _without_nul(str(value)).strip()[:_TEXT_MAX]


def _without_nul(text: str) -> str:
    """A text value without its NUL characters. DICOM allows NUL only as the padding of a UID
    or binary value, yet some devices pad or cut text with it; PostgreSQL stores no NUL in text
    or jsonb, so a value keeping one made the whole index row refused (0xC003)."""
    return text.replace("\x00", "")


def _identifiers(values: Values, pid: str, issuer: str, calling_ae: str) -> tuple[PatientRef, ...]:
    refs: list[PatientRef] = []
    if pid:
        refs.append(PatientRef(_system(issuer, calling_ae), pid))
    for item in values.get("OtherPatientIDsSequence") or ():
        other = values.item(item)
        number = _text(other, "PatientID")
        if number:
            refs.append(PatientRef(_system(_text(other, "IssuerOfPatientID"), calling_ae), number))
    return tuple(dict.fromkeys(refs))


def _system(issuer: str, calling_ae: str) -> str:
    if issuer.upper() in NATIONAL_ID_AUTHORITIES:
        return NATIONAL_ID_SYSTEM
    return issuer or LOCAL_ID_PREFIX + calling_ae


def _names(value: Any) -> tuple[PatientName, ...]:
    if not isinstance(value, PersonName):
        return ()
    names = []
    for group in value.components:
        parts = group.split("^")
        parts += [""] * (5 - len(parts))
        family, given, middle, prefix, suffix = (_without_nul(p).strip() for p in parts[:5])
        if not any((family, given, middle, prefix, suffix)):
            continue
        names.append(
            PatientName(
                family=family or None,
                given=tuple(p for p in (given, middle) if p),
                prefix=(prefix,) if prefix else (),
                suffix=(suffix,) if suffix else (),
            )
        )
    return tuple(names)


def _date(value: Any) -> date | None:
    text = str(value).strip() if value is not None else ""
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _time(value: Any) -> time | None:
    text = str(value).strip().replace(":", "") if value is not None else ""
    digits = text.split(".")[0]
    if len(digits) < 2 or not digits.isdigit():
        return None
    try:
        return time(int(digits[:2]), int(digits[2:4] or 0), int(digits[4:6] or 0))
    except ValueError:
        return None


def _started(day: date | None, at: time | None, offset: Any) -> datetime | None:
    """The study's instant, when its date, time and UTC offset are all known. An offset without
    a time is no instant: midnight there would move the study to the day before in UTC."""
    text = str(offset).strip() if offset is not None else ""
    if day is None or at is None or len(text) != 5 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    delta = timedelta(hours=int(text[1:3]), minutes=int(text[3:5]))
    zone = timezone(-delta if text[0] == "-" else delta)
    return datetime.combine(day, at, zone).astimezone(UTC)


def _int(value: Any) -> int | None:
    try:
        number = int(str(value).strip()) if value is not None else None
    except ValueError:
        return None
    if number is None or not -(2**31) <= number < 2**31:
        return None
    return number
