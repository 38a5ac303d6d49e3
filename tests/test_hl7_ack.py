"""Acknowledgements: which codes to send, and the ACK bytes, built without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message as hl7apy_parse

from hl7.ack import (
    AckCode,
    AckError,
    ErrorCode,
    ErrorLocation,
    Outcome,
    ack_error_for,
    acks_to_send,
    build_ack,
    build_fallback_ack,
    check_acceptance,
    check_certified_facility,
)
from hl7.er7 import Er7Error, MessageHeader, parse_message
from ingest.errors import InputError

NOW = datetime(2024, 3, 1, 9, 30, 5, tzinfo=timezone(timedelta(hours=1)))
MSH = "MSH|^~\\&|LAB^1.2.3^ISO|HOSP|QANTARA|NAT|20240101120000||ORU^R01^ORU_R01|MSG-1|P|2.5.1"
MISSING_OBX5 = AckError(
    ErrorCode.REQUIRED_FIELD_MISSING, "OBX-5 is empty", ErrorLocation("OBX", 2, 5)
)


def header(msh: str = MSH, charset: str = "utf-8") -> MessageHeader:
    return parse_message(f"{msh}\rPID{msh[3]}1\r".encode(charset)).header


def segments(ack: bytes, charset: str = "utf-8") -> list[list[str]]:
    return [s.split("|") for s in ack.decode(charset).split("\r") if s]


def ack_for(msh: str = MSH, code: AckCode = AckCode.APPLICATION_ACCEPT, **kw: object) -> bytes:
    return build_ack(header(msh), code, now=NOW, control_id="ACK-9", **kw)  # type: ignore[arg-type]


def test_ack_swaps_sending_and_receiving_applications() -> None:
    msh = segments(ack_for())[0]
    assert msh[2:6] == ["QANTARA", "NAT", "LAB^1.2.3^ISO", "HOSP"]


def test_ack_echoes_the_original_control_id_in_msa_2() -> None:
    assert segments(ack_for())[1] == ["MSA", "AA", "MSG-1"]


def test_ack_carries_its_own_control_id_and_timestamp() -> None:
    msh = segments(ack_for())[0]
    assert msh[6] == "20240301093005+0100"
    assert msh[9] == "ACK-9"


def test_ack_message_type_names_the_trigger_event() -> None:
    assert segments(ack_for())[0][8] == "ACK^R01^ACK"


def test_ack_to_v23_has_no_message_structure_component() -> None:
    msh = MSH.replace("ORU^R01^ORU_R01", "ORU^R01").replace("2.5.1", "2.3")
    assert segments(ack_for(msh))[0][8] == "ACK^R01"


def test_ack_echoes_processing_id_and_version() -> None:
    msh = segments(ack_for(MSH.replace("|P|2.5.1", "|P^T|2.5.1^MAR")))[0]
    assert msh[10:12] == ["P^T", "2.5.1^MAR"]


def test_ack_ends_every_segment_with_a_carriage_return() -> None:
    ack = ack_for()
    assert ack.endswith(b"\r")
    assert b"\n" not in ack


def test_ack_keeps_the_sender_delimiters() -> None:
    msh = "MSH#$*/%#LAB$1.2#HOSP#Q#N#20240101##ORU$R01#7#P#2.5"
    ack = build_ack(
        header(msh), AckCode.APPLICATION_ERROR, error=MISSING_OBX5, now=NOW, control_id="9"
    )
    lines = ack.decode().split("\r")
    assert lines[0].startswith("MSH#$*/%#Q#N#LAB$1.2#HOSP#")
    assert "ACK$R01$ACK" in lines[0]
    assert lines[2] == "ERR##OBX$2$5#101$Required field missing$HL70357#E####OBX-5 is empty"


def test_ack_is_encoded_in_the_sender_charset_with_the_same_msh_18() -> None:
    msh = MSH.replace("LAB^1.2.3^ISO|HOSP", "مختبر|مستشفى") + "||||||8859/6"
    ack = build_ack(header(msh, "iso8859-6"), AckCode.APPLICATION_ACCEPT, now=NOW, control_id="1")
    fields = segments(ack, "iso8859-6")[0]
    assert fields[4:6] == ["مختبر", "مستشفى"]
    assert fields[17] == "8859/6"
    assert parse_message(ack).header.receiving_application == "مختبر"


def test_error_ack_has_an_err_segment_in_v25_layout() -> None:
    err = segments(ack_for(code=AckCode.APPLICATION_ERROR, error=MISSING_OBX5))[2]
    assert err == [
        "ERR",
        "",
        "OBX^2^5",
        "101^Required field missing^HL70357",
        "E",
        "",
        "",
        "",
        "OBX-5 is empty",
    ]


def test_error_ack_to_v24_also_fills_err_1_and_msa_3() -> None:
    msh = MSH.replace("2.5.1", "2.4")
    ack = segments(ack_for(msh, AckCode.APPLICATION_ERROR, error=MISSING_OBX5))
    assert ack[1] == ["MSA", "AE", "MSG-1", "OBX-5 is empty"]
    assert ack[2][1] == "OBX^2^5^101&Required field missing&HL70357"
    assert ack[2][3] == "101^Required field missing^HL70357"


def test_error_text_delimiters_are_escaped() -> None:
    error = AckError(ErrorCode.DATA_TYPE_ERROR, "value a|b^c~d&e\\f is not NM")
    ack = ack_for(code=AckCode.APPLICATION_ERROR, error=error)
    err = parse_message(ack).segments("ERR")[0]
    assert err.value(8) == "value a|b^c~d&e\\f is not NM"
    assert err.raw(8) == "value a\\F\\b\\S\\c\\R\\d\\T\\e\\E\\f is not NM"


def test_error_text_the_charset_cannot_carry_is_shown_as_question_marks() -> None:
    error = AckError(ErrorCode.DATA_TYPE_ERROR, "valeur érronée")
    ack = build_ack(
        header(MSH + "||||||ASCII"), AckCode.APPLICATION_ERROR, error=error, now=NOW, control_id="1"
    )
    assert parse_message(ack).segments("ERR")[0].value(8) == "valeur ?rron?e"


def test_ack_reads_back_with_our_tokenizer() -> None:
    ack = parse_message(ack_for(code=AckCode.APPLICATION_ERROR, error=MISSING_OBX5))
    assert ack.header.message_type == "ACK"
    assert ack.header.control_id == "ACK-9"
    assert ack.get("MSA", 1) == "AE"
    assert ack.get("MSA", 2) == "MSG-1"
    assert ack.get("ERR", 3) == "101"


@pytest.mark.parametrize("version", ["2.3", "2.4", "2.5", "2.5.1", "2.6"])
def test_ack_is_a_valid_message_for_hl7apy(version: str) -> None:
    msh = MSH.replace("2.5.1", version)
    if version == "2.3":
        msh = msh.replace("ORU^R01^ORU_R01", "ORU^R01")
    ack = ack_for(msh, AckCode.APPLICATION_ERROR, error=MISSING_OBX5)
    oracle = hl7apy_parse(
        ack.decode(), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
    )
    assert oracle.msa.msa_1.to_er7() == "AE"
    assert oracle.msa.msa_2.to_er7() == "MSG-1"
    assert [s.name for s in oracle.children] == ["MSH", "MSA", "ERR"]


def test_fallback_ack_is_an_ar_with_default_delimiters() -> None:
    error = AckError(ErrorCode.APPLICATION_INTERNAL_ERROR, "the message does not start with MSH")
    ack = build_fallback_ack(error, now=NOW, control_id="ACK-1")
    msg = parse_message(ack)
    assert msg.header.encoding_characters == "^~\\&"
    assert msg.header.message_type == "ACK"
    assert msg.header.version == "2.5"
    assert msg.header.processing_id == "P"
    assert msg.get("MSA", 1) == "AR"
    assert msg.get("MSA", 2) == ""
    assert msg.get("ERR", 3) == "207"
    assert msg.get("ERR", 8) == "the message does not start with MSH"


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build_ack(header(), AckCode.APPLICATION_ACCEPT, now=datetime(2024, 1, 1), control_id="1")  # noqa: DTZ001


def test_utc_timestamps_carry_a_zero_offset() -> None:
    ack = build_ack(
        header(), AckCode.APPLICATION_ACCEPT, now=datetime(2024, 1, 1, tzinfo=UTC), control_id="1"
    )
    assert segments(ack)[0][6] == "20240101000000+0000"


def test_original_mode_answers_once_with_aa_ae_or_ar() -> None:
    assert acks_to_send(Outcome.COMMITTED) == (AckCode.APPLICATION_ACCEPT,)
    assert acks_to_send(Outcome.CONTENT_ERROR) == (AckCode.APPLICATION_ERROR,)
    assert acks_to_send(Outcome.REJECTED) == (AckCode.APPLICATION_REJECT,)


def test_nothing_is_sent_while_storage_cannot_commit() -> None:
    assert acks_to_send(Outcome.NOT_COMMITTED) == ()
    assert acks_to_send(Outcome.NOT_COMMITTED, "AL", "AL") == ()


def test_enhanced_mode_always_sends_the_accept_ack_for_al() -> None:
    assert acks_to_send(Outcome.COMMITTED, "AL", "NE") == (AckCode.COMMIT_ACCEPT,)
    assert acks_to_send(Outcome.CONTENT_ERROR, "AL", "NE") == (AckCode.COMMIT_ERROR,)
    assert acks_to_send(Outcome.REJECTED, "AL", "NE") == (AckCode.COMMIT_REJECT,)


def test_enhanced_mode_sends_accept_then_application_ack_when_both_are_asked() -> None:
    expected = (AckCode.COMMIT_ACCEPT, AckCode.APPLICATION_ACCEPT)
    assert acks_to_send(Outcome.COMMITTED, "AL", "AL") == expected


def test_enhanced_mode_ne_sends_nothing() -> None:
    assert acks_to_send(Outcome.COMMITTED, "NE", "NE") == ()
    assert acks_to_send(Outcome.REJECTED, "NE", "NE") == ()


def test_enhanced_mode_er_sends_only_errors() -> None:
    assert acks_to_send(Outcome.COMMITTED, "ER", "ER") == ()
    expected = (AckCode.COMMIT_ERROR, AckCode.APPLICATION_ERROR)
    assert acks_to_send(Outcome.CONTENT_ERROR, "ER", "ER") == expected


def test_enhanced_mode_su_sends_only_successes() -> None:
    assert acks_to_send(Outcome.COMMITTED, "SU", "NE") == (AckCode.COMMIT_ACCEPT,)
    assert acks_to_send(Outcome.REJECTED, "SU", "NE") == ()


def test_enhanced_mode_with_one_condition_empty_treats_it_as_always() -> None:
    expected = (AckCode.COMMIT_ACCEPT, AckCode.APPLICATION_ACCEPT)
    assert acks_to_send(Outcome.COMMITTED, "", "AL") == expected


def test_supported_production_message_is_accepted() -> None:
    assert check_acceptance(header()) is None


def test_a_facility_named_by_the_certificate_is_accepted_by_its_first_component() -> None:
    with_oid = header(MSH.replace("|HOSP|", "|HOSP^2.16.504.1^ISO|"))
    assert check_certified_facility(with_oid, {"HOSP"}) is None


def test_another_facility_than_the_certificate_s_is_rejected_at_msh_4() -> None:
    error = check_certified_facility(header(), {"LABO-CENTRAL"})
    assert error is not None
    assert error.code is ErrorCode.APPLICATION_INTERNAL_ERROR
    assert error.location == ErrorLocation("MSH", 1, 4)


def test_an_empty_facility_is_never_certified() -> None:
    assert check_certified_facility(header(MSH.replace("|HOSP|", "||")), {""}) is not None


def test_unsupported_version_is_rejected_with_203_at_msh_12() -> None:
    error = check_acceptance(header(MSH.replace("2.5.1", "2.2")))
    assert error is not None
    assert error.code is ErrorCode.UNSUPPORTED_VERSION_ID
    assert error.location == ErrorLocation("MSH", 1, 12)


def test_training_message_is_rejected_with_202_unless_allowed() -> None:
    training = header(MSH.replace("|P|", "|T|"))
    error = check_acceptance(training)
    assert error is not None
    assert error.code is ErrorCode.UNSUPPORTED_PROCESSING_ID
    assert error.location == ErrorLocation("MSH", 1, 11)
    assert check_acceptance(training, processing_ids={"P", "T"}) is None


def test_missing_header_field_maps_to_101_at_its_position() -> None:
    error = ack_error_for(Er7Error("missing-msh-10", "MSH-10 message control id is empty"))
    assert error.code is ErrorCode.REQUIRED_FIELD_MISSING
    assert error.location == ErrorLocation("MSH", 1, 10)
    assert error.message == "MSH-10 message control id is empty"


def test_undecodable_text_maps_to_102() -> None:
    assert ack_error_for(InputError("undecodable-text", "x")).code is ErrorCode.DATA_TYPE_ERROR


def test_unknown_input_error_maps_to_207() -> None:
    error = ack_error_for(InputError("something-new", "x"))
    assert error.code is ErrorCode.APPLICATION_INTERNAL_ERROR


def test_error_codes_carry_the_table_0357_texts() -> None:
    assert ErrorCode.APPLICATION_INTERNAL_ERROR.text == "Application internal error"
    assert ErrorCode.DATA_TYPE_ERROR.text == "Data type error"
    assert ErrorCode.UNSUPPORTED_VERSION_ID.text == "Unsupported version id"
    assert ErrorCode.UNSUPPORTED_PROCESSING_ID.text == "Unsupported processing id"
