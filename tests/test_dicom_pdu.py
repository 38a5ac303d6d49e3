"""The DICOM upper layer's PDUs and DIMSE command sets, sans-IO: bytes in, PDUs out, and back."""

from __future__ import annotations

import contextlib
from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.filereader import read_dataset

from dicom import dimse, pdu
from dicom.pdu import (
    Abort,
    AbortReason,
    AbortSource,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextAnswer,
    ContextResult,
    PDataTF,
    PduError,
    PduReader,
    Pdv,
    ProposedContext,
    RejectResult,
    RejectSource,
    ReleaseReply,
    ReleaseRequest,
    RoleSelection,
    UserIdentity,
    UserInformation,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"

REQUEST = AssociateRequest(
    called_ae="QANTARA",
    calling_ae="CT01",
    contexts=(
        ProposedContext(1, "1.2.840.10008.1.1", (IMPLICIT,)),
        ProposedContext(3, CT, (EXPLICIT, IMPLICIT)),
    ),
    user_information=UserInformation(
        max_length=16384,
        implementation_class_uid="1.2.3.4",
        implementation_version="SCU_1",
        async_window=(2, 1),
        roles=(RoleSelection(CT, scu=True, scp=False),),
        user_identity=UserIdentity(2, True, b"user", b"secret"),
    ),
)


def read_all(reader: PduReader) -> None:
    while reader.next_pdu() is not None:
        pass


def reply_of(data: bytes, max_pdu: int = 1 << 20) -> Abort | AssociateReject:
    reader = PduReader(max_pdu)
    reader.feed(data)
    with pytest.raises(PduError) as caught:
        read_all(reader)
    return caught.value.reply


def test_associate_request_with_every_user_item_round_trips() -> None:
    assert pdu.decode(pdu.encode(REQUEST)) == REQUEST


def test_associate_accept_round_trips_with_a_result_per_context() -> None:
    accept = AssociateAccept(
        called_ae="QANTARA",
        calling_ae="CT01",
        contexts=(
            ContextAnswer(1, ContextResult.ACCEPTANCE, IMPLICIT),
            ContextAnswer(3, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, EXPLICIT),
        ),
        user_information=UserInformation(1 << 20, "1.2.3", "QANTARA_1"),
    )
    assert pdu.decode(pdu.encode(accept)) == accept


@pytest.mark.parametrize(
    "unit",
    [
        AssociateReject(RejectResult.TRANSIENT, RejectSource.PRESENTATION, pdu.REJECT_LOCAL_LIMIT),
        ReleaseRequest(),
        ReleaseReply(),
        Abort(AbortSource.SERVICE_PROVIDER, AbortReason.UNEXPECTED_PDU),
    ],
)
def test_short_pdu_round_trips(unit: pdu.Pdu) -> None:
    assert pdu.decode(pdu.encode(unit)) == unit


def test_p_data_with_a_command_and_a_dataset_pdv_round_trips() -> None:
    unit = PDataTF((Pdv(1, True, True, b"\x01\x02"), Pdv(1, False, False, b"data" * 10)))
    decoded = pdu.decode(pdu.encode(unit))
    assert isinstance(decoded, PDataTF)
    assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in decoded.pdvs] == [
        (1, True, True, b"\x01\x02"),
        (1, False, False, b"data" * 10),
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_pdus_cut_anywhere_are_read_whole_and_in_order(cuts: list[int]) -> None:
    stream = b"".join(
        [
            pdu.encode(REQUEST),
            pdu.encode(PDataTF((Pdv(3, False, True, bytes(range(256)) * 4),))),
            pdu.encode(ReleaseRequest()),
        ]
    )
    reader = PduReader(1 << 16)
    found: list[pdu.Pdu] = []
    points = sorted({c % (len(stream) + 1) for c in cuts})
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        reader.feed(stream[start:end])
        while (unit := reader.next_pdu()) is not None:
            found.append(unit)
    assert [type(u) for u in found] == [AssociateRequest, PDataTF, ReleaseRequest]
    assert found[0] == REQUEST
    assert reader.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_pdu_error_and_never_hold_more_than_one_pdu(data: bytes) -> None:
    reader = PduReader(256, max_other=512)
    replies: list[Abort | AssociateReject] = []
    for i in range(len(data)):  # a byte at a time: the worst case for the buffer
        reader.feed(data[i : i + 1])
        try:
            read_all(reader)
        except PduError as error:
            replies.append(error.reply)
            break
        assert reader.buffered <= 512 + pdu.HEADER
    assert all(isinstance(reply, Abort | AssociateReject) for reply in replies)


def test_unknown_pdu_type_is_aborted_as_unrecognized() -> None:
    assert reply_of(b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00") == Abort(
        AbortSource.SERVICE_PROVIDER, AbortReason.UNRECOGNIZED_PDU
    )


def test_p_data_over_the_advertised_maximum_is_refused_from_its_header() -> None:
    header = b"\x04\x00" + (5000).to_bytes(4, "big")
    assert reply_of(header, max_pdu=4096) == Abort(
        AbortSource.SERVICE_PROVIDER, AbortReason.INVALID_PARAMETER
    )


def test_pdv_overrunning_its_pdu_is_aborted_as_invalid() -> None:
    body = (100).to_bytes(4, "big") + b"\x01\x03" + b"x" * 10
    assert reply_of(b"\x04\x00" + len(body).to_bytes(4, "big") + body) == Abort(
        AbortSource.SERVICE_PROVIDER, AbortReason.INVALID_PARAMETER
    )


def test_wrong_protocol_version_is_rejected_as_not_supported_by_the_acse() -> None:
    encoded = bytearray(pdu.encode(REQUEST))
    encoded[6:8] = b"\x00\x02"
    assert reply_of(bytes(encoded)) == AssociateReject(
        RejectResult.PERMANENT, RejectSource.ACSE, pdu.REJECT_PROTOCOL_VERSION
    )


def test_associate_request_with_an_overrunning_item_is_rejected_permanently() -> None:
    encoded = bytearray(pdu.encode(REQUEST))
    encoded[6 + 68 + 2 : 6 + 68 + 4] = b"\xff\xff"  # the application context item's length
    assert reply_of(bytes(encoded)) == AssociateReject(
        RejectResult.PERMANENT, RejectSource.ACSE, pdu.REJECT_NO_REASON
    )


def test_message_pdus_stay_within_the_peers_maximum_length() -> None:
    dataset = bytes(range(256)) * 100
    pdus = pdu.message_pdus(5, b"c" * 300, dataset, max_length=1000)
    reader = PduReader(1000)
    command, data = bytearray(), bytearray()
    lasts = []
    for encoded in pdus:
        assert len(encoded) - 6 <= 1000
        reader.feed(encoded)
        unit = reader.next_pdu()
        assert isinstance(unit, PDataTF)
        for p in unit.pdvs:
            (command if p.is_command else data).extend(p.data)
            lasts.append((p.is_command, p.is_last))
    assert bytes(command) == b"c" * 300
    assert bytes(data) == dataset
    assert [last for is_command, last in lasts if is_command] == [True]
    assert [last for is_command, last in lasts if not is_command][-1] is True
    assert sum(last for _, last in lasts) == 2


# --- DIMSE command sets -------------------------------------------------------------------------


def test_command_set_round_trips_and_pydicom_reads_it_as_implicit_little_endian() -> None:
    command = dimse.Command(
        dimse.C_STORE_RQ,
        message_id=7,
        affected_sop_class=CT,
        affected_sop_instance="1.2.3.4.5",
        priority=0,
        dataset_type=0x0000,
    )
    encoded = dimse.encode_command(command)
    assert dimse.decode_command(encoded) == command
    oracle = read_dataset(BytesIO(encoded), True, True)
    assert oracle.CommandGroupLength == len(encoded) - 12
    assert oracle.CommandField == dimse.C_STORE_RQ
    assert oracle.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert oracle.MessageID == 7


def test_store_response_carries_status_comment_and_the_requests_uids() -> None:
    request = dimse.Command(dimse.C_STORE_RQ, 9, None, CT, "1.2.3", dataset_type=0)
    response = dimse.store_response(request, 0xB006, "first copy kept")
    oracle = read_dataset(BytesIO(dimse.encode_command(response)), True, True)
    assert oracle.CommandField == dimse.C_STORE_RSP
    assert oracle.MessageIDBeingRespondedTo == 9
    assert oracle.Status == 0xB006
    assert oracle.ErrorComment == "first copy kept"
    assert oracle.AffectedSOPInstanceUID == "1.2.3"
    assert oracle.CommandDataSetType == dimse.NO_DATASET


def test_store_response_to_a_command_without_instance_uid_names_the_placeholder() -> None:
    request = dimse.Command(dimse.C_STORE_RQ, 1, None, CT, None, dataset_type=0)
    decoded = dimse.decode_command(dimse.encode_command(dimse.store_response(request, 0xC001)))
    assert decoded.affected_sop_instance == "0"


def test_pending_find_response_announces_its_identifier() -> None:
    request = dimse.Command(dimse.C_FIND_RQ, 3, None, "1.2.840.10008.5.1.4.1.2.2.1", priority=0)
    pending = dimse.decode_command(
        dimse.encode_command(dimse.find_response(request, 0xFF00, identifier=True))
    )
    final = dimse.decode_command(dimse.encode_command(dimse.find_response(request, 0x0000)))
    assert pending.has_dataset
    assert not final.has_dataset
    assert (pending.status, pending.responded_to) == (0xFF00, 3)


def test_command_set_outside_group_0000_is_refused() -> None:
    with pytest.raises(dimse.DimseError):
        dimse.decode_command(b"\x08\x00\x05\x00\x02\x00\x00\x00AB")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_command_bytes_raise_only_dimse_error(data: bytes) -> None:
    with contextlib.suppress(dimse.DimseError):
        dimse.decode_command(data)
