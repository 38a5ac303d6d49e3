"""The requestor side of an association, sans-IO (a C-MOVE's association to its destination):
request, accept or reject, C-STORE responses in, release."""

from __future__ import annotations

from dicom import dimse, pdu
from dicom.association import (
    Aborted,
    AssociationAccepted,
    AssociationRejected,
    CommandReceived,
    Event,
    ProtocolError,
    ReleaseReplied,
    Requestor,
    State,
)
from dicom.outbound import MAX_CONTEXTS, proposed_contexts
from dicom.pdu import (
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextAnswer,
    ContextResult,
    ProposedContext,
    RejectResult,
    RejectSource,
    UserInformation,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
JPEG2000 = "1.2.840.10008.1.2.4.91"
REQUEST = AssociateRequest(
    "WORKSTATION",
    "QANTARA",
    (ProposedContext(1, CT, (EXPLICIT,)), ProposedContext(3, CT, (JPEG2000,))),
    UserInformation(max_length=1 << 20),
)


def drain(requestor: Requestor) -> list[Event]:
    events = []
    while (event := requestor.next_event()) is not None:
        events.append(event)
    return events


def accepted(max_length: int = 16384) -> Requestor:
    requestor = Requestor(1 << 20)
    requestor.associate(REQUEST)
    answer = AssociateAccept(
        "WORKSTATION",
        "QANTARA",
        (
            ContextAnswer(1, ContextResult.ACCEPTANCE, EXPLICIT),
            ContextAnswer(3, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEG2000),
        ),
        UserInformation(max_length=max_length),
    )
    requestor.receive_data(pdu.encode(answer))
    [event] = drain(requestor)
    assert isinstance(event, AssociationAccepted)
    return requestor


def test_associate_writes_the_request_and_awaits_the_answer() -> None:
    requestor = Requestor(1 << 20)
    data = requestor.associate(REQUEST)
    assert pdu.decode(data) == REQUEST
    assert requestor.state is State.AWAITING_ANSWER


def test_an_accept_establishes_only_the_contexts_it_accepted() -> None:
    requestor = accepted()
    assert requestor.state is State.ESTABLISHED
    assert requestor.accepted_context(CT, EXPLICIT) == 1
    assert requestor.accepted_context(CT, JPEG2000) is None
    assert requestor.peer_max_length == 16384


def test_a_reject_ends_the_association() -> None:
    requestor = Requestor(1 << 20)
    requestor.associate(REQUEST)
    reject = AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 3)
    requestor.receive_data(pdu.encode(reject))
    [event] = drain(requestor)
    assert isinstance(event, AssociationRejected)
    assert requestor.state is State.CLOSED


def test_a_store_response_is_received_as_a_command() -> None:
    requestor = accepted()
    response = dimse.Command(dimse.C_STORE_RSP, responded_to=4, affected_sop_class=CT, status=0)
    requestor.receive_data(b"".join(pdu.message_pdus(1, dimse.encode_command(response), None, 0)))
    [event] = drain(requestor)
    assert isinstance(event, CommandReceived)
    assert event.command.responded_to == 4


def test_a_dataset_is_sent_within_the_destinations_maximum_length() -> None:
    requestor = accepted(max_length=4096)
    data = requestor.send_fragment(1, b"x" * 10_000, last=True)
    lengths = []
    while data:
        length = int.from_bytes(data[2:6], "big")
        lengths.append(length)
        data = data[6 + length :]
    assert lengths == [4096, 4096, 1826]


def test_release_then_its_reply_closes() -> None:
    requestor = accepted()
    assert isinstance(pdu.decode(requestor.release()), pdu.ReleaseRequest)
    requestor.receive_data(pdu.encode(pdu.ReleaseReply()))
    assert [type(e) for e in drain(requestor)] == [ReleaseReplied]
    assert requestor.state is State.CLOSED


def test_an_abort_from_the_destination_is_an_event() -> None:
    requestor = accepted()
    requestor.receive_data(pdu.encode(pdu.Abort(pdu.AbortSource.SERVICE_USER, 0)))
    assert [type(e) for e in drain(requestor)] == [Aborted]


def test_an_association_request_from_the_destination_is_a_protocol_error() -> None:
    requestor = accepted()
    requestor.receive_data(pdu.encode(REQUEST))
    [event] = drain(requestor)
    assert isinstance(event, ProtocolError)
    abort = pdu.decode(event.reply)
    assert isinstance(abort, pdu.Abort)
    assert abort.source == pdu.AbortSource.SERVICE_USER


def test_one_context_is_proposed_per_distinct_class_and_syntax() -> None:
    contexts = proposed_contexts([(CT, JPEG2000), (MR, EXPLICIT), (CT, JPEG2000)])
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in contexts] == [
        (1, CT, (JPEG2000,)),
        (3, MR, (EXPLICIT,)),
        (5, MR, (IMPLICIT,)),  # the other little-endian syntax, after every stored one
    ]


def test_an_uncompressed_pair_stored_both_ways_is_proposed_once_each() -> None:
    contexts = proposed_contexts([(CT, EXPLICIT), (CT, IMPLICIT)])
    assert [c.transfer_syntaxes for c in contexts] == [(EXPLICIT,), (IMPLICIT,)]


def test_at_most_128_contexts_are_proposed() -> None:
    pairs = [(f"1.2.3.{n}", EXPLICIT) for n in range(200)]
    contexts = proposed_contexts(pairs)
    assert len(contexts) == MAX_CONTEXTS
    assert contexts[-1].context_id == 255
