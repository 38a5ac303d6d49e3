"""The ER7 tokenizer: delimiters, charsets, escapes, addressing; hl7apy as the oracle."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message as hl7apy_parse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7.er7 import (
    SUPPORTED_VERSIONS,
    Encoding,
    Er7Error,
    Hl7Message,
    parse_message,
)
from ingest.errors import InputError

MSH = "MSH|^~\\&|LAB^1.2.3^ISO|HOSP|QANTARA|NAT|20240101120000||ORU^R01^ORU_R01|MSG-1|P|2.5.1"


def er7(*segments: str, charset: str = "utf-8") -> bytes:
    return ("\r".join(segments) + "\r").encode(charset)


def oru(*body: str, msh: str = MSH) -> Hl7Message:
    return parse_message(er7(msh, *body))


def test_header_exposes_the_fields_acknowledgements_need() -> None:
    msh = (
        "MSH|^~\\&|LAB^1.2.3^ISO|HOSP|QANTARA|NAT|20240101120000||ORU^R01^ORU_R01|MSG-1|P^T|2.5.1"
        "|||AL|NE||UNICODE UTF-8"
    )
    header = oru(msh=msh).header
    assert header.sending_application == "LAB^1.2.3^ISO"
    assert header.sending_facility == "HOSP"
    assert header.receiving_application == "QANTARA"
    assert header.receiving_facility == "NAT"
    assert header.timestamp == "20240101120000"
    assert header.message_type == "ORU"
    assert header.trigger_event == "R01"
    assert header.message_structure == "ORU_R01"
    assert header.control_id == "MSG-1"
    assert header.processing_id == "P"
    assert header.version == "2.5.1"
    assert header.accept_ack_type == "AL"
    assert header.application_ack_type == "NE"
    assert header.charset == "UNICODE UTF-8"
    assert header.enhanced_mode


def test_header_without_msh_15_and_16_is_original_mode() -> None:
    header = oru().header
    assert (header.accept_ack_type, header.application_ack_type) == ("", "")
    assert not header.enhanced_mode


def test_msh_1_is_the_field_separator_and_msh_2_the_encoding_characters() -> None:
    msh = oru().header.segment
    assert msh.field(1).value == "|"
    assert msh.field(2).value == "^~\\&"
    assert msh.value(2) == "^~\\&"
    assert oru().header.encoding_characters == "^~\\&"


def test_msh_3_is_the_first_field_after_the_encoding_characters() -> None:
    msh = oru().header.segment
    assert msh.field(3).value == "LAB"
    assert msh.field(3).component(2) == "1.2.3"
    assert msh.value(9, 2) == "R01"


def test_field_value_is_first_repetition_first_component_first_subcomponent() -> None:
    pid = oru("PID|1||123&x^^^HOSP^MR~AB12^^^CIN^NI").segments("PID")[0]
    assert pid.field(3).value == "123"


def test_repetitions_components_and_subcomponents_are_addressable() -> None:
    msg = oru("PID|1||123^^^HOSP&1.2.3&ISO^MR~AB12^^^CIN^NI")
    field = msg.segments("PID")[0].field(3)
    assert [r.value for r in field.repetitions] == ["123", "AB12"]
    assert field.repetition(2).component(4) == "CIN"
    assert field.repetition(1).subcomponents(4) == ("HOSP", "1.2.3", "ISO")
    assert field.get(repetition=1, component=4, subcomponent=2) == "1.2.3"
    assert msg.get("PID", 3, 2, 5) == "NI"
    assert msg.get("PID", 3, 1, 4, 3) == "ISO"


def test_components_list_every_component_with_its_subcomponents() -> None:
    field = oru("PID|1||123^^^HOSP&1.2.3^MR").segments("PID")[0].field(3)
    assert field.repetitions[0].components == (("123",), ("",), ("",), ("HOSP", "1.2.3"), ("MR",))


def test_absent_parts_read_as_empty() -> None:
    msg = oru("PID|1||123")
    pid = msg.segments("PID")[0]
    assert pid.field(30).value == ""
    assert pid.field(30).repetitions == ()
    assert pid.value(3, 9) == ""
    assert msg.get("PID", 3, 4) == ""
    assert msg.get("ZZZ", 1) == ""
    assert msg.segment("OBX") is None


def test_trailing_empty_fields_and_components_are_tolerated() -> None:
    msg = oru("OBX|1|NM|718-7^Hemoglobin^LN^^^||13.5|g/dL^^|||||F||||||")
    obx = msg.segments("OBX")[0]
    assert obx.value(3, 3) == "LN"
    assert obx.value(11) == "F"
    assert len(obx) == 17


def test_segments_are_returned_in_order_and_by_occurrence() -> None:
    msg = oru("OBX|1|NM|A||1", "NTE|1||note", "OBX|2|NM|B||2")
    assert [s.value(1) for s in msg.segments("OBX")] == ["1", "2"]
    assert [s.id for s in msg.all_segments] == ["MSH", "OBX", "NTE", "OBX"]
    assert msg.get("OBX", 5, occurrence=2) == "2"


def test_explicit_null_is_distinguished_from_empty() -> None:
    pid = oru('PID|1||123||""').segments("PID")[0]
    assert pid.field(5).is_null
    assert not pid.field(5).is_empty
    assert pid.field(6).is_empty


def test_escaped_delimiters_are_decoded_at_the_leaves() -> None:
    msg = oru("OBX|1|ST|X||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f^second")
    obx = msg.segments("OBX")[0]
    assert obx.value(5) == "a|b^c&d~e\\f"
    assert obx.value(5, 2) == "second"
    assert obx.field(5).raw == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f^second"


def test_hex_escape_is_decoded_with_the_message_charset() -> None:
    assert oru("OBX|1|ST|X||caf\\XC3A9\\").get("OBX", 5) == "café"
    latin1 = MSH + "||||||8859/1"
    assert oru("OBX|1|ST|X||caf\\XE9\\", msh=latin1).get("OBX", 5) == "café"


def test_adjacent_hex_escapes_join_into_one_character() -> None:
    assert oru("OBX|1|ST|X||\\XC3\\\\XA9\\!").get("OBX", 5) == "é!"


def test_hex_escape_that_does_not_decode_is_undecodable_text() -> None:
    msg = oru("OBX|1|ST|X||\\XC3\\")
    with pytest.raises(InputError) as caught:
        msg.get("OBX", 5)
    assert caught.value.reason == "undecodable-text"


def test_hex_escape_with_non_hex_digits_is_a_bad_escape_sequence() -> None:
    with pytest.raises(InputError, match="bad-escape-sequence"):
        oru("OBX|1|ST|X||\\XZZ\\").get("OBX", 5)


def test_line_break_escape_becomes_a_newline() -> None:
    assert oru("OBX|1|TX|X||line one\\.br\\line two").get("OBX", 5) == "line one\nline two"


def test_other_escape_sequences_are_kept_as_written() -> None:
    assert oru("OBX|1|FT|X||\\H\\bold\\N\\ \\.sp2\\").get("OBX", 5) == "\\H\\bold\\N\\ \\.sp2\\"


def test_unterminated_escape_is_plain_text() -> None:
    assert oru("OBX|1|ST|X||a\\F\\b\\c").get("OBX", 5) == "a|b\\c"


def test_segments_separated_by_newlines_parse_like_carriage_returns() -> None:
    for sep in ("\n", "\r\n"):
        msg = parse_message(sep.join([MSH, "PID|1||123", "OBX|1|NM|A||1", ""]).encode())
        assert [s.id for s in msg.all_segments] == ["MSH", "PID", "OBX"]


def test_blank_lines_and_leading_whitespace_are_tolerated() -> None:
    msg = parse_message(b"\r\n" + er7(MSH, "", "PID|1||123", "   "))
    assert [s.id for s in msg.all_segments] == ["MSH", "PID"]


def test_latin1_message_with_msh_18_decodes_exactly() -> None:
    raw = er7(MSH + "||||||8859/1", "PID|1||123||Béranger^Élodie", charset="latin-1")
    msg = parse_message(raw)
    assert msg.get("PID", 5, 1, 2) == "Élodie"
    assert msg.get("PID", 5) == "Béranger"
    assert msg.encoding.codec == "iso8859-1"


def test_arabic_8859_6_message_with_msh_18_decodes_exactly() -> None:
    raw = er7(MSH + "||||||8859/6", "PID|1||123||بن علي^محمد", charset="iso8859-6")
    msg = parse_message(raw)
    assert msg.get("PID", 5) == "بن علي"
    assert msg.get("PID", 5, 1, 2) == "محمد"
    assert msg.header.charset == "8859/6"


def test_empty_msh_18_uses_the_default_charset() -> None:
    raw = er7(MSH, "PID|1||123||Béranger", charset="latin-1")
    assert parse_message(raw, default_charset="8859/1").get("PID", 5) == "Béranger"
    assert parse_message(er7(MSH, "PID|1||123||Béranger")).get("PID", 5) == "Béranger"


def test_msh_18_first_repetition_names_the_charset() -> None:
    raw = er7(MSH + "||||||8859/1~ISO IR87", "PID|1||1||Béranger", charset="latin-1")
    assert parse_message(raw).get("PID", 5) == "Béranger"


def test_unknown_charset_is_unsupported() -> None:
    with pytest.raises(Er7Error) as caught:
        parse_message(er7(MSH + "||||||EBCDIC"))
    assert caught.value.reason == "unsupported-charset"


def test_bytes_invalid_in_the_declared_charset_are_undecodable_and_keep_the_header() -> None:
    raw = er7(MSH + "||||||UNICODE UTF-8", "PID|1||123||B\xe9ranger", charset="latin-1")
    with pytest.raises(Er7Error) as caught:
        parse_message(raw)
    assert caught.value.reason == "undecodable-text"
    assert caught.value.header is not None
    assert caught.value.header.control_id == "MSG-1"
    assert "ranger" not in caught.value.detail  # no patient data in the detail


def test_ascii_message_with_a_non_ascii_byte_is_undecodable() -> None:
    raw = er7(MSH + "||||||ASCII", "PID|1||123||Béranger")
    with pytest.raises(Er7Error, match="undecodable-text"):
        parse_message(raw)


def test_bytes_without_msh_are_not_hl7() -> None:
    for raw in (b"", b"hello", b"PID|1||123\r", b"\x00\x01MSH|"):
        with pytest.raises(Er7Error) as caught:
            parse_message(raw)
        assert caught.value.reason == "not-hl7"


def test_batches_are_unsupported() -> None:
    with pytest.raises(Er7Error, match="unsupported-batch"):
        parse_message(b"FHS|^~\\&\rBHS|^~\\&\r" + er7(MSH))


def test_missing_control_id_is_reported_with_the_header() -> None:
    msh = "MSH|^~\\&|LAB|HOSP|QANTARA|NAT|20240101120000||ORU^R01||P|2.5.1"
    with pytest.raises(Er7Error) as caught:
        parse_message(er7(msh))
    assert caught.value.reason == "missing-msh-10"
    assert caught.value.header is not None
    assert caught.value.header.sending_application == "LAB"


def test_missing_message_type_is_reported() -> None:
    with pytest.raises(Er7Error, match="missing-msh-9"):
        parse_message(er7("MSH|^~\\&|LAB|HOSP|QANTARA|NAT|20240101120000|||1|P|2.5.1"))


def test_bad_encoding_characters_are_refused() -> None:
    for msh in ("MSH|^~|LAB", "MSH|^^\\&|LAB", "MSH|^~A&|LAB", "MSH", "MSHA^~\\&"):
        with pytest.raises(Er7Error) as caught:
            parse_message(er7(msh))
        assert caught.value.reason == "bad-encoding-characters"


def test_segment_without_a_valid_id_is_refused() -> None:
    with pytest.raises(Er7Error) as caught:
        parse_message(er7(MSH, "PID|1", "garbage here"))
    assert caught.value.reason == "bad-segment-id"
    assert caught.value.detail == "segment 3 has no valid 3-character id"


def test_truncation_character_of_v27_is_tolerated() -> None:
    msh = "MSH|^~\\&#|LAB|HOSP|QANTARA|NAT|20240101120000||ORU^R01^ORU_R01|1|P|2.7"
    msg = parse_message(er7(msh, "OBX|1|ST|X||long\\P\\text#cut"))
    assert msg.encoding.truncation == "#"
    assert msg.header.encoding_characters == "^~\\&#"
    assert msg.get("OBX", 5) == "long#text#cut"


def test_other_delimiters_declared_in_msh_are_honoured() -> None:
    msh = "MSH#$*/%#LAB$1.2#HOSP#Q#N#20240101##ORU$R01#7#P#2.4"
    msg = parse_message(er7(msh, "PID#1##a$b*c$d%e#/F/x"))
    assert msg.header.trigger_event == "R01"
    assert msg.header.sending_application == "LAB$1.2"
    assert msg.get("PID", 3, 2) == "c"
    assert msg.get("PID", 3, 2, 2) == "d"
    assert msg.get("PID", 3, 2, 2, 2) == "e"
    assert msg.get("PID", 4) == "#x"


def test_supported_versions_are_2_3_to_2_6() -> None:
    assert SUPPORTED_VERSIONS == ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6")


def test_positions_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        oru().header.segment.value(0)
    with pytest.raises(ValueError, match="start at 1"):
        oru().header.segment.field(1).get(repetition=0)


@given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_escaped_text_unescapes_to_itself(text: str) -> None:
    enc = Encoding(truncation="#")
    escaped = enc.escape_text(text)
    assert not set(escaped) & set("|^~&#\r\n")
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert enc.unescape(escaped) == expected


@given(tail=st.binary(max_size=400))
def test_random_bytes_raise_only_input_errors(tail: bytes) -> None:
    for raw in (tail, b"MSH|^~\\&|" + tail, er7(MSH) + tail):
        try:
            msg = parse_message(raw)
            for seg in msg.all_segments:
                for n in range(1, len(seg) + 1):
                    for rep in seg.field(n).repetitions:
                        rep.components  # noqa: B018 - decode every leaf
        except InputError:
            pass


# Differential test: hl7apy is the oracle for the structure (which field, repetition and
# component every piece of text belongs to); the generated values are the oracle for decoding.

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_ESCAPE_RE = re.compile(r"[\\|^&~]")
_LATIN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -.,'"
_FRENCH = "éèêëàâçôöîïùûÉÈÇÀ"
_ARABIC = "ابتثجحخدذرزسشصضطظعغفقكلمنهوىيءآأؤإئة"
_DELIMITERS = "|^&~\\"
_CHARSETS = {"UNICODE UTF-8": "utf-8", "8859/1": "iso8859-1", "8859/6": "iso8859-6"}


def escape(value: str) -> str:
    """An escaper written independently of hl7.er7."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], value)


