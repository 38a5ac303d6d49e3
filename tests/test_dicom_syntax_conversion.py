"""Implicit ↔ explicit VR little endian, the one conversion of an instance on its way out."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom.identifier import decode_identifier, encode_identifier
from dicom.syntax_conversion import MAX_CONVERTED, ConversionError, alternatives, convert

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATE = "1.2.840.10008.1.2.1.99"
JPEG2000 = "1.2.840.10008.1.2.4.91"


def test_a_little_endian_instance_may_go_in_its_own_syntax_then_the_other() -> None:
    assert alternatives(EXPLICIT, 1000) == (EXPLICIT, IMPLICIT)
    assert alternatives(IMPLICIT, 1000) == (IMPLICIT, EXPLICIT)


@pytest.mark.parametrize("syntax", [JPEG2000, DEFLATE, BIG_ENDIAN])
def test_compressed_deflated_and_big_endian_instances_go_only_as_stored(syntax: str) -> None:
    assert alternatives(syntax, 1000) == (syntax,)


def test_an_instance_too_large_to_convert_goes_only_as_stored() -> None:
    assert alternatives(EXPLICIT, MAX_CONVERTED + 1) == (EXPLICIT,)


@pytest.mark.parametrize(
    ("name", "stored", "wanted"),
    [
        ("CT_small.dcm", EXPLICIT, IMPLICIT),
        ("MR_small_implicit.dcm", IMPLICIT, EXPLICIT),
        ("rtplan.dcm", IMPLICIT, EXPLICIT),  # sequences, no pixel data
    ],
)
def test_a_converted_dataset_has_every_element_of_the_stored_one(
    name: str, stored: str, wanted: str
) -> None:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    original = dcmread(path)
    del original.file_meta
    data = encode_identifier(original, stored)

    converted = decode_identifier(convert(data, stored, wanted), wanted)

    assert [e.tag for e in converted] == [e.tag for e in original]
    for element in original:
        assert converted[element.tag].value == element.value


def test_arabic_names_survive_the_conversion() -> None:
    [path] = __import__("pydicom.data", fromlist=["get_charset_files"]).get_charset_files(
        "chrArab.dcm"
    )
    original = dcmread(path)
    del original.file_meta
    converted = decode_identifier(
        convert(encode_identifier(original, EXPLICIT), EXPLICIT, IMPLICIT), IMPLICIT
    )
    assert str(converted.PatientName) == str(original.PatientName)


def test_a_dataset_that_does_not_decode_is_a_conversion_error() -> None:
    with pytest.raises(ConversionError):
        convert(b"\x08\x00\x05\x00ZZ\x04\x00abcd", EXPLICIT, IMPLICIT)  # no such VR


def test_no_conversion_outside_the_little_endian_pair() -> None:
    with pytest.raises(ConversionError, match="little-endian"):
        convert(b"", JPEG2000, EXPLICIT)
