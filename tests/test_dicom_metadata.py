"""The header values the index keeps: read from a received file exactly as pydicom's own
`Dataset.get` decodes them (the reference), in every character set pydicom ships."""

from __future__ import annotations

import tempfile
from datetime import UTC, date, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom.metadata import (
    DicomInputError,
    InstanceMetadata,
    Values,
    _check_complete,
    _extract,
    read_metadata,
    transfer_syntax_of,
)

DATA = Path(pydicom.data.__file__).parent  # the files pydicom ships, not those it downloads
FILES = sorted(
    [*DATA.glob("test_files/**/*.dcm"), *DATA.glob("charset_files/*.dcm")],
    key=lambda p: p.name,
)


class DatasetValues:
    """The reference: pydicom's `Dataset.get` for every value."""

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds

    def get(self, keyword: str) -> Any:
        return self._ds.get(keyword)

    def item(self, item: Dataset) -> Values:
        return DatasetValues(item)


def outcome(read: Any) -> InstanceMetadata | str:
    try:
        return read()  # type: ignore[no-any-return]
    except DicomInputError as exc:
        return f"refused: {exc.reason}"


def reference(path: Path) -> InstanceMetadata | str:
    """What `read_metadata` gives with pydicom's reader and `Dataset.get` for each value."""

    def read() -> InstanceMetadata:
        try:
            ds = dcmread(path, defer_size=512, force=True)
            _check_complete(ds, path)
            return _extract(transfer_syntax_of(ds), DatasetValues(ds), "MODALITY", None, None)
        except DicomInputError:
            raise
        except Exception as exc:  # as read_metadata does
            raise DicomInputError("unparseable", type(exc).__name__) from exc

    return outcome(read)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_values_are_those_pydicom_decodes(path: Path) -> None:
    assert outcome(lambda: read_metadata(path, calling_ae="MODALITY")) == reference(path)


def test_charset_files_give_their_names_as_written() -> None:
    folder = DATA / "charset_files"
    arabic = read_metadata(folder / "chrArab.dcm", calling_ae="M")
    french = read_metadata(folder / "chrFren.dcm", calling_ae="M")
    assert (arabic.patient_name, french.patient_name) == ("قباني^لنزار", "Buc^Jérôme")


def with_other_ids(syntax: str = ExplicitVRLittleEndian, undefined: bool = False) -> Dataset:
    """An Arabic header whose Other Patient IDs items inherit its character set or carry their
    own."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.9.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.9.3"
    ds.SpecificCharacterSet = "ISO_IR 127"
    ds.PatientName = "قباني^لنزار"
    ds.PatientID = "P-1"
    inherits = Dataset()
    inherits.PatientID = "AB123456"
    inherits.IssuerOfPatientID = "مستشفى"  # in the dataset's ISO_IR 127
    own = Dataset()
    own.SpecificCharacterSet = "ISO_IR 100"
    own.PatientID = "77"
    own.IssuerOfPatientID = "Hôpital Ibn Sina"  # in the item's own ISO_IR 100
    ds.OtherPatientIDsSequence = Sequence([inherits, own])
    if undefined:
        ds["OtherPatientIDsSequence"].is_undefined_length = True
        for item in (inherits, own):
            item.is_undefined_length_sequence_item = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


def test_other_patient_ids_are_decoded_in_their_items_own_character_set(tmp_path: Path) -> None:
    path = tmp_path / "other-ids.dcm"
    with_other_ids().save_as(path, enforce_file_format=True)

    meta = read_metadata(path, calling_ae="MODALITY")
    assert [(r.system, r.value) for r in meta.patient] == [
        ("dicom-ae/MODALITY", "P-1"),
        ("مستشفى", "AB123456"),
        ("Hôpital Ibn Sina", "77"),
    ]
    assert meta == reference(path)


def test_a_file_meta_without_a_dataset_is_refused_as_unparseable(tmp_path: Path) -> None:
    """Found by the damaged-file test below: CT_small cut inside its last File Meta value and
    padded back to that value's length."""
    data = (DATA / "test_files" / "CT_small.dcm").read_bytes()
    path = tmp_path / "meta-only.dcm"
    path.write_bytes(data[:298] + b"\x00" * 4)
    assert outcome(lambda: read_metadata(path, calling_ae="MODALITY")) == "refused: unparseable"
    assert reference(path) == "refused: unparseable"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_empty_values_are_read_as_pydicom_reads_them(tmp_path: Path, syntax: str) -> None:
    """Empty in implicit VR, or an empty IS, is a value of None in pydicom's raw elements."""
    ds = with_other_ids(syntax)
    ds.PatientID = ds.IssuerOfPatientID = ds.PatientName = ds.StudyDate = ds.Modality = ""
    ds.InstanceNumber = ds.SeriesNumber = None
    path = tmp_path / "empty.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert outcome(lambda: read_metadata(path, calling_ae="MODALITY")) == reference(path)