@dataclass(frozen=True)
class GeneratedOru:
    version: str
    charset: str
    values: dict[tuple[str, int, int, int, int], str]  # (segment, field, rep, comp, sub) -> text
    text: str


@st.composite
def generated_oru(draw: st.DrawFn) -> GeneratedOru:
    version = draw(st.sampled_from(["2.3", "2.4", "2.5.1", "2.6"]))
    charset = draw(st.sampled_from(sorted(_CHARSETS)))
    alphabet = _LATIN + _DELIMITERS
    names = []
    if charset != "8859/6":
        alphabet += _FRENCH
        names.append("Élodie Béranger")
    if charset != "8859/1":
        alphabet += _ARABIC
        names.append("محمد بن علي")
    text = st.text(alphabet=alphabet, min_size=1, max_size=12).filter(lambda s: s.strip() == s)
    value = st.one_of(st.sampled_from(names), text) if names else text
    v = {
        ("PID", 3, 1, 1, 1): draw(value),
        ("PID", 3, 2, 1, 1): draw(value),
        ("PID", 5, 1, 1, 1): draw(value),
        ("PID", 5, 1, 2, 1): draw(value),
        ("OBR", 4, 1, 2, 1): draw(value),
    }
    obx_count = draw(st.integers(min_value=1, max_value=3))
    for i in range(1, obx_count + 1):
        v["OBX", 3, 1, 2, i] = draw(value)  # keyed by OBX occurrence in the last slot
        v["OBX", 5, 1, 1, i] = draw(value)
    e = {key: escape(val) for key, val in v.items()}
    msg_type = "ORU^R01" if version == "2.3" else "ORU^R01^ORU_R01"
    segments = [
        f"MSH|^~\\&|LAB|HOSP|QANTARA|NAT|20240101120000||{msg_type}|MSG1|P|{version}"
        f"||||||{charset}",
        f"PID|1||{e['PID', 3, 1, 1, 1]}^^^HOSP&1.2.3&ISO^MR~{e['PID', 3, 2, 1, 1]}^^^CIN^NI||"
        f"{e['PID', 5, 1, 1, 1]}^{e['PID', 5, 1, 2, 1]}||19800101|F",
        f"OBR|1||ORD1|24331-1^{e['OBR', 4, 1, 2, 1]}^LN",
    ]
    for i in range(1, obx_count + 1):
        segments.append(
            f"OBX|{i}|ST|718-7^{e['OBX', 3, 1, 2, i]}^LN||{e['OBX', 5, 1, 1, i]}|g/dL|||||F"
        )
    return GeneratedOru(version, charset, v, "\r".join(segments) + "\r")


