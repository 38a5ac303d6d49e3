"""The header walker: a Part 10 file's top-level elements found without decoding them, the
file refused (left to pydicom) unless it is walked cleanly to its end."""

from __future__ import annotations

from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicom.header import UNDEFINED, HeaderError, walk_file, walk_items

PATIENT_ID = 0x00100020
OTHER_IDS = 0x00101002
MODALITY = 0x00080060
PIXEL_DATA = 0x7FE00010


def part10(
    transfer_syntax: str, *, encapsulated: bool = False, undefined_items: bool = False
) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.8.1"
    ds.Modality = "OT"
    ds.BitsAllocated = 8
    ds.PatientID = "P-1"
    item = Dataset()
    item.PatientID = "AB123456"
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    if encapsulated:
        ds.PixelData = encapsulate([b"\xff\xd8frame1\xff\xd9", b"\xff\xd8frame2\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = bytes(4096)
        ds["PixelData"].VR = "OB"
    if undefined_items:
        ds["OtherPatientIDsSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_wanted_elements_are_found_and_pixel_data_is_jumped_over(syntax: str) -> None:
    walked = walk_file(part10(syntax), {PATIENT_ID, MODALITY})
    assert walked.transfer_syntax == syntax
    assert walked.implicit == (syntax == ImplicitVRLittleEndian)
    assert walked.elements[PATIENT_ID].value == b"P-1 "
    assert walked.elements[MODALITY].value == b"OT"
    assert set(walked.elements) == {PATIENT_ID, MODALITY}


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_undefined_lengths_are_walked_to_their_delimiters(syntax: str) -> None:
    data = part10(
        JPEGBaseline8Bit if syntax == ExplicitVRLittleEndian else syntax,
        encapsulated=syntax == ExplicitVRLittleEndian,
        undefined_items=True,
    )
    walked = walk_file(data, {OTHER_IDS, PIXEL_DATA})
    sequence = walked.elements[OTHER_IDS]
    assert sequence.length == UNDEFINED
    assert sequence.value.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # its delimiter
    assert walked.elements[PIXEL_DATA].offset + len(walked.elements[PIXEL_DATA].value) == len(data)


ISSUER = 0x00100021


def other_ids(syntax: str, undefined: bool) -> bytes:
    """The Other Patient IDs value of a file with two items, the second holding a sequence of
    its own (jumped over) between its wanted elements."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.8.2"
    first, second, nested = Dataset(), Dataset(), Dataset()
    first.PatientID = "AB123456"
    first.IssuerOfPatientID = "CIN"
    second.PatientID = "77"
    second.IssuerOfPatientID = "CHU"
    nested.CodeValue = "X"
    second.IssuerOfPatientIDQualifiersSequence = Sequence([nested])  # (0010,0024)
    ds.OtherPatientIDsSequence = Sequence([first, second])
    if undefined:
        ds["OtherPatientIDsSequence"].is_undefined_length = True
        second["IssuerOfPatientIDQualifiersSequence"].is_undefined_length = True
        for item in (first, second, nested):
            item.is_undefined_length_sequence_item = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return walk_file(buffer.getvalue(), {OTHER_IDS}).elements[OTHER_IDS].value


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_items_of_a_sequence_give_their_wanted_elements(syntax: str, undefined: bool) -> None:
    items = walk_items(
        other_ids(syntax, undefined), syntax == ImplicitVRLittleEndian, {PATIENT_ID, ISSUER}
    )
    assert [(i[PATIENT_ID].value, i[ISSUER].value) for i in items] == [
        (b"AB123456", b"CIN "),
        (b"77", b"CHU "),
    ]


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_a_sequence_cut_inside_an_item_is_left_to_pydicom(undefined: bool) -> None:
    value = other_ids(ExplicitVRLittleEndian, undefined)
    cut = value[:-10] if not undefined else value[:-16]  # inside the last item
    with pytest.raises(HeaderError):
        walk_items(cut, False, {PATIENT_ID})


def test_a_sequence_holding_something_else_than_items_is_left_to_pydicom() -> None:
    with pytest.raises(HeaderError):
        walk_items(b"\x10\x00\x20\x00\x02\x00\x00\x00P1", True, {PATIENT_ID})


def test_a_file_cut_inside_its_last_value_is_left_to_pydicom() -> None:
    with pytest.raises(HeaderError):
        walk_file(part10(ExplicitVRLittleEndian)[:-10], {PATIENT_ID})


def test_a_file_cut_inside_encapsulated_pixel_data_is_left_to_pydicom() -> None:
    with pytest.raises(HeaderError):
        walk_file(part10(JPEGBaseline8Bit, encapsulated=True)[:-8], {PATIENT_ID})


def test_bytes_after_the_last_element_are_left_to_pydicom() -> None:
    with pytest.raises(HeaderError):
        walk_file(part10(ExplicitVRLittleEndian) + b"\x00\x00\x00", {PATIENT_ID})


def test_big_endian_is_left_to_pydicom() -> None:
    with pytest.raises(HeaderError):
        walk_file(part10(ExplicitVRBigEndian), {PATIENT_ID})


def test_tags_out_of_order_are_left_to_pydicom() -> None:
    data = bytearray(part10(ExplicitVRLittleEndian))
    at = data.index(b"\x08\x00\x60\x00CS")  # Modality (0008,0060) becomes (0010,0060)
    data[at : at + 2] = b"\x10\x00"
    with pytest.raises(HeaderError):
        walk_file(bytes(data), {PATIENT_ID})


def test_a_file_without_its_part10_prefix_is_left_to_pydicom() -> None:
    with pytest.raises(HeaderError):
        walk_file(part10(ExplicitVRLittleEndian)[128:], {PATIENT_ID})


def test_a_file_meta_without_a_dataset_is_left_to_pydicom() -> None:
    """pydicom's path refuses it as unparseable; walked, it gave an empty dataset instead."""
    data = part10(ExplicitVRLittleEndian)
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) File Meta Group Length
    with pytest.raises(HeaderError):
        walk_file(data[: 144 + meta_length], {PATIENT_ID})


SAMPLES = [
    part10(ExplicitVRLittleEndian),
    part10(ImplicitVRLittleEndian, undefined_items=True),
    part10(JPEGBaseline8Bit, encapsulated=True, undefined_items=True),
]


@settings(max_examples=300, deadline=None)
@given(
    sample=st.sampled_from(SAMPLES),
    at=st.integers(min_value=0),
    garbage=st.binary(min_size=1, max_size=16),
    cut=st.booleans(),
)
def test_damaged_files_are_walked_or_left_to_pydicom_and_nothing_else(
    sample: bytes, at: int, garbage: bytes, cut: bool
) -> None:
    at %= len(sample)
    damaged = sample[:at] + garbage + (b"" if cut else sample[at + len(garbage) :])
    try:
        walked = walk_file(damaged, {PATIENT_ID, OTHER_IDS, PIXEL_DATA})
    except HeaderError:
        return
    for element in walked.elements.values():
        assert element.offset + len(element.value) <= len(damaged)