def test_a_dataset_cut_inside_a_sequence_item_is_refused_not_taken_for_a_disk_error(
    tmp_path: Path,
) -> None:
    """pydicom says so with an OSError without an errno; the listener would have answered
    0xA700 (disk) and kept no dead letter."""
    data = part10(with_other_ids(ImplicitVRLittleEndian, undefined=True))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: data.index(b"\x10\x00\x02\x10") + 20])
    assert outcome(lambda: read_metadata(path, calling_ae="MODALITY")) == "refused: unparseable"


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


CT_SMALL = (DATA / "test_files" / "CT_small.dcm").read_bytes()
OTHER_IDS = [
    part10(with_other_ids(ExplicitVRLittleEndian)),
    part10(with_other_ids(ImplicitVRLittleEndian, undefined=True)),
]


@settings(max_examples=150, deadline=None)
@given(at=st.integers(min_value=0), garbage=st.binary(min_size=1, max_size=16), cut=st.booleans())
def test_a_damaged_file_gives_its_values_or_a_refusal_and_nothing_else(
    at: int, garbage: bytes, cut: bool
) -> None:
    at %= len(CT_SMALL)
    damaged = CT_SMALL[:at] + garbage + (b"" if cut else CT_SMALL[at + len(garbage) :])
    assert_read_as_pydicom_reads(damaged)


@settings(max_examples=150, deadline=None)
@given(
    sample=st.sampled_from(OTHER_IDS),
    at=st.integers(min_value=0),
    garbage=st.binary(min_size=1, max_size=16),
    cut=st.booleans(),
)
def test_damaged_other_patient_ids_give_their_values_or_a_refusal_and_nothing_else(
    sample: bytes, at: int, garbage: bytes, cut: bool
) -> None:
    start = sample.index(b"\x10\x00\x02\x10")  # (0010,1002) Other Patient IDs Sequence
    at = start + at % (len(sample) - start)
    damaged = sample[:at] + garbage + (b"" if cut else sample[at + len(garbage) :])
    assert_read_as_pydicom_reads(damaged)


def assert_read_as_pydicom_reads(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "damaged.dcm"
        path.write_bytes(data)
        assert outcome(lambda: read_metadata(path, calling_ae="MODALITY")) == reference(path)


@pytest.mark.parametrize(
    ("time_", "offset", "started"),
    [
        ("093000", "+0100", datetime(2026, 11, 20, 8, 30, tzinfo=UTC)),
        ("220000", "-0330", datetime(2026, 11, 21, 1, 30, tzinfo=UTC)),  # the next day in UTC
        ("001500", "+1400", datetime(2026, 11, 19, 10, 15, tzinfo=UTC)),  # the day before
        ("093000.123456", "+0000", datetime(2026, 11, 20, 9, 30, tzinfo=UTC)),  # whole seconds
        (None, "+0100", None),  # an offset without a time: the date alone, no invented midnight
        ("093000", None, None),  # a time in an unknown zone is no instant
        ("093000", "+01:00", None),  # not the DICOM form ±HHMM
        ("093000", "0100", None),
    ],
)
def test_the_study_instant_needs_a_date_a_time_and_an_offset(
    tmp_path: Path, time_: str | None, offset: str | None, started: datetime | None
) -> None:
    ds = with_other_ids()
    ds.StudyDate = "20261120"
    for keyword, value in (("StudyTime", time_), ("TimezoneOffsetFromUTC", offset)):
        if value is not None:
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)
    path = tmp_path / "timed.dcm"
    ds.save_as(path, enforce_file_format=True)
    meta = read_metadata(path, calling_ae="MODALITY")
    assert meta.study_started == started
    assert meta.study_date == date(2026, 11, 20)