def _position(name: str) -> int:
    """hl7apy names children ``PID_5`` / ``CX_4``; a bare datatype name is position 1."""
    head, _, tail = name.rpartition("_")
    return int(tail) if head and tail.isdigit() else 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated=generated_oru())
def test_every_value_matches_hl7apy_and_the_generated_text(generated: GeneratedOru) -> None:
    raw = generated.text.encode(_CHARSETS[generated.charset])
    ours = parse_message(raw)
    oracle = hl7apy_parse(
        generated.text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
    )
    assert ours.header.version == generated.version
    assert [s.id for s in ours.all_segments] == [s.name for s in oracle.children]
    for our_seg, their_seg in zip(ours.all_segments, oracle.children, strict=True):
        repetitions: dict[int, int] = {}
        compared = 0
        for their_field in their_seg.children:
            n = _position(their_field.name)
            rep = repetitions[n] = repetitions.get(n, 0) + 1
            our_rep = our_seg.field(n).repetition(rep)
            assert our_rep.raw == their_field.to_er7()
            if n <= 2 and our_seg.id == "MSH":
                assert our_seg.field(n).value == their_field.to_er7()
                continue
            for their_comp in their_field.children:
                c = _position(their_comp.name)
                our_comp = our_rep.raw.split("^")[c - 1]
                assert our_comp == their_comp.to_er7()
                for their_sub in their_comp.children:
                    sub = _position(their_sub.name)
                    assert our_comp.split("&")[sub - 1] == their_sub.to_er7()
                compared += 1
        non_empty = sum(
            1
            for n in range(3 if our_seg.id == "MSH" else 1, len(our_seg) + 1)
            for r in our_seg.field(n).repetitions
            for c in r.raw.split("^")
            if c
        )
        assert compared == non_empty
    occurrences: dict[str, int] = {}
    for (seg_id, field, rep, comp, sub), expected in generated.values.items():
        if seg_id == "OBX":  # the last slot numbers the OBX, not a subcomponent
            occurrence, sub = sub, 1
        else:
            occurrence = occurrences.setdefault(seg_id, 1)
        assert ours.get(seg_id, field, rep, comp, sub, occurrence=occurrence) == expected
